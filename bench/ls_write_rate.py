"""Label Studio's write rate for predictions: ``backend/jobs/writer.write_predictions`` (bulk
``import/predictions`` in chunks, each checked against Label Studio first) on a fresh project of N
tasks, against a real Label Studio 1.23.2 (tests/ls_server.py, SQLite). This, not the GPUs, caps a
Ray cluster's throughput once there are a few of them (README "When one machine is not enough").

    LS_VENV=.venv-ls .venv/bin/python -m bench.ls_write_rate [--tasks 200] [--chunk 20]

Two mask sizes: a small one (64 x 48 image) and a real-size one (1024 x 768 image, a quarter of it
covered by an ellipse with a ragged edge, so its RLE is long as a real mask's is). Prints
predictions/second for each; the whole run is timed, the existence checks included.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from backend.jobs.writer import write_predictions
from backend.ls_api import Credentials, LabelStudioClient
from backend.ls_results import mask_to_rle
from tests.ls_server import LabelStudioServer, create_project
from tests.test_job_runner import CONFIG, LABELS


def ragged_ellipse(width: int, height: int, seed: int) -> np.ndarray:
    """A boolean mask: an ellipse over about a quarter of the image, its edge jittered per row."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy, rx, ry = width / 2, height / 2, width / 3.5, height / 3.5
    jitter = 1 + 0.05 * rng.standard_normal((height, 1))
    return np.asarray(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= jitter, dtype=bool)


def entry(width: int, height: int, seed: int, version: str) -> dict[str, object]:
    result = {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": width,
              "original_height": height, "image_rotation": 0, "score": 0.5,
              "value": {"format": "rle", "rle": mask_to_rle(ragged_ellipse(width, height, seed)),
                        "brushlabels": [LABELS[0]]}}
    return {"result": [result], "score": 0.5, "model_version": version}


def measure(ls: LabelStudioServer, tasks: int, chunk: int, width: int, height: int) -> float:
    """Predictions per second for ``tasks`` fresh tasks with masks of ``width`` x ``height``."""
    pid = create_project(ls, CONFIG, title=f"write-rate-{width}x{height}")
    body = [{"data": {"image": f"https://images.example/{i}.png"}} for i in range(tasks)]
    ids = ls.api("POST", f"/api/projects/{pid}/import?return_task_ids=true", json=body).json()["task_ids"]
    version = f"bench-{width}x{height}"
    entries = {int(task_id): entry(width, height, i, version) for i, task_id in enumerate(ids)}
    client = LabelStudioClient(Credentials(ls.url, ls.token))
    started = time.perf_counter()
    outcome = write_predictions(client, pid, entries, version, chunk)
    seconds = time.perf_counter() - started
    assert sorted(outcome.written) == sorted(entries) and not outcome.rejected, outcome
    return tasks / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=20, help="predictions per bulk request (the writer's default)")
    args = parser.parse_args(argv)
    with LabelStudioServer() as ls:
        for width, height in ((64, 48), (1024, 768)):
            rate = measure(ls, args.tasks, args.chunk, width, height)
            rle = len(mask_to_rle(ragged_ellipse(width, height, 0)))
            print(f"{width}x{height} masks (RLE {rle} numbers): {args.tasks} predictions in chunks of {args.chunk}: "
                  f"{rate:.1f} predictions/s ({rate * 3600:,.0f}/hour)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
