"""The explain page: a Gradio UI over the backend's /api (segment, explain, Label Studio tasks).

``python -m explain_ui`` serves it; ``explain_ui.views`` holds its logic as plain functions and
``explain_ui.client`` the HTTP client. It never loads a model: the backend holds the one copy.
"""
