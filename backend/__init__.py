"""Explainable Grounded SAM: Grounding DINO (text -> boxes) + SAM (boxes -> masks) for Label Studio."""

__version__ = "0.1.0"
