"""Soak: the real server on 127.0.0.1 (werkzeug, threaded) under rounds of concurrent /api/explain and
/api/segment requests, each with an image and prompt of its own (many more than the caches hold). The
process's resident memory must stay under a ceiling and stop growing. Bounded in count and time:
SOAK_ROUNDS (default 4) rounds of SOAK_CLIENTS (default 3) concurrent requests after a warm-up round:
~20 s on 2 idle cores (each request runs both models on a new image)."""

from __future__ import annotations

import gc
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from PIL import Image

from tests.test_memory import generated_photo
from tests.ui_servers import ThreadedBackend

MiB = 1 << 20
EMBEDDING_BUDGET = 80 * MiB  # one tiny-SAM image (~36 MiB with its attention matrix) per model half
EXPLANATION_BUDGET = 4 * MiB
# Decoding, encoding and the models' activations of the requests in flight, above the warm baseline.
WORKING_CEILING = 160 * MiB


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


def test_resident_memory_settles_under_concurrent_distinct_requests(engine):
    from backend.engine import Engine

    rounds = int(os.environ.get("SOAK_ROUNDS", "4"))
    clients = int(os.environ.get("SOAK_CLIENTS", "3"))
    soak_engine = Engine(engine.config.replace(
        max_detections=2, embedding_cache_bytes=EMBEDDING_BUDGET, explanation_cache_bytes=EXPLANATION_BUDGET,
        embedding_cache_size=1000, explanation_cache_size=1000,  # only the byte budgets bound them
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

        def round_of(index: int) -> int:
            with ThreadPoolExecutor(clients) as pool:
                sizes = list(pool.map(call, range(index * clients, (index + 1) * clients)))
            gc.collect()
            assert max(sizes) < 4 * MiB
            return resident_bytes()

        baseline = round_of(0)  # warm: models' first-run allocations, thread stacks, one image cached
        samples = [round_of(r) for r in range(1, rounds + 1)]

    grown = [round((s - baseline) / MiB) for s in samples]
    print(f"resident memory above the warm baseline, per round (MiB): {grown}")
    half = len(samples) // 2
    assert max(samples) - baseline < EMBEDDING_BUDGET + EXPLANATION_BUDGET + WORKING_CEILING, grown
    # Settled: the second half of the rounds grows little past the first half's peak.
    assert max(samples[half:]) - max(samples[:half]) < 48 * MiB, grown
    assert soak_engine._sam_embeddings.nbytes <= EMBEDDING_BUDGET // 2
    assert soak_engine._dino_features.nbytes <= EMBEDDING_BUDGET // 2
    assert soak_engine._explanations.nbytes <= EXPLANATION_BUDGET
    assert len(soak_engine._explanations) < clients * rounds  # the budget, not the count, bounded it
