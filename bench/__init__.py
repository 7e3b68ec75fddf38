"""Side-by-side benchmark of the engine against the reference Grounded-SAM chain (bench/README.md)."""

import os

# The bench never reaches the network: models come from its caches, before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
