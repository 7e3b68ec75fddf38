"""Side-by-side benchmark of the engine against the reference Grounded-SAM chain (bench/README.md)."""
