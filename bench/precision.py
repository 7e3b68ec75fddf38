"""SAM in bf16 against fp32 on the same boxes, and what recording the encoder's attention costs.

    python -m bench.precision                 # real-size vit_b, random weights, 2 threads (~5 min on 2 cores)
    python -m bench.precision --tiny          # the tests' tiny models: checks the script in seconds
    python -m bench.precision --rounds 5 --threads 2 --json out.json

Two figures back ``PRECISION=auto`` (backend/models.py): which kind of bf16 this CPU has, and the mask
IoU of bf16 against fp32 when SAM decodes the *same* boxes (Grounding DINO left out, so a reordered
box cannot pass for a worse mask). ``python -m bench`` prints the same IoU row for its own photos.

The capture overhead is ``SamSegmenter.embed(capture_attention=True)`` over ``embed()`` on one
1 x 3 x 1024 x 1024 input, in fp32 and (where the CPU has native bf16) bf16. Rounds are interleaved
(plain, capture, plain, capture, ...) so background load hits both alike; figures are medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass
class PrecisionIou:
    """Masks of SAM in ``precision`` against fp32, decoded from the same boxes of the same images."""

    precision: str
    images: int
    boxes: int
    mean: float
    min: float


@dataclass
class CaptureOverhead:
    """Median seconds of ``embed`` without and with the attention capture, in one precision."""

    precision: str
    rounds: int
    plain_s: float
    capture_s: float

    @property
    def ratio(self) -> float:
        return self.capture_s / self.plain_s


def boxes_for(height: int, width: int) -> np.ndarray:
    """Eight boxes of different sizes and places (whole image, halves, quadrants, centre, a thin one)."""
    h, w = float(height), float(width)
    return np.array([[0, 0, w, h], [0, 0, w / 2, h], [w / 2, 0, w, h], [0, 0, w / 2, h / 2],
                     [w / 2, h / 2, w, h], [w / 4, h / 4, 3 * w / 4, 3 * h / 4],
                     [0.1 * w, 0.6 * h, 0.9 * w, 0.8 * h], [0.3 * w, 0.05 * h, 0.45 * w, 0.95 * h]],
                    dtype=np.float32)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def same_box_iou(sam: torch.nn.Module, device: torch.device, images: list[np.ndarray],
                 dtype: torch.dtype = torch.bfloat16) -> PrecisionIou:
    """Mask IoU of SAM under ``dtype`` autocast against fp32, per box, over ``boxes_for`` each image.

    Arguments:
      sam: a loaded Sam (segment_anything or MobileSAM); both segmenters share its weights.
      images: RGB uint8 arrays (H, W, 3).
    Returns the mean and the worst IoU over all boxes.
    """
    from backend.segmenter import SamSegmenter

    reduced, full = SamSegmenter(sam, device, dtype), SamSegmenter(sam, device, torch.float32)
    ious = []
    for image in images:
        height, width = image.shape[:2]
        boxes = boxes_for(height, width)
        ours, ref = reduced.segment(reduced.embed(image), boxes), full.segment(full.embed(image), boxes)
        for a, b in zip(ours.masks, ref.masks, strict=True):
            ious.append(mask_iou(a.resized(height, width), b.resized(height, width)))
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return PrecisionIou(name, len(images), len(ious), float(np.mean(ious)), float(np.min(ious)))


def capture_overhead(sam: torch.nn.Module, device: torch.device, image: np.ndarray, dtype: torch.dtype,
                     rounds: int) -> CaptureOverhead:
    """Interleaved ``embed`` without / with capture after one warm-up of each; medians."""
    from backend.segmenter import SamSegmenter
    from bench.reference import clock

    segmenter = SamSegmenter(sam, device, dtype)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds + 1):
        for capture in (False, True):
            t0 = clock(device.type)  # on a GPU, after the queued work: the plain embed returns before it is done
            segmenter.embed(image, capture_attention=capture)
            if r:  # round 0 warms up (oneDNN primitives, first-touch of the heap)
                times[capture].append(clock(device.type) - t0)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return CaptureOverhead(name, rounds, statistics.median(times[False]), statistics.median(times[True]))


def _load_sam(tiny: bool) -> torch.nn.Module:
    if tiny:
        import os

        from backend.config import EngineConfig
        from backend.models import build_sam
        from tests.tiny_models import write_cache

        cache = Path(os.environ.get("TINY_MODEL_CACHE") or Path("/tmp/grounded-sam-tiny"))
        engine_json = cache / "engine.json" if (cache / "engine.json").is_file() else write_cache(cache)
        return build_sam(EngineConfig.from_file(engine_json))
    from segment_anything import sam_model_registry

    torch.manual_seed(0)  # random weights; segment_anything zero-initialises pos_embed and rel-pos tables
    return sam_model_registry["vit_b"](checkpoint=None).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models instead of real-size vit_b")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved capture rounds (default 3)")
    parser.add_argument("--images", type=int, default=3, help="photos for the IoU (8 boxes each, default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from backend.heap import reuse_freed_memory
    from backend.models import cpu_bf16_kind, cpu_flags
    from bench.measure import machine, matmul_gflops, photos

    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the engine does on CPU (REUSE_FREED_MEMORY, default on)
    device = torch.device("cpu")
    info = machine("cpu")
    kind = cpu_bf16_kind(cpu_flags())
    info.update(bf16_kind=kind, matmul_fp32=matmul_gflops(torch.float32),
                matmul_bf16=matmul_gflops(torch.bfloat16, n=512, reps=2))
    sam = _load_sam(args.tiny)
    images = photos(args.images)
    iou = same_box_iou(sam, device, images)
    dtypes = [torch.float32] + ([torch.bfloat16] if kind else [])
    overheads = [capture_overhead(sam, device, images[0], dtype, args.rounds) for dtype in dtypes]

    print(f"# SAM precision and capture ({'tiny random models' if args.tiny else 'vit_b, real size, random weights'})")
    print(f"{info['date']} | {info['cpu']} | torch {info['torch']} ({info['isa']}), {args.threads} threads | "
          f"native bf16: {kind or 'none'} | matmul fp32 {info['matmul_fp32']:.0f}, "
          f"bf16 {info['matmul_bf16']:.0f} GFLOP/s")
    print(f"{'mask IoU, SAM bf16 vs fp32, same boxes (mean / min)':52s} {iou.mean:.4f} / {iou.min:.4f}"
          f"  ({iou.boxes} boxes on {iou.images} photos; PRECISION=auto needs a mean >= 0.98)")
    for o in overheads:
        print(f"{'capture overhead, embed with / without (' + o.precision + ')':52s} {o.ratio:.3f}x"
              f"  ({o.capture_s:.2f} s vs {o.plain_s:.2f} s, median of {o.rounds}; target <= 1.10)")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "iou": asdict(iou),
                                         "capture": [{**asdict(o), "ratio": o.ratio} for o in overheads]},
                                        indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
