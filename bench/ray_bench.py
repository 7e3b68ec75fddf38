"""Throughput of a prediction job: the one-process JobRunner against the Ray path (1 and 2 actors) on
the same tasks, with the tiny random-weight engine, a real Label Studio 1.23.2 and a local Ray cluster.

    TINY_MODEL_CACHE=/work/tiny_cache HF_HUB_OFFLINE=1 .venv/bin/python -m bench.ray_bench [--tasks 40]

Each run gets a fresh project with the same images (so none is skipped) and is timed from the start of
the run to the last prediction stored, engine loading included on both sides (Ray's actors load theirs
inside the run; the one-process runner builds its model inside the timed part too).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from backend.jobs.ray_runner import RaySettings, run_job_on_ray
from backend.jobs.runner import JobRunner
from backend.jobs.store import JobStore
from backend.ls_api import Credentials
from tests.ls_server import LabelStudioServer, create_project, import_files, list_predictions
from tests.photos import distinct_crops
from tests.test_job_runner import CONFIG, ENGINE_ENV, client_factory, new_job, tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the one-process run (Ray starts its workers with 1)")
    args = parser.parse_args(argv)
    cache = Path(os.environ["TINY_MODEL_CACHE"])
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "ENGINE_CONFIG": str(cache / "engine.json"), **ENGINE_ENV})
    import ray

    with tempfile.TemporaryDirectory() as tmp, LabelStudioServer() as ls:
        photos = distinct_crops(Path(tmp), args.tasks)
        store = JobStore(f"sqlite:///{tmp}/jobs.sqlite3")
        credentials = Credentials(ls.url, ls.token)
        figures: dict[str, float] = {}

        def fresh(title: str) -> tuple[int, str]:
            pid = create_project(ls, CONFIG, title=title)
            import_files(ls, pid, photos)
            return pid, new_job(store, ls, pid, tiny_model(credentials, cache).model_version)

        pid, job = fresh("bench-one-process")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        started = time.perf_counter()
        model = tiny_model(credentials, cache)
        JobRunner(store, model.predict_job_task, client_factory).run_job(job)
        figures["one process (JobRunner)"] = time.perf_counter() - started
        assert len(list_predictions(ls, pid)) == args.tasks

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for actors in (1, 2):
                pid, job = fresh(f"bench-ray-{actors}")
                started = time.perf_counter()
                run_job_on_ray(store, job, RaySettings(num_actors=actors, batch_size=5, chunk_size=5, page_size=10))
                figures[f"Ray, {actors} actor(s)"] = time.perf_counter() - started
                assert len(list_predictions(ls, pid)) == args.tasks
        finally:
            ray.shutdown()
    base = figures["one process (JobRunner)"]
    print(f"{args.tasks} tasks, 64x64 px, tiny engine, Label Studio 1.23.2 on the same host")
    for name, seconds in figures.items():
        print(f"  {name:26s} {seconds:6.1f} s  {args.tasks / seconds:5.2f} tasks/s  {seconds / base - 1:+.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
