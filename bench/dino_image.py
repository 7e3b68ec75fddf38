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

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "grounded-sam-bench-cache")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from PIL import Image

    from backend.config import EngineConfig
    from backend.detector import GroundingDinoDetector, prepare
    from backend.dino_image_runtime import build_dino_image_runtime
    from backend.models import build_grounding_dino
    from bench.dino_text import SHAPES
    from bench.measure import flop_counter, matmul_gflops, photos
    from bench.runtime import lscpu

    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
    cpu = torch.device("cpu")
    info: dict[str, Any] = {"cpu": lscpu(), "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()[0],
                            "matmul_gflops": {"fp32": matmul_gflops(torch.float32),
                                              "bf16": matmul_gflops(torch.bfloat16)}}
    print(json.dumps(info), flush=True)
    base = EngineConfig.from_file(args.cache / "engine-vit_b.json", openvino_cache_dir=args.cache / "openvino")
    model = prepare(build_grounding_dino(base), cpu)

    def detector(runtime: str, dtype: torch.dtype) -> GroundingDinoDetector:
        config = base.replace(runtime=runtime)
        started = time.perf_counter()
        image_runtime = build_dino_image_runtime(config, model, cpu, dtype)
        load_s = time.perf_counter() - started
        conversion = getattr(image_runtime, "conversion", None)
        if conversion is not None:
            meta = json.loads(conversion.path.with_suffix(".json").read_text()) if conversion.path else {}
            print(f"{runtime} {dtype}: load {load_s:.1f} s (converted now: {conversion.converted}; conversion "
                  f"{meta.get('convert_seconds')} s; compile {image_runtime.compile_seconds:.1f} s; "
                  f"{conversion.size_bytes / 2**20:.0f} MiB on disk)", flush=True)
        return GroundingDinoDetector(model, cpu, dtype, config.dino_image_size, config.dino_max_size,
                                     image_runtime=image_runtime)

    reference_detector = detector("torch", torch.float32)
    runtimes = {name: detector(runtime, dtype) for name, runtime, dtype in RUNTIMES}
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

    times: dict[tuple[str, str], list[float]] = {}
    accuracy: dict[tuple[str, str], dict[str, float]] = {}
    first: dict[tuple[str, str], float] = {}
    for r in range(args.rounds + 1):  # round 0 warms up (oneDNN primitives, OpenVINO's first shapes)
        for label, image in images.items():
            for name, runtime_detector in runtimes.items():
                started = time.perf_counter()
                features = runtime_detector.image_features(image)
                elapsed = time.perf_counter() - started
                if r:
                    times.setdefault((name, label), []).append(elapsed)
                else:
                    first[(name, label)] = elapsed
                    accuracy[(name, label)] = compare(features, reference[label])
        print(f"round {r} done, load avg {os.getloadavg()[0]:.2f}", flush=True)
    info["load_avg_end"] = os.getloadavg()[0]
    print(f"\n# Grounding DINO image half, real size (Swin-T, random weights), {info['threads']} threads, "
          f"{args.rounds} interleaved rounds (medians), load avg {info['load_avg_start']:.2f} -> "
          f"{info['load_avg_end']:.2f}")
    print(f"# {info['cpu']['model']} | flags {' '.join(info['cpu']['flags'])} | matmul fp32 "
          f"{info['matmul_gflops']['fp32']:.0f}, bf16 {info['matmul_gflops']['bf16']:.0f} GFLOP/s")
    print("runtime         image      median s  first s  vs torch bf16  GFLOP/s  max|diff|   cosine")
    rows = []
    for label in images:
        base_s = statistics.median(times[("torch bf16", label)])
        for name in runtimes:
            s = statistics.median(times[(name, label)])
            a = accuracy[(name, label)]
            rows.append({"runtime": name, "image": label, "median_s": s, "first_s": first[(name, label)],
                         "rounds_s": times[(name, label)], **a})
            print(f"{name:15} {label:9} {s:9.2f} {first[(name, label)]:8.2f} {s / base_s:13.2f}x "
                  f"{gflop[label] / s:8.0f} {a['max_diff']:10.1e} {a['cosine']:9.6f}")
    print("(accuracy against torch fp32 on the same image; GFLOP/s = counted GFLOP / time)")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "gflop": gflop, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
