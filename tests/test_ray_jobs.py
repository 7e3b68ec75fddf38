"""backend/jobs/ray_runner.py on a real local Ray cluster (2 CPUs) and a real Label Studio 1.23.2: a
40-task project predicted by a pool of 2 actors, each loading the tiny engine from the environment
as a cluster node would; the stored predictions are compared with ``predict_job_task`` run here. The
server with RAY_ADDRESS (backend/jobs/ray_server.py) runs a store's job on the same cluster from a
gunicorn process; a bad RAY_ADDRESS leaves it answering /health with the reason."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
import torch

from backend.jobs.db import job_tasks_table
from backend.jobs.ray_runner import (
    CRASH_TASKS_ENV,
    EXIT_AFTER_ENV,
    EXIT_MARKER_ENV,
    MAX_TASK_CRASHES,
    RaySettings,
    build_dataset,
    preannotate_on_ray,
    run_job_on_ray,
)
from backend.jobs.store import DONE, Job, JobStore
from backend.ls_api import Credentials, LabelStudioClient
from tests.gunicorn_backend import GunicornBackend
from tests.ls_server import LabelStudioServer, _free_port, create_project, import_files, list_tasks
from tests.photos import distinct_crops
from tests.test_job_runner import CONFIG, ENGINE_ENV, PLAN, new_job, tiny_model, without_ids
from tests.ui_servers import ThreadedBackend

ray = pytest.importorskip("ray")
from ray.util.annotations import RayDeprecationWarning  # noqa: E402 - after the importorskip

# Ray deprecations our calls trigger are errors here (Ray Data also logs some instead: see
# test_pipeline_uses_no_deprecated_ray_argument).
pytestmark = pytest.mark.filterwarnings("error::ray.util.annotations.RayDeprecationWarning")

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
           EXIT_AFTER_ENV: "10", EXIT_MARKER_ENV: str(marker), CRASH_TASKS_ENV: str(marker.parent / "crash-tasks")}
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
def model(tiny_cache: Path, label_studio: LabelStudioServer) -> Any:
    """The single-process model at the actors' thread count (Ray starts workers with OMP_NUM_THREADS=1):
    its own engine, since OpenVINO fixes a compiled graph's thread count when it compiles it, and a
    sum split over other threads may move a tiny model's near-tied box or mask edge."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tiny_model(Credentials(label_studio.url, label_studio.token), tiny_cache)
    finally:
        torch.set_num_threads(threads)


def stored_predictions(ls: LabelStudioServer, pid: int) -> dict[int, list[dict[str, Any]]]:
    return {t["id"]: t["predictions"] for t in list_tasks(ls, pid)}


def single_process_predictions(model: Any, job: Job, ls: LabelStudioServer, pid: int) -> dict[int, dict[str, Any]]:
    """``predict_job_task`` here, per task. Ray starts workers with OMP_NUM_THREADS=1 (fractional
    CPUs); torch sums in another order with more threads, which moves a mask's edge pixel now and then:
    predict at the actors' thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {t["id"]: model.predict_job_task(job, {"id": t["id"], "data": t["data"]}) for t in list_tasks(ls, pid)}
    finally:
        torch.set_num_threads(threads)


def assert_stored_equal_single_process(ls: LabelStudioServer, pid: int, expected_of: dict[int, dict[str, Any]],
                                       version: str) -> int:
    """Every task has exactly one prediction, of ``version``, equal to the single-process one; returns
    how many found something."""
    found = 0
    for task_id, predictions in stored_predictions(ls, pid).items():
        (prediction,) = predictions
        assert prediction["model_version"] == version
        expected = expected_of[task_id]
        assert without_ids(prediction["result"]) == without_ids(expected["result"]), task_id
        assert prediction["score"] == pytest.approx(expected["score"])
        found += bool(expected["result"])
    return found


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
    job = store.get_job(job_id)
    assert job is not None
    found = assert_stored_equal_single_process(ls, pid, single_process_predictions(model, job, ls, pid),
                                               model.model_version)
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


def test_task_that_kills_its_actor_every_time_fails_alone(
        cluster: Path, label_studio: LabelStudioServer, photos: list[Path], model: Any, tmp_path: Path) -> None:
    """Ray Data restarts a dead actor and retries its batch without bound: a task that kills the actor
    each time is failed after MAX_TASK_CRASHES, with the reason; its batch-mates are stored once."""
    ls = label_studio
    pid = create_project(ls, CONFIG, title="ray-poison")
    task_ids = import_files(ls, pid, photos[:4])
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    job_id = new_job(store, ls, pid, model.model_version)
    poison = task_ids[1]
    crashes = cluster.parent / "crash-tasks"
    crashes.write_text(str(poison))
    try:
        outcome = run_job_on_ray(store, job_id, SETTINGS, timeout=300)
    finally:
        crashes.write_text("")
    progress = store.progress(job_id)
    assert progress is not None and (progress.state, progress.done, progress.failed) == (DONE, 3, 1), progress
    assert f"died {MAX_TASK_CRASHES} times" in outcome.failed[poison], outcome
    stored = stored_predictions(ls, pid)
    assert stored[poison] == [] and all(len(stored[t]) == 1 for t in task_ids if t != poison), stored


SERVER_TASKS = 6


def test_server_with_ray_address_runs_a_store_job_on_the_cluster(
        cluster: Path, label_studio: LabelStudioServer, photos: list[Path], model: Any, tmp_path: Path) -> None:
    """gunicorn with RAY_ADDRESS = this cluster's head: a job created in the shared store is run by the
    cluster's actors (under the server's Ray job, not this test's), each task claimed once, and the
    stored predictions equal the single-process ones."""
    ls = label_studio
    pid = create_project(ls, CONFIG, title="ray-server")
    task_ids = import_files(ls, pid, photos[:SERVER_TASKS])
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    store = JobStore(url)
    address = ray.get_runtime_context().gcs_address
    backend = GunicornBackend({"RAY_ADDRESS": address, "JOBS_DB": url, "ENGINE_CONFIG": os.environ["ENGINE_CONFIG"],
                               **ENGINE_ENV, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token},
                              tmp_path / "gunicorn.log", drop=("DATA_DIR", "PREDICT_DEADLINE_S"))
    backend.start()
    try:
        health = backend.session.get(f"{backend.url}/health", timeout=10).json()
        assert health["model_version"] == model.model_version, health
        job_id = new_job(store, ls, pid, model.model_version)
        deadline = time.monotonic() + 300
        while not (progress := store.progress(job_id)) or not progress.finished:
            assert time.monotonic() < deadline, f"{progress}\n{backend.log_tail()}"
            time.sleep(0.5)
    finally:
        backend.stop()
    assert (progress.state, progress.done, progress.failed) == (DONE, SERVER_TASKS, 0), progress
    mine = ray.get_runtime_context().get_job_id()
    theirs = [a for a in ray._private.state.actors().values()
              if "PredictActor" in a["ActorClassName"] and a["JobID"] != mine]
    assert theirs, "no actor of the server's Ray job: the job did not run on the cluster"
    with store.engine.connect() as conn:  # each task claimed once: no second runner took it
        attempts = conn.execute(sa.select(job_tasks_table.c.attempts).where(
            job_tasks_table.c.job_id == job_id)).scalars().all()
    assert sorted(attempts) == [1] * SERVER_TASKS, attempts
    job = store.get_job(job_id)
    assert job is not None
    assert sorted(stored_predictions(ls, pid)) == task_ids
    assert_stored_equal_single_process(ls, pid, single_process_predictions(model, job, ls, pid), model.model_version)


@pytest.mark.parametrize("address", ["http://head:6379", "head", "127.0.0.1:{closed}"])
def test_bad_ray_address_is_named_in_health_and_the_log(
        engine: Any, tmp_path: Path, address: str, caplog: pytest.LogCaptureFixture) -> None:
    """A malformed or unreachable RAY_ADDRESS: the server answers /health at once, with the reason
    naming RAY_ADDRESS, and logs it; the store's jobs wait (none is run in-process instead)."""
    address = address.format(closed=_free_port())
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    store = JobStore(url)
    created = store.create_job("1", "v", [{"id": 1, "data": {"image": "http://x/1.png"}}], plan=PLAN,
                               label_config=CONFIG, credentials=Credentials("http://127.0.0.1:1", "key"))
    caplog.set_level(logging.ERROR, logger="backend.jobs.ray_server")
    with ThreadedBackend(engine, jobs_db=url, ray_address=address) as backend:
        deadline = time.monotonic() + 30
        while "jobs_problem" not in (body := requests.get(f"{backend.url}/health", timeout=10).json()):
            assert time.monotonic() < deadline, body
            time.sleep(0.1)
        backend.app.extensions["grounded_sam"].runner.stop()
    assert body["status"] == "UP" and f"RAY_ADDRESS={address!r}" in body["jobs_problem"], body
    assert any(f"RAY_ADDRESS={address!r}" in r.getMessage() for r in caplog.records), caplog.text
    assert created.job_id is not None
    progress = store.progress(created.job_id)
    assert progress is not None and progress.pending == 1 and progress.done == progress.failed == 0, progress


def test_pipeline_uses_no_deprecated_ray_argument(cluster: Path, label_studio: LabelStudioServer) -> None:
    """Building both pipelines (a store job's rows; the project's pages) raises no RayDeprecationWarning
    and logs no deprecation (Ray Data logs ``concurrency``'s instead of warning)."""
    ls = label_studio
    pid = create_project(ls, CONFIG, title="ray-deprecations")
    ls.api("POST", f"/api/projects/{pid}/import", json=[{"data": {"image": "https://images.example/1.png"}}])
    now = time.time()
    job = Job(id="deprecations", project=str(pid), model_version="v", plan=PLAN, label_config=CONFIG,
              credentials=Credentials(ls.url, ls.token), state="running", error=None, created=now, updated=now)
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append  # type: ignore[method-assign]
    ray_data = logging.getLogger("ray.data")  # does not propagate to the root logger
    ray_data.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RayDeprecationWarning)
            built = [build_dataset(job, SETTINGS, rows=[{"id": 1, "task": "{}", "written": False}]),
                     build_dataset(job, SETTINGS)]
    finally:
        ray_data.removeHandler(handler)
    assert all(ds is not None for ds in built), "a pipeline was not built: nothing was checked"
    deprecations = [r.getMessage() for r in logged if "deprecat" in r.getMessage().lower()]
    assert not deprecations, deprecations


def test_ray_address_setting_is_read_from_the_environment() -> None:
    from backend._wsgi import ServerSettings

    assert ServerSettings.from_env({"RAY_ADDRESS": " head:6379 "}).ray_address == "head:6379"
    assert ServerSettings.from_env({"RAY_ADDRESS": " "}).ray_address is None
    assert ServerSettings.from_env({}).ray_address is None


@pytest.mark.parametrize("form", ["{host}:{port}", "ray://{host}:{port}"])
def test_reachable_ray_address_forms_pass_the_check(form: str) -> None:
    import socket

    from backend.jobs.ray_server import check_ray_address

    for host, family in (("127.0.0.1", socket.AF_INET), ("[::1]", socket.AF_INET6)):
        try:
            listener = socket.socket(family)
            listener.bind((host.strip("[]"), 0))
        except OSError:  # no IPv6 loopback here
            continue
        with listener:
            listener.listen()
            check_ray_address(form.format(host=host, port=listener.getsockname()[1]))  # raises if refused
    for keyword in ("auto", "local"):
        check_ray_address(keyword)


def test_runner_outlives_a_connect_failure_that_is_not_an_address_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray failing to import (once seen: ``No module named 'psutil'``, after another thread's
    ``sys.path.pop(0)`` took Ray's vendored packages off the path) is named in ``problem`` with
    RAY_ADDRESS and retried; the thread lives on and the problem clears once connecting works."""
    from backend.jobs import ray_server

    attempts: list[str] = []

    def connect(address: str) -> None:
        attempts.append(address)
        if len(attempts) == 1:
            raise ModuleNotFoundError("No module named 'psutil'")

    monkeypatch.setattr(ray_server, "connect_ray", connect)
    monkeypatch.setattr(ray_server, "RECONNECT_S", (0.5,))
    address = "127.0.0.1:6379"
    runner = ray_server.RayJobRunner(JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}"), address,
                                     settings=RaySettings(address=address), poll_s=0.05)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while (problem := runner.problem) is None:
            assert time.monotonic() < deadline and runner.running, "no problem reported"
            time.sleep(0.01)
        assert f"RAY_ADDRESS={address!r}" in problem and "ModuleNotFoundError" in problem and "psutil" in problem
        while runner.problem is not None or len(attempts) < 2:
            assert time.monotonic() < deadline, (runner.problem, attempts)
            time.sleep(0.01)
        assert runner.running
    finally:
        runner.stop()
    assert attempts == [address, address]
