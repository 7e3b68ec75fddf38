"""The bench's measuring tools: IoUs, medians, the photos, per-stage timers and FLOP counts, the machine.

Shared by ``python -m bench`` (bench/run.py, bench/tasks.py), bench/precision.py and bench/jobs.py.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.reference import clock


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # a task with no boxes has no IoU (nan)
    return float(statistics.median(values)) if values else float("nan")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one box a (4,) against boxes b (N, 4), xyxy."""
    lt, rb = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def matched_iou(segments, ref_boxes: np.ndarray, ref_masks: np.ndarray) -> tuple[float, int]:
    """Mean mask IoU of our segments against the reference mask of the best-overlapping reference box."""
    ious = []
    for s in segments:
        if len(ref_boxes) == 0:
            ious.append(0.0)
            continue
        # Our boxes are clipped to the image (SAM still gets them unclipped, as the reference does).
        height, width = s.mask.shape
        clipped = ref_boxes.astype(np.float64).clip(0, [width, height, width, height])
        j = int(np.argmax(box_iou(np.asarray(s.box, dtype=np.float64), clipped)))
        ious.append(mask_iou(s.mask, ref_masks[j]))
    return (float(np.mean(ious)) if ious else float("nan")), len(ious)


def photos(count: int, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """``count`` distinct RGB photos (scikit-image's samples, flipped/cropped into new images)."""
    import skimage.data

    bases = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    out = []
    for i in range(count):
        img = bases[i % len(bases)]
        k = i // len(bases)
        if k:  # a different crop + flip for each round: new content digest, same kind of photo
            h, w = img.shape[:2]
            img = img[(7 * k) % (h // 8):, (11 * k) % (w // 8):]
            img = img[:, ::-1] if k % 2 else img[::-1]
        img = np.ascontiguousarray(img)
        if size is not None:
            img = np.asarray(Image.fromarray(img).resize(size))
        out.append(img)
    return out


class StageTimer:
    """Times the engine's stages by wrapping its detector/segmenter methods on the instance."""

    STAGES = {("detector", "image_features"): "dino_backbone", ("detector", "raw_predictions"): "dino_text_decoder",
              ("segmenter", "embed"): "sam_encoder", ("segmenter", "segment"): "sam_decoder_post"}

    def __init__(self, engine, device: str) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.flops: dict[str, float] = {}
        self.count_flops = False
        for (owner, method), stage in self.STAGES.items():
            obj = getattr(engine, owner)
            setattr(obj, method, self._wrap(getattr(obj, method), stage))

    def _wrap(self, fn: Callable, stage: str) -> Callable:
        def timed(*args, **kwargs):
            ctx = flop_counter() if self.count_flops else contextlib.nullcontext()
            t0 = clock(self.device)
            with ctx as counter:
                result = fn(*args, **kwargs)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + clock(self.device) - t0
            if counter is not None:
                self.flops[stage] = self.flops.get(stage, 0.0) + counter.get_total_flops()
            return result

        return timed

    def take(self, total: float) -> dict[str, float]:
        stages, self.seconds = self.seconds, {}
        stages["other"] = max(0.0, total - sum(stages.values()))
        return stages


def flop_counter():
    """torch's FlopCounterMode plus SDPA's CPU kernel (which it does not count): 4 * B * H * Lq * Lk * D."""
    from torch.utils.flop_counter import FlopCounterMode

    def sdpa_flops(query_shape, key_shape, *args, **kwargs) -> int:
        b, h, lq, d = query_shape
        return 4 * b * h * lq * key_shape[-2] * d

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = lambda q, k, *a, out_shape=None, **kw: sdpa_flops(q, k)
    return FlopCounterMode(display=False, custom_mapping=mapping)


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        torch.mm(a, a)  # first call: kernel selection / cuBLAS handle
        for _ in range(reps):
            t0 = clock(device)
            torch.mm(a, a)
            best = min(best, clock(device) - t0)
    return 2 * n ** 3 / best / 1e9


def machine(device: str) -> dict[str, Any]:
    model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_avg_start": os.getloadavg()[0],
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None}


@dataclass
class RssPeak:
    """Resident memory of this process, bytes: when sampling began, and the most seen until it ended."""

    before: int
    peak: int


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def sampling_peak_rss(interval_s: float = 0.002) -> Iterator[RssPeak]:
    """Sample this process's RSS every ``interval_s`` on a thread while the block runs (a peak inside
    one native call is seen, unlike a reading after it); ``peak`` is final once the block has left."""
    figures = RssPeak(before=_rss_bytes(), peak=0)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            figures.peak = max(figures.peak, _rss_bytes())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield figures
    finally:
        done.set()
        sampler.join()
        figures.peak = max(figures.peak, _rss_bytes())
