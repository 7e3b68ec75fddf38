"""Grounding DINO's image half (Swin-T backbone, input projections, positions: a cold task's DINO cost
before the text) on torch and OpenVINO, real size, one process.

    python -m bench.dino_image [--cache DIR] [--rounds 3]

The same photo at two aspect ratios for every runtime; per round, per image, each runtime in turn
(interleaved, so background load hits all); medians. Round 0 warms up (its time is the "first s"
column: the first call at a new shape, where OpenVINO compiles kernels). Accuracy against torch fp32:
max abs difference and cosine of the features (every level's srcs and positions together). Models:
bench/cache.py's real-size random weights; one Grounding DINO serves every runtime.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import numpy as np
import torch

RUNTIMES = (("torch bf16", "torch", torch.bfloat16), ("openvino f32", "openvino", torch.float32),
            ("openvino bf16", "openvino", torch.bfloat16))


def compare(ours: Any, reference: Any) -> dict[str, float]:
    """Max abs difference and cosine of every level's features and positions, against ``reference``."""
    # float64: a float32 cosine over ~9 M values rounds past 1.
    a = torch.cat([t.double().flatten() for t in (*ours.srcs, *ours.poss)])
    b = torch.cat([t.double().flatten() for t in (*reference.srcs, *reference.poss)])
    return {"max_diff": float((a - b).abs().max()),
            "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0))}


def main() -> None:
    from PIL import Image

    from backend.config import EngineConfig
    from backend.detector import GroundingDinoDetector, prepare
    from backend.dino_image_runtime import build_dino_image_runtime
    from backend.models import build_grounding_dino
    from bench.component import arguments, interleave, machine_info, print_conversion, print_header
    from bench.dino_text import SHAPES
    from bench.measure import flop_counter, photos

    args = arguments(__doc__ or "")
    info = machine_info()
    cpu = torch.device("cpu")
    base = EngineConfig.from_file(args.cache / "engine-vit_b.json", openvino_cache_dir=args.cache / "openvino")
    model = prepare(build_grounding_dino(base), cpu)

    def detector(name: str, runtime: str, dtype: torch.dtype) -> GroundingDinoDetector:
        config = base.replace(runtime=runtime)
        started = time.perf_counter()
        image_runtime = build_dino_image_runtime(config, model, cpu, dtype)
        print_conversion(name, image_runtime, time.perf_counter() - started)
        return GroundingDinoDetector(model, cpu, dtype, config.dino_image_size, config.dino_max_size,
                                     image_runtime=image_runtime)

    reference_detector = detector("torch fp32", "torch", torch.float32)
    runtimes = {name: detector(name, runtime, dtype) for name, runtime, dtype in RUNTIMES}
    photo = photos(1)[0]
    images = {label: np.asarray(Image.fromarray(photo).resize(size[::-1])) for label, size in SHAPES.items()}
    gflop, reference = {}, {}
    for label, image in images.items():
        with flop_counter() as counter:
            reference[label] = reference_detector.image_features(image)
        gflop[label] = counter.get_total_flops() / 1e9
        shapes = [tuple(src.shape[2:]) for src in reference[label].srcs]
        print(f"{label}: input {tuple(reference_detector.preprocess(image).shape[1:])}, levels {shapes}, "
              f"{gflop[label]:.1f} GFLOP counted", flush=True)

    timed = interleave(args.rounds, images, {name: d.image_features for name, d in runtimes.items()},
                       lambda features, label: compare(features, reference[label]))
    print_header(info, "Grounding DINO image half (Swin-T, input projections, positions)", args.rounds)
    print("runtime         image      median s  first s  vs torch bf16  GFLOP/s  max|diff|   cosine")
    rows = []
    for label in images:
        base_s = statistics.median(timed.times[("torch bf16", label)])
        for name in runtimes:
            s = statistics.median(timed.times[(name, label)])
            a, first = timed.accuracy[(name, label)], timed.first[(name, label)]
            rows.append({"runtime": name, "image": label, "median_s": s, "first_s": first,
                         "rounds_s": timed.times[(name, label)], **a})
            print(f"{name:15} {label:9} {s:9.2f} {first:8.2f} {s / base_s:13.2f}x "
                  f"{gflop[label] / s:8.0f} {a['max_diff']:10.1e} {a['cosine']:9.6f}")
    print("(accuracy against torch fp32 on the same image; GFLOP/s = counted GFLOP / time)")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "gflop": gflop, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
