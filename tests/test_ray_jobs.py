"""backend/jobs/ray_runner.py on a real local Ray cluster (2 CPUs) and a real Label Studio 1.23.2: a
40-task project predicted by a pool of 2 actors, each loading the tiny engine from the environment
as a cluster node would; the stored predictions are compared with ``predict_job_task`` run here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from backend.jobs.ray_runner import EXIT_AFTER_ENV, EXIT_MARKER_ENV, RaySettings, preannotate_on_ray, run_job_on_ray
from backend.jobs.store import DONE, JobStore
from backend.ls_api import Credentials, LabelStudioClient
from tests.ls_server import LabelStudioServer, create_project, import_files, list_tasks
from tests.photos import distinct_crops
from tests.test_job_runner import CONFIG, ENGINE_ENV, new_job, tiny_model, without_ids

ray = pytest.importorskip("ray")

TASKS = 40
# Batches of 5 over pages of 10: the two actors share the project, and a kill loses a batch mid-run.
SETTINGS = RaySettings(num_actors=2, batch_size=5, chunk_size=5, page_size=10)


@pytest.fixture(scope="module")
def cluster(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local cluster whose workers inherit the engine's environment; yields the fault-injection marker
    (while it exists, no actor exits)."""
    marker = tmp_path_factory.mktemp("ray") / "exited"
    marker.touch()
    env = {"RAY_USAGE_STATS_ENABLED": "0", "ENGINE_CONFIG": str(tiny_cache / "engine.json"), **ENGINE_ENV,
           EXIT_AFTER_ENV: "10", EXIT_MARKER_ENV: str(marker)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield marker
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """40 small distinct images: crops of three photos at different places and sizes."""
    return distinct_crops(tmp_path_factory.mktemp("ray-photos"), TASKS)


@pytest.fixture(scope="module")
def model(engine: Any, tiny_cache: Path, label_studio: LabelStudioServer) -> Any:
    return tiny_model(Credentials(label_studio.url, label_studio.token), tiny_cache, engine)


def stored_predictions(ls: LabelStudioServer, pid: int) -> dict[int, list[dict[str, Any]]]:
    return {t["id"]: t["predictions"] for t in list_tasks(ls, pid)}


def test_actor_pool_stores_what_the_single_process_path_predicts_once_per_task(
        cluster: Path, label_studio: LabelStudioServer, photos: list[Path], model: Any, tmp_path: Path) -> None:
    ls = label_studio
    pid = create_project(ls, CONFIG, title="ray-equal")
    task_ids = import_files(ls, pid, photos)
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    job_id = new_job(store, ls, pid, model.model_version)

    outcome = run_job_on_ray(store, job_id, SETTINGS, timeout=300)

    progress = store.progress(job_id)
    assert progress is not None and (progress.state, progress.done, progress.failed) == (DONE, TASKS, 0), progress
    assert sorted(outcome.written) == task_ids and not outcome.failed and not outcome.retry
    stored = stored_predictions(ls, pid)
    job = store.get_job(job_id)
    assert job is not None
    found = 0
    # Ray starts workers with OMP_NUM_THREADS=1 (fractional CPUs); torch sums in another order with
    # more threads, which moves a mask's edge pixel now and then: compare at the actors' thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected_of = {t["id"]: model.predict_job_task(job, {"id": t["id"], "data": t["data"]})
                       for t in list_tasks(ls, pid)}
    finally:
        torch.set_num_threads(threads)
    for task in list_tasks(ls, pid):
        (prediction,) = stored[task["id"]]
        assert prediction["model_version"] == model.model_version
        expected = expected_of[task["id"]]
        assert without_ids(prediction["result"]) == without_ids(expected["result"]), task["id"]
        assert prediction["score"] == pytest.approx(expected["score"])
        found += bool(expected["result"])
    assert found >= TASKS // 4, f"the engine found something in only {found} tasks: the test proves little"

    # Run again without a job, as `preannotate --ray` does (plan from the project's labels, the driver's
    # model version): every task is skipped, nothing is stored twice.
    again = preannotate_on_ray(model, LabelStudioClient(Credentials(ls.url, ls.token)), pid, SETTINGS)
    assert sorted(again.skipped) == task_ids and again.written == [] and again.stopped is None
    assert all(len(p) == 1 for p in stored_predictions(ls, pid).values())


def test_actor_killed_mid_run_loses_and_duplicates_nothing(
        cluster: Path, label_studio: LabelStudioServer, photos: list[Path], model: Any, tmp_path: Path) -> None:
    """An actor exits (os._exit) after writing its second batch and before answering: Ray restarts it
    and retries the batch, which finds its predictions already stored."""
    ls = label_studio
    pid = create_project(ls, CONFIG, title="ray-kill")
    task_ids = import_files(ls, pid, photos)
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    job_id = new_job(store, ls, pid, model.model_version)
    cluster.unlink()  # arm the fault: the first actor to reach 10 tasks exits

    outcome = run_job_on_ray(store, job_id, SETTINGS, timeout=300)

    assert cluster.exists(), "no actor exited: the fault was not injected"
    progress = store.progress(job_id)
    assert progress is not None and (progress.state, progress.done, progress.failed) == (DONE, TASKS, 0), progress
    assert sorted(outcome.written + outcome.skipped) == task_ids
    assert outcome.skipped, "the retried batch should have found its predictions stored"
    stored = stored_predictions(ls, pid)
    assert sorted(stored) == task_ids
    assert all(len(p) == 1 and p[0]["model_version"] == model.model_version for p in stored.values()), stored
