"""What a component bench (one model part, each runtime side by side) needs: its arguments, the
machine's figures printed beside the times (lscpu flags, threads, load, matmul rates), the line that
says what a runtime's conversion cost, and the interleaved timing loop (per round, per input, each
runtime in turn, so background load hits all; round 0 warms up and its time is the "first s").
``bench.dino_image`` runs on it; ``bench.dino_text`` still has its own copy of the same steps."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def arguments(doc: str) -> argparse.Namespace:
    """--cache (bench/cache.py's real-size models), --rounds (timed, after one warm-up), --json (rows out)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "grounded-sam-bench-cache")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def machine_info() -> dict[str, Any]:
    """Threads (THREADS, else torch's), lscpu's model and flags, load average and matmul rates; printed."""
    from bench.measure import matmul_gflops
    from bench.runtime import lscpu

    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
    info: dict[str, Any] = {"cpu": lscpu(), "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()[0],
                            "matmul_gflops": {"fp32": matmul_gflops(torch.float32),
                                              "bf16": matmul_gflops(torch.bfloat16)}}
    print(json.dumps(info), flush=True)
    return info


def print_conversion(name: str, runtime: Any, load_s: float) -> None:
    """One line on how ``runtime`` (an OpenVINO runtime with ``conversion``; others print nothing) was made."""
    conversion = getattr(runtime, "conversion", None)
    if conversion is None:
        return
    meta = json.loads(conversion.path.with_suffix(".json").read_text()) if conversion.path else {}
    print(f"{name}: load {load_s:.1f} s (converted now: {conversion.converted}; conversion "
          f"{meta.get('convert_seconds')} s; compile {runtime.compile_seconds:.1f} s; "
          f"{conversion.size_bytes / 2**20:.0f} MiB on disk)", flush=True)


@dataclass
class Interleaved:
    """Times per (runtime, input label): the timed rounds, the warm-up call, and its accuracy figures."""

    times: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    first: dict[tuple[str, str], float] = field(default_factory=dict)  # first call at a shape: OpenVINO compiles
    accuracy: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)


def interleave(rounds: int, inputs: Mapping[str, Any], runtimes: Mapping[str, Callable[[Any], Any]],
               accuracy: Callable[[Any, str], dict[str, float]]) -> Interleaved:
    """``rounds`` + 1 rounds of every runtime on every input in turn; round 0 is the warm-up, whose
    outputs ``accuracy(output, label)`` judges."""
    result = Interleaved()
    for r in range(rounds + 1):  # round 0 warms up (oneDNN primitives, OpenVINO's first shapes)
        for label, value in inputs.items():
            for name, run in runtimes.items():
                started = time.perf_counter()
                output = run(value)
                elapsed = time.perf_counter() - started
                if r:
                    result.times.setdefault((name, label), []).append(elapsed)
                else:
                    result.first[(name, label)] = elapsed
                    result.accuracy[(name, label)] = accuracy(output, label)
        print(f"round {r} done, load avg {os.getloadavg()[0]:.2f}", flush=True)
    return result


def print_header(info: dict[str, Any], what: str, rounds: int) -> None:
    """The two lines above a component table: what ran, how, under which load, on which CPU."""
    info["load_avg_end"] = os.getloadavg()[0]
    print(f"\n# {what}, real size (random weights), {info['threads']} threads, {rounds} interleaved rounds (medians), "
          f"load avg {info['load_avg_start']:.2f} -> {info['load_avg_end']:.2f}")
    print(f"# {info['cpu']['model']} | flags {' '.join(info['cpu']['flags'])} | matmul fp32 "
          f"{info['matmul_gflops']['fp32']:.0f}, bf16 {info['matmul_gflops']['bf16']:.0f} GFLOP/s")
