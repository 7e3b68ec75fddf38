"""SAM image encoder helpers for tests: counting encodes at the runtime seam, an encoder part that
torch.export cannot capture (to exercise the fallback to torch), and a guard that no conversion runs.

A forward hook on ``sam.image_encoder`` counts nothing when the runtime is OpenVINO (the torch module
never runs), so "encoded once" / "nothing encoded" checks count at ``SamSegmenter.encoder.encode``:
the one call every embedding goes through, whichever runtime (``RUNTIME``) serves it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from backend.encoder_runtime import EncodedImage
    from backend.segmenter import SamSegmenter


@contextmanager
def counting_sam_encodes(segmenter: SamSegmenter) -> Iterator[list[str]]:
    """Record each image encode ``segmenter`` runs while the block is open.

    Arguments:
      segmenter: the engine's ``SamSegmenter`` (shared by engines built from the same models).
    Returns:
      (as the context value) a list that gains the runtime's name ("torch" or "openvino") per encode.
    """
    runtime = segmenter.encoder
    encode = runtime.encode
    # An instance attribute shadows the class's method; a wrapper already there (nested use) comes back.
    shadowed = "encode" in vars(runtime)
    calls: list[str] = []

    def counted(image: torch.Tensor, input_size: tuple[int, int], capture: bool) -> EncodedImage:
        calls.append(runtime.name)
        return encode(image, input_size, capture)

    runtime.encode = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        if shadowed:
            runtime.encode = encode  # type: ignore[method-assign]
        else:
            del runtime.encode


class DataDependentNeck(torch.nn.Module):
    """A neck whose output depends on a branch taken on the data: torch.export cannot capture it."""

    def __init__(self, neck: torch.nn.Module) -> None:
        super().__init__()
        self.inner = neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out if float(out.sum()) > -1e30 else -out


def forbid_conversion(monkeypatch, why: str) -> None:
    """Make any torch.export or OpenVINO conversion in this test fail with ``why`` (a warm start or a
    new input size must be served by the graph already converted)."""
    def refuse(*args, **kwargs):
        raise AssertionError(why)

    monkeypatch.setattr(torch.export, "export", refuse)
    monkeypatch.setattr("openvino.convert_model", refuse)
