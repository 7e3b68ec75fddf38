"""The figures ``python -m bench --runtime openvino`` adds: what the CPU offers, what the conversions
cost (SAM's encoder, Grounding DINO's text and image halves), and how far the OpenVINO encoder's masks
are from torch fp32's on the same boxes. ``bench/dino_text.py`` and ``bench/dino_image.py`` time
Grounding DINO's halves on each runtime side by side."""

from __future__ import annotations

import argparse
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
    as "dino_text" and image half as "dino_image"), whether this load converted or read it, the time
    the conversion took (recorded in the cache's key file when it was made), and the bytes on disk."""
    encoder = engine.segmenter.encoder
    figures: dict[str, Any] = {"runtime": encoder.name}
    for kind, dino in (("dino_text", engine.detector.text_runtime), ("dino_image", engine.detector.image_runtime)):
        figures[f"{kind}_runtime"] = dino.name
        if dino.name == "openvino":
            figures[kind] = _conversion(dino.conversion, dino.compile_seconds, dino.precision)
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
    """A SamSegmenter on the engine's checkpoint (same weights) with the torch encoder in fp32; loaded
    again, because an engine on OpenVINO frees its own SAM's torch encoder weights."""
    from backend.models import build_sam
    from backend.segmenter import SamSegmenter

    return SamSegmenter(build_sam(engine.config), engine.segmenter.device, torch.float32)


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

    from bench.reference import clock

    encoder = engine.segmenter.encoder
    x, input_size = engine.segmenter.preprocess(rgb)
    device = x.device.type  # on a GPU the plain encode returns before its work is done: clock() waits for it
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds + 1):
        for capture in (True, False):
            t0 = clock(device)
            encoder.encode(x, input_size, capture)
            if r:
                times[capture].append(clock(device) - t0)
    with_s, without_s = statistics.median(times[True]), statistics.median(times[False])
    return {"with_s": with_s, "without_s": without_s, "ratio": with_s / without_s}


# ----------------------------------------------------------------------------------------------
# python -m bench.runtime: the encoder's capture cost on each runtime, and its memory
# ----------------------------------------------------------------------------------------------

USAGE = """SAM's image encoder with the explanation capture against without, on torch and OpenVINO.

    python -m bench.runtime                          # real-size vit_b, random weights, 2 threads
    python -m bench.runtime --rounds 5 --precisions bf16 --runtimes openvino
    python -m bench.runtime --memory                 # peak RSS of one encode, capture / plain
    python -m bench.runtime --tiny                   # the tests' tiny models: checks the script

One process: every encoder (runtime x precision) is built first (OpenVINO converts into a fresh
temporary cache unless --cache names one, and compiles both graph kinds), then rounds interleave
capture and plain for every encoder, so background load hits all ratios alike; figures are medians.
``--memory`` starts one fresh process per (runtime, precision, capture) that loads the encoder as
the engine does (OpenVINO: one graph kind compiled, the torch weights freed), then samples its RSS
every 2 ms through two encodes (the first allocates the runtime's buffers).
"""


def _vit_b(tiny: bool) -> torch.nn.Module:
    if tiny:
        import os

        from backend.config import EngineConfig
        from backend.models import build_sam
        from tests.tiny_models import write_cache

        cache = Path(os.environ.get("TINY_MODEL_CACHE") or Path("/tmp/grounded-sam-tiny"))
        engine_json = cache / "engine.json" if (cache / "engine.json").is_file() else write_cache(cache)
        return build_sam(EngineConfig.from_file(engine_json))
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    return sam_model_registry["vit_b"](checkpoint=None).eval()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_runtime(sam: torch.nn.Module, runtime: str, precision: str, cache: Path,
                  kinds: tuple[bool, ...] = (True, False), reload_torch: Any = None) -> Any:
    """One encoder runtime on ``sam``'s encoder, the graph ``kinds`` (capture True/False) compiled now
    (OpenVINO) so no timing includes a conversion."""
    from backend import sam_attention
    from backend.encoder_runtime import TorchImageEncoder

    sam_attention.use_fast_attention(sam.image_encoder)
    if runtime == "torch":  # with the operations library's kernel for the capture where the engine uses it
        from backend.encoder_runtime import torch_capture_kernel

        kernel = torch_capture_kernel(cache, sam.image_encoder, torch.device("cpu"), DTYPES[precision])
        return TorchImageEncoder(sam.image_encoder, DTYPES[precision], kernel)
    from backend.openvino_encoder import OpenVinoImageEncoder

    encoder = OpenVinoImageEncoder(sam.image_encoder, DTYPES[precision], torch.device("cpu"), capture=kinds[0],
                                   cache_dir=cache, identity={"sam_variant": "bench-random", "seed": 0},
                                   reload_torch=reload_torch)
    for capture in kinds[1:]:
        encoder.prepare(capture)
    return encoder


def _pixels(sam: torch.nn.Module) -> tuple[torch.Tensor, tuple[int, int]]:
    from backend.segmenter import SamSegmenter
    from bench.run import photos

    return SamSegmenter(sam, torch.device("cpu")).preprocess(photos(1)[0])


def _memory_child(args: argparse.Namespace) -> None:
    """In this fresh process: load one encoder, then sample RSS through two encodes."""
    from backend.heap import return_freed_memory
    from bench.measure import sampling_peak_rss

    sam = _vit_b(args.tiny)
    runtime, precision, capture = args.child.split(":")
    x, size = _pixels(sam)
    # As the engine builds it: OpenVINO frees the torch encoder's weights once its graph is compiled.
    from backend.encoder_runtime import with_fast_attention

    encoder = build_runtime(sam, runtime, precision, args.cache, (capture == "capture",),
                            reload_torch=lambda: with_fast_attention(_vit_b(args.tiny).image_encoder))
    return_freed_memory()
    with sampling_peak_rss() as rss:
        for _ in range(2):  # the first inference allocates OpenVINO's buffers, the second reuses them
            encoder.encode(x, size, capture == "capture")
    mib = 1 << 20
    print(json.dumps({"before_mib": rss.before / mib, "peak_mib": rss.peak / mib}))


def main(argv: list[str] | None = None) -> int:
    import argparse as _argparse
    import os
    import statistics
    import sys
    import tempfile
    import time

    parser = _argparse.ArgumentParser(description=USAGE, formatter_class=_argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models instead of real-size vit_b")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds after one warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenVINO threads (default 2)")
    parser.add_argument("--runtimes", default="openvino,torch", help="comma-separated: openvino, torch")
    parser.add_argument("--precisions", default="bf16,fp32", help="comma-separated: bf16, fp32")
    parser.add_argument("--cache", type=Path, help="OpenVINO cache folder (default: a fresh temporary one)")
    parser.add_argument("--memory", action="store_true", help="peak RSS of one encode instead of the times")
    parser.add_argument("--child", help=_argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from backend.heap import reuse_freed_memory

    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the engine does on CPU
    with tempfile.TemporaryDirectory(prefix="bench-ov-") as tmp:
        args.cache = args.cache or Path(tmp)
        if args.child:
            _memory_child(args)
            return 0
        cpu = lscpu()
        print(f"# SAM image encoder, capture vs plain ({'tiny' if args.tiny else 'vit_b real size, random weights'})")
        print(f"{time.strftime('%Y-%m-%d %H:%M')} | {cpu['model']} | flags {' '.join(cpu['flags'])} | "
              f"{args.threads} threads | load avg {os.getloadavg()[0]:.1f}")
        kinds = [(r, p) for r in args.runtimes.split(",") for p in args.precisions.split(",")]
        if args.memory:
            return _memory(args, kinds)
        sam = _vit_b(args.tiny)
        x, size = _pixels(sam)
        encoders = {}
        for kind in kinds:
            started = time.perf_counter()
            encoders[kind] = build_runtime(sam, *kind, args.cache)
            print(f"built {kind[0]} {kind[1]} in {time.perf_counter() - started:.1f} s", flush=True)
        # Wall time and the process's CPU time (all threads): under other sessions' load the CPU time
        # counts only what the encode itself ran, so its ratio is the steadier one.
        times: dict[tuple[str, str, bool], list[tuple[float, float]]] = {}
        for r in range(args.rounds + 1):
            for kind, encoder in encoders.items():
                for capture in (True, False):
                    t0, c0 = time.perf_counter(), time.process_time()
                    encoder.encode(x, size, capture)
                    if r:  # round 0 warms up (first-touch of buffers, oneDNN primitives)
                        times.setdefault((*kind, capture), []).append(
                            (time.perf_counter() - t0, time.process_time() - c0))
        print(f"{'encoder':16s} {'plain s':>8s} {'capture s':>9s} {'ratio':>7s} {'cpu ratio':>9s}   (medians of "
              f"{args.rounds}; target <= 1.10)  load avg {os.getloadavg()[0]:.1f}")
        for kind in kinds:
            (plain, plain_cpu), (capture, capture_cpu) = (
                (statistics.median(t[0] for t in times[(*kind, c)]), statistics.median(t[1] for t in times[(*kind, c)]))
                for c in (False, True))
            pairs = zip(times[(*kind, True)], times[(*kind, False)], strict=True)
            print(f"{kind[0] + ' ' + kind[1]:16s} {plain:8.2f} {capture:9.2f} {capture / plain:7.3f}x "
                  f"{capture_cpu / plain_cpu:8.3f}x   wall (cpu) capture/plain: "
                  f"{' '.join(f'{c[0]:.2f}({c[1]:.1f})/{p[0]:.2f}({p[1]:.1f})' for c, p in pairs)}")
    sys.stdout.flush()
    return 0


def _memory(args: argparse.Namespace, kinds: list[tuple[str, str]]) -> int:
    """Peak RSS of one encode per (runtime, precision), with capture and without, each a fresh process."""
    import sys

    print(f"{'encoder':20s} {'plain MiB':>10s} {'capture MiB':>12s} {'ratio':>7s}   (peak RSS of a whole "
          f"encode, fresh process each; target <= 1.2)")
    for kind in kinds:
        peaks = {}
        for capture in ("capture", "plain"):
            cmd = [sys.executable, "-m", "bench.runtime", "--child", f"{kind[0]}:{kind[1]}:{capture}",
                   "--threads", str(args.threads), "--cache", str(args.cache)] + (["--tiny"] if args.tiny else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
            peaks[capture] = json.loads(out.stdout.strip().splitlines()[-1])
        p, c = peaks["plain"]["peak_mib"], peaks["capture"]["peak_mib"]
        p0, c0 = peaks["plain"]["before_mib"], peaks["capture"]["before_mib"]
        print(f"{kind[0] + ' ' + kind[1]:20s} {p:10.0f} {c:12.0f} {c / p:7.3f}x   (loaded: plain {p0:.0f} MiB, "
              f"capture {c0:.0f} MiB; growth in the encodes: plain {p - p0:.0f} MiB, capture {c - c0:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
