"""Side-by-side benchmark: the project's engine vs the reference chain, in one run, on this machine.

    python -m bench            # real-size vit_b + SwinT-OGC (random weights), ~15 min on 2 CPU cores
    python -m bench --quick    # fewer repeats, smaller Grounding DINO input, 4-task batch
    python -m bench --smoke    # tiny models (tests/tiny_models.py): checks the script still works
    python -m bench --device cuda --sam vit_h --precision bf16   # the GPU bench (per-stage ms)
    python -m bench --jobs 200  # a 200-task job vs its tasks one by one (tiny models, real Label Studio)
    python -m bench --runtime openvino --precision bf16   # SAM's encoder on OpenVINO (+ IoU vs torch fp32)

Everything is timed interleaved (reference, ours, reference, ours, ...) so background load hits both
alike; figures are medians. See bench/README.md for what each figure means and measured results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import bench.runtime as rt
from bench.cache import SAM_VARIANTS
from bench.measure import machine, matmul_gflops, photos
from bench.report import report
from bench.tasks import (
    DEFAULT_CACHE,
    REPO,
    Mode,
    Results,
    memory_probe,
    model_cache,
    run_batch,
    run_memory,
    run_tasks,
    same_box_precision_iou,
)

MODES = {
    "default": Mode("default", repeats=3, dino_size=None, batch_tasks=16),
    "quick": Mode("quick", repeats=2, dino_size=512, batch_tasks=4),
    "smoke": Mode("smoke", repeats=2, dino_size=None, batch_tasks=3, real=False),
}


def print_log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer repeats, 512 px Grounding DINO input, 4-task batch")
    group.add_argument("--smoke", action="store_true", help="tiny random models: a seconds-long check of the script")
    parser.add_argument("--repeats", type=int, help="cold tasks per side (default: 3, quick/smoke 2)")
    parser.add_argument("--batch-tasks", type=int, help="tasks in the /predict batch comparison (default 16)")
    parser.add_argument("--cache", type=Path, help=f"model cache folder (default {DEFAULT_CACHE})")
    parser.add_argument("--skip", action="append", default=[], choices=["batch", "memory", "precision"])
    parser.add_argument("--json", type=Path, help="also write every raw figure here")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where both chains run (default: cuda if available)")
    parser.add_argument("--sam", choices=SAM_VARIANTS, default="vit_b",
                        help="SAM size of both chains, real-size models only (default vit_b)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="the engine's precision (default: PRECISION, else auto: on CPU bf16 where it has "
                             "native bf16 (AMX, AVX-512 BF16), else fp32; bf16 on GPU, fp16 where bf16 is "
                             "unsupported); the reference runs fp32")
    parser.add_argument("--runtime", choices=["auto", "torch", "openvino"], default="auto",
                        help="what runs SAM's image encoder in our engine (RUNTIME; default auto: OpenVINO on CPU); "
                             "off torch, an extra row compares its masks with torch fp32's on the same boxes")
    parser.add_argument("--jobs", type=int, metavar="TASKS",
                        help="instead: the job machinery's overhead on TASKS tasks (tiny models; bench/jobs.py)")
    parser.add_argument("--memory-probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--explanations", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--dino-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from backend.config import PRECISIONS
    from backend.models import ModelLoadError, cpu_bf16_kind, cpu_flags, resolve_device, resolve_precision

    try:
        device = resolve_device(args.device).type  # the engine's own choice: cuda if available
    except ModelLoadError as exc:
        parser.error(str(exc))
    # Without --precision, the engine's own setting (PRECISION, default auto) decides, as in the backend.
    setting = os.environ.get("PRECISION") or "auto"
    if setting not in PRECISIONS:
        parser.error(f"PRECISION must be one of {PRECISIONS}, got {setting!r}")
    precision = args.precision or resolve_precision(setting, torch.device(device))

    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.explanations == "on", args.dino_size, device, precision,
                                      args.runtime)))
        return 0

    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "default"]
    if args.jobs is not None:
        from bench import jobs

        if args.jobs < 1:
            parser.error("--jobs needs at least 1 task")
        engine_json, _ = model_cache(MODES["smoke"], args.cache)
        info = {**machine(device), "mode": "jobs", "device": device}
        return jobs.main(args.jobs, engine_json, info, args.json, print_log)
    if args.smoke and args.sam != "vit_b":
        parser.error("--sam applies to the real-size models; --smoke runs the tiny ones")
    mode.device, mode.sam_variant, mode.precision, mode.runtime = device, args.sam, precision, args.runtime
    if args.repeats:
        mode.repeats = args.repeats
    if args.batch_tasks:
        mode.batch_tasks = args.batch_tasks
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    info = machine(device)
    info["lscpu"] = rt.lscpu()
    on_cpu = device == "cpu"
    # A GPU needs a large product to approach its peak; on CPU bf16 can run at ~1 GFLOP/s without native
    # support, so its probe stays small there.
    info.update(mode=mode.name, device=device, precision=precision, matmul_n=2048 if on_cpu else 8192,
                models=f"{mode.sam_variant} + SwinT-OGC, real size, random weights" if mode.real
                else "tiny random models")
    info.update(matmul_fp32=matmul_gflops(torch.float32, n=info["matmul_n"], device=device),
                matmul_bf16=matmul_gflops(torch.bfloat16, n=(512 if mode.real else 256) if on_cpu else info["matmul_n"],
                                          reps=2 if on_cpu else 5, device=device))
    engine_json, ref_files = model_cache(mode, args.cache)
    log(f"model cache {engine_json.parent}")
    res = Results()
    with tempfile.TemporaryDirectory() as tmp:
        engine, _ = run_tasks(mode, engine_json, ref_files, Path(tmp), res, log)
        res.notes["capture_overhead"] = rt.capture_overhead(engine, photos(1)[0], mode.repeats)
        res.notes["conversion"] = rt.conversion_figures(engine)  # now with the graph kind the probe added
        log(f"SAM encoder with / without capture: {json.dumps(res.notes['capture_overhead'])}")
        if "precision" not in args.skip:
            same_box_precision_iou(engine, res, log)
        if "batch" not in args.skip:
            run_batch(engine, mode, res, log)
    del engine
    if "memory" not in args.skip:
        run_memory(engine_json, mode, res, log)
    info["load_avg_end"] = os.getloadavg()[0]
    probs_diff, boxes_diff = res.notes["detector_max_abs_diff"]
    info["options"] = [
        f"Grounding DINO without activation checkpointing + embedding_bag deformable attention (default on): "
        f"max abs diff vs groundingdino's fp32 forward, ours in {precision}: {probs_diff:.1e} (token probabilities), "
        f"{boxes_diff:.1e} (boxes)" + ("" if precision == "fp32" else
                                        " (query by query: reduced precision reorders the top-900 query selection "
                                        "of near-tied random-weight scores, so the mask IoU is the figure to read)"),
        "SDPA attention in SAM's encoder (default on): same math, masks equal (IoU above)",
        "cached Grounding DINO image features + SAM embedding for re-prompts (default on): exact reuse",
        "freed memory kept in the heap (REUSE_FREED_MEMORY, default on for CPU): no output change; it is "
        "process-wide, so the reference chain timed in this process runs with it too (ratios conservative)",
    ]
    speed = f"bf16 matmul here {info['matmul_bf16']:.0f} vs {info['matmul_fp32']:.0f} GFLOP/s fp32"
    if device == "cuda":
        usage = "the GPU default"
    elif kind := cpu_bf16_kind(cpu_flags()):
        usage = f"the CPU default here: this CPU has native bf16 ({kind}); PRECISION=fp32 opts out"
    else:
        usage = "opt-in on CPU; this CPU has no native bf16 (AMX, AVX-512 BF16), so auto stays fp32"
    info["options"].append(f"bf16 autocast (PRECISION=bf16, {usage}): {speed}; its mask IoU against the fp32 "
                           "reference is the IoU row of a run with --precision bf16")
    text = report(res, info)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": res.rows, "stages": res.stages, "notes": res.notes},
                                        indent=2, default=str))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
