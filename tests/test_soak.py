"""Soak: the real server on 127.0.0.1 (werkzeug, threaded) under rounds of concurrent /api/explain and
/api/segment requests, each with an image and prompt of its own (many more than the caches hold). The
process's resident memory must stay under a ceiling and stop growing. Bounded in count and time:
SOAK_ROUNDS (default 4) rounds of SOAK_CLIENTS (default 3) concurrent requests after a warm-up round:
~20 s on 2 idle cores (each request runs both models on a new image).

It runs in a process of its own (a child pytest). The engine keeps freed memory for reuse
(backend/heap.py) but no more than FREED_MEMORY_KEPT of it (64 MiB here): fragmentation grew
resident memory round after round before that bound."""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from backend.heap import resident_free_heap_bytes
from tests.test_memory import generated_photo
from tests.ui_servers import ThreadedBackend

MiB = 1 << 20
EMBEDDING_BUDGET = 80 * MiB  # one tiny-SAM image (~36 MiB with its attention matrix) per model half
EXPLANATION_BUDGET = 4 * MiB
# Python objects, thread stacks and OpenVINO's per-shape state, above the warm baseline and the bounds.
SLACK = 48 * MiB
IN_OWN_PROCESS = "SOAK_IN_OWN_PROCESS"  # set in the child process that runs the soak itself
# Small, so that the bound is what settles the heap here (auto would allow ~300 MiB on the tiny models).
FREED_KEPT = 64 * MiB


def resident_bytes() -> int:
    """This process's resident set size (VmRSS), from /proc: the server runs in its threads."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def test_resident_memory_settles_under_concurrent_distinct_requests(request, tiny_cache):
    """Run in a process of its own: what is measured is a server's memory, not that of a test
    session whose earlier tests left their own allocations and holes in the same heap."""
    if os.environ.get(IN_OWN_PROCESS) != "1":
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", f"{__file__}::{request.node.name}"],
            env={**os.environ, IN_OWN_PROCESS: "1", "TINY_MODEL_CACHE": str(tiny_cache)},
            cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=900)
        report = "\n".join(line for line in run.stdout.splitlines() if "resident memory" in line or "Error" in line)
        print(report)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        return
    _soak(request.getfixturevalue("engine"))


def _soak(engine) -> None:
    from backend.engine import Engine

    rounds = int(os.environ.get("SOAK_ROUNDS", "4"))
    clients = int(os.environ.get("SOAK_CLIENTS", "3"))
    soak_engine = Engine(engine.config.replace(
        max_detections=2, embedding_cache_bytes=EMBEDDING_BUDGET, explanation_cache_bytes=EXPLANATION_BUDGET,
        embedding_cache_size=1000, explanation_cache_size=1000,  # only the byte budgets bound them
        freed_memory_kept=FREED_KEPT,
    ), detector=engine.detector, segmenter=engine.segmenter)
    images = [png(generated_photo(1200, 800, seed)) for seed in range(clients * (rounds + 1))]

    with ThreadedBackend(soak_engine) as backend, requests.Session() as session:
        def call(i: int) -> int:
            route = "/api/explain" if i % 2 == 0 else "/api/segment"
            response = session.post(backend.url + route, files={"image": ("photo.png", images[i])},
                                    data={"prompt": f"person . flag{i}", "box_threshold": "0",
                                          "text_threshold": "0"}, timeout=120)
            assert response.status_code == 200, response.text[:300]
            return len(response.content)

        free_after: list[int] = []

        def round_of(index: int) -> int:
            with ThreadPoolExecutor(clients) as pool:
                sizes = list(pool.map(call, range(index * clients, (index + 1) * clients)))
            gc.collect()
            assert max(sizes) < 4 * MiB
            free_after.append(resident_free_heap_bytes() or 0)
            return resident_bytes()

        baseline = round_of(0)  # warm: models' first-run allocations, thread stacks, one image cached
        samples = [round_of(r) for r in range(1, rounds + 1)]

    grown = [round((s - baseline) / MiB) for s in samples]
    assert soak_engine.freed_memory is not None and soak_engine.freed_memory.limit == FREED_KEPT
    kept = FREED_KEPT
    print(f"resident memory above the warm baseline, per round (MiB): {grown}; freed and resident in the heap (MiB): "
          f"{[round(f / MiB) for f in free_after]}, kept at most {kept // MiB} MiB, "
          f"handed back {soak_engine.freed_memory.trims} times")
    # Settled: what the heap keeps free stays under its bound after every round (tasks end by handing
    # back what is over it; the slack is the requests' answers, encoded after their task ended) ...
    assert max(free_after[1:]) < kept + SLACK, [round(f / MiB) for f in free_after]  # [0]: the warm round
    # ... so resident memory is bounded by the caches' budgets and that bound.
    assert max(samples) - baseline < EMBEDDING_BUDGET + EXPLANATION_BUDGET + kept + SLACK, grown
    assert soak_engine._sam_embeddings.nbytes <= EMBEDDING_BUDGET // 2
    assert soak_engine._dino_features.nbytes <= EMBEDDING_BUDGET // 2
    assert soak_engine._explanations.nbytes <= EXPLANATION_BUDGET
    assert len(soak_engine._explanations) < clients * rounds  # the budget, not the count, bounded it
