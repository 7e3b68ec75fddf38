"""Grounding DINO's text half (a re-prompt's cost) on torch and OpenVINO, real size, one process.

    python -m bench.dino_text [--cache DIR] [--rounds 3] [--profile]

Same image features (torch bf16 backbone) for every runtime; per round, per image, each runtime in
turn (interleaved, so background load hits all); medians. Accuracy: OpenVINO f32 against torch fp32
(max abs difference of token probabilities and boxes), and bf16 (torch and OpenVINO) against torch
fp32 on the top queries (box IoU, top label). Then each runtime's first call at an image shape it has
not seen whose OpenVINO size bucket it has (``dino_runtime.bucket_sizes``). ``--profile``: one
OpenVINO call per precision with per-op counters, its time by op type. Models: bench/cache.py's
real-size random weights.
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
from torchvision.ops import box_convert, box_iou

PROMPT = ["person", "bicycle", "traffic light", "dog"]
# (height, width) of the photo: groundingdino resizes the short side to 800 (long side at most 1333).
SHAPES = {"800x1066": (600, 800), "750x1333": (450, 800)}
UNSEEN = (800, 1075)  # (height, width) of a photo not resized further: 800x1066's size bucket, not its sizes
TOP = 8  # queries compared between precisions (the bench keeps 8 boxes per task)


def _top(raw: Any, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    scores = raw.token_probs[:, tokens].max(dim=1)
    order = scores.values.argsort(descending=True)[:TOP]
    return box_convert(raw.boxes_cxcywh[order], "cxcywh", "xyxy"), scores.indices[order]


def compare(ours: Any, reference: Any, tokens: list[int]) -> dict[str, float]:
    """Max abs differences over all queries, and how the top queries of ``reference`` are found in ``ours``."""
    boxes_a, labels_a = _top(ours, tokens)
    boxes_b, labels_b = _top(reference, tokens)
    iou = box_iou(boxes_b, boxes_a)
    best = iou.max(dim=1)
    return {"prob_diff": float((ours.token_probs - reference.token_probs).abs().max()),
            "box_diff": float((ours.boxes_cxcywh - reference.boxes_cxcywh).abs().max()),
            "top_iou": float(best.values.mean()),
            "top_label_agree": float((labels_a[best.indices] == labels_b).float().mean())}


def op_profile(runtime: Any, inputs: Any) -> tuple[float, dict[str, float]]:
    """One call of ``runtime``'s (an OpenVinoDinoText) graph, compiled again with per-op counters, on
    ``inputs`` (DinoTextInputs) at their size bucket after a warm-up call: (wall s, op type -> s)."""
    import openvino as ov

    from backend.dino_runtime import _numpy, bucket_sizes

    core = runtime.ops.add_to(ov.Core()) if runtime.ops else ov.Core()  # the graph's custom nodes
    compiled = core.compile_model(core.read_model(runtime.conversion.path), "CPU", {
        "INFERENCE_PRECISION_HINT": runtime.precision, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    arrays = [_numpy(t) for t in inputs.padded(bucket_sizes(inputs.sizes)).flat()]
    request.infer(arrays)
    started = time.perf_counter()
    request.infer(arrays)
    wall = time.perf_counter() - started
    by_type: dict[str, float] = {}
    for info in request.get_profiling_info():
        by_type[info.node_type] = by_type.get(info.node_type, 0.0) + info.real_time.total_seconds()
    return wall, by_type


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "grounded-sam-bench-cache")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", action="store_true", help="per-op times of one OpenVINO call per precision")
    args = parser.parse_args()
    from PIL import Image

    from backend.config import EngineConfig
    from backend.detector import Caption, GroundingDinoDetector, prepare
    from backend.dino_runtime import build_dino_text_runtime
    from backend.models import build_grounding_dino
    from bench.measure import flop_counter, matmul_gflops, photos
    from bench.runtime import lscpu

    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
    cpu = torch.device("cpu")
    info: dict[str, Any] = {"cpu": lscpu(), "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()[0],
                            "matmul_gflops": {"fp32": matmul_gflops(torch.float32),
                                              "bf16": matmul_gflops(torch.bfloat16)}}
    print(json.dumps(info), flush=True)
    base = EngineConfig.from_file(args.cache / "engine-vit_b.json", openvino_cache_dir=args.cache / "openvino")
    runtimes: dict[str, GroundingDinoDetector] = {}
    for name, runtime, dtype in (("torch fp32", "torch", torch.float32), ("torch bf16", "torch", torch.bfloat16),
                                 ("openvino f32", "openvino", torch.float32),
                                 ("openvino bf16", "openvino", torch.bfloat16)):
        config = base.replace(runtime=runtime)
        model = prepare(build_grounding_dino(config), cpu)
        started = time.perf_counter()
        text_runtime = build_dino_text_runtime(config, model, cpu, dtype)
        load_s = time.perf_counter() - started
        runtimes[name] = GroundingDinoDetector(model, cpu, dtype, config.dino_image_size, config.dino_max_size,
                                               text_runtime)
        conversion = getattr(text_runtime, "conversion", None)
        if conversion is not None:
            meta = json.loads(conversion.path.with_suffix(".json").read_text()) if conversion.path else {}
            print(f"{name}: load {load_s:.1f} s (converted now: {conversion.converted}; conversion "
                  f"{meta.get('convert_seconds')} s; compile {text_runtime.compile_seconds:.1f} s; "
                  f"{conversion.size_bytes / 2**20:.0f} MiB on disk)", flush=True)
    probe = runtimes["torch fp32"]  # fp32 features: every runtime reads them (bf16 ones would not fit fp32 torch)
    caption = Caption.build(PROMPT, probe.tokenizer)
    tokens = [i for idx in caption.phrase_tokens for i in idx]
    features = {}
    for label, size in SHAPES.items():
        photo = np.asarray(Image.fromarray(photos(1)[0]).resize(size[::-1]))
        features[label] = probe.image_features(photo)
        shapes = [tuple(src.shape[2:]) for src in features[label].srcs]
        print(f"{label}: levels {shapes}, {sum(h * w for h, w in shapes)} image tokens, "
              f"{len(caption.tokens)} text tokens", flush=True)
    gflop = {}
    for label, f in features.items():
        with flop_counter() as counter:
            runtimes["torch fp32"].raw_predictions(f, caption)
        gflop[label] = counter.get_total_flops() / 1e9
        print(f"text half at {label}: {gflop[label]:.1f} GFLOP counted (the deformable sampling is not)", flush=True)

    reference = {label: runtimes["torch fp32"].raw_predictions(f, caption) for label, f in features.items()}
    timed = [name for name in runtimes if name != "torch fp32"]
    times: dict[tuple[str, str], list[float]] = {}
    accuracy: dict[tuple[str, str], dict[str, float]] = {}
    first: dict[tuple[str, str], float] = {}  # the first call at a new shape (OpenVINO compiles its kernels)
    for r in range(args.rounds + 1):  # round 0 warms up (oneDNN primitives, OpenVINO's first shapes)
        for label, f in features.items():
            for name in timed:
                started = time.perf_counter()
                raw = runtimes[name].raw_predictions(f, caption)
                if r:
                    times.setdefault((name, label), []).append(time.perf_counter() - started)
                else:
                    first[(name, label)] = time.perf_counter() - started
                    accuracy[(name, label)] = compare(raw, reference[label], tokens)
        print(f"round {r} done, load avg {os.getloadavg()[0]:.2f}", flush=True)
    unseen = probe.image_features(np.asarray(Image.fromarray(photos(1)[0]).resize(UNSEEN[::-1])))
    for name in timed:
        started = time.perf_counter()
        runtimes[name].raw_predictions(unseen, caption)
        first[(name, "unseen")] = time.perf_counter() - started
    info["load_avg_end"] = os.getloadavg()[0]
    print(f"\n# Grounding DINO text half, real size (SwinT-OGC, random weights), {info['threads']} threads, "
          f"{args.rounds} interleaved rounds (medians), load avg {info['load_avg_start']:.2f} -> "
          f"{info['load_avg_end']:.2f}")
    print(f"# {info['cpu']['model']} | flags {' '.join(info['cpu']['flags'])} | matmul fp32 "
          f"{info['matmul_gflops']['fp32']:.0f}, bf16 {info['matmul_gflops']['bf16']:.0f} GFLOP/s")
    print("runtime         image      median s  first s  vs torch bf16  GFLOP/s  max|dprob|  max|dbox|  top-8 IoU"
          "  top-8 label")
    rows = []
    for label in features:
        base_s = statistics.median(times[("torch bf16", label)])
        for name in timed:
            s = statistics.median(times[(name, label)])
            a = accuracy[(name, label)]
            rows.append({"runtime": name, "image": label, "median_s": s, "first_s": first[(name, label)], **a})
            print(f"{name:15} {label:9} {s:9.2f} {first[(name, label)]:8.2f} {s / base_s:13.2f}x "
                  f"{gflop[label] / s:8.0f} {a['prob_diff']:11.1e} {a['box_diff']:10.1e} {a['top_iou']:10.4f} "
                  f"{a['top_label_agree']:12.2f}")
    print("(accuracy against torch fp32 on the same features; GFLOP/s = counted GFLOP / time)")
    print(f"first call at {UNSEEN[0]}x{UNSEEN[1]} (unseen sizes, 800x1066's bucket): " + ", ".join(
        f"{name} {first[(name, 'unseen')]:.2f} s" for name in timed))
    if args.profile:
        for name in timed:
            if name.startswith("openvino"):
                wall, by_type = op_profile(runtimes[name].text_runtime, runtimes[name].text_inputs(
                    features["800x1066"], caption))
                total = sum(by_type.values())
                top = sorted(by_type.items(), key=lambda kv: -kv[1])[:8]
                print(f"{name} at 800x1066 with per-op counters: {wall:.2f} s, op time {total:.2f} s: "
                      + ", ".join(f"{op} {100 * t / total:.0f}%" for op, t in top), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "gflop": gflop, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
