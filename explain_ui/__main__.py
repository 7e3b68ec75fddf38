"""``python -m explain_ui``: serve the explain page (see explain_ui/app.py for the environment)."""

from .app import main

if __name__ == "__main__":
    main()
