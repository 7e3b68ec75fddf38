"""The figures ``python -m bench --runtime openvino`` adds: what the CPU offers, what the conversions
cost (SAM's encoder, Grounding DINO's text half), and how far the OpenVINO encoder's masks are from
torch fp32's on the same boxes. ``bench/dino_text.py`` times the text half's runtimes side by side."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

# lscpu flags that decide which precision a CPU runs fast.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx512_fp16")


def lscpu() -> dict[str, Any]:
    """Model name and the bf16/AVX-512/AMX flags from ``lscpu`` (empty strings where it is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {"model": fields.get("Model name", "").strip(), "flags": [f for f in CPU_FLAGS if f in flags]}


def conversion_figures(engine: Any) -> dict[str, Any]:
    """The OpenVINO graphs' cache: per graph (SAM's plain/capture encoder, Grounding DINO's text half
    as "dino_text"), whether this load converted or read it, the time the conversion took (recorded
    in the cache's key file when it was made), and the bytes on disk."""
    encoder = engine.segmenter.encoder
    dino = engine.detector.text_runtime
    figures: dict[str, Any] = {"runtime": encoder.name, "dino_text_runtime": dino.name}
    if dino.name == "openvino":
        figures["dino_text"] = _conversion(dino.conversion, dino.compile_seconds, dino.precision)
    if encoder.name != "openvino":
        return figures
    figures["precision"] = encoder.precision
    for capture, conversion in encoder.conversions.items():
        figures["capture" if capture else "plain"] = _conversion(conversion, encoder.compile_seconds.get(capture),
                                                                 encoder.precision)
    return figures


def _conversion(conversion: Any, compile_s: float | None, precision: str) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if conversion.path is not None and conversion.path.with_suffix(".json").is_file():
        meta = json.loads(Path(conversion.path).with_suffix(".json").read_text())
    return {"converted_now": conversion.converted, "load_s": conversion.seconds,
            "convert_s": meta.get("convert_seconds", conversion.seconds if conversion.converted else None),
            "compile_s": compile_s, "precision": precision, "bytes": conversion.size_bytes,
            "path": str(conversion.path)}


def torch_fp32_segmenter(engine: Any) -> Any:
    """A SamSegmenter on the engine's own SAM (same weights) with the torch encoder in fp32."""
    from backend.segmenter import SamSegmenter

    return SamSegmenter(engine.segmenter.sam, engine.segmenter.device, torch.float32)


def same_box_iou(engine: Any, reference: Any, rgb: np.ndarray, boxes: np.ndarray) -> float:
    """Mean mask IoU of the engine's SAM against ``reference``'s on the same prompt boxes (nan: none)."""
    if len(boxes) == 0:
        return float("nan")
    ours = engine.segmenter.segment(engine.sam_embedding(rgb), boxes).masks
    theirs = reference.segment(reference.embed(rgb), boxes).masks
    ious = []
    for a, b in zip(ours, theirs, strict=True):
        ma, mb = a.resized(*a.size), b.resized(*b.size)
        union = np.logical_or(ma, mb).sum()
        ious.append(float(np.logical_and(ma, mb).sum() / union) if union else 1.0)
    return float(np.mean(ious))


def capture_overhead(engine: Any, rgb: np.ndarray, rounds: int) -> dict[str, float]:
    """SAM's encoder on ``rgb`` with and without the explanation capture, interleaved, medians in s.

    The first call of each kind is left out (it compiles, or converts, the graph kind not loaded yet).
    """
    import statistics
    import time

    encoder = engine.segmenter.encoder
    x, input_size = engine.segmenter.preprocess(rgb)
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds + 1):
        for capture in (True, False):
            t0 = time.perf_counter()
            encoder.encode(x, input_size, capture)
            if r:
                times[capture].append(time.perf_counter() - t0)
    with_s, without_s = statistics.median(times[True]), statistics.median(times[False])
    return {"with_s": with_s, "without_s": without_s, "ratio": with_s / without_s}
