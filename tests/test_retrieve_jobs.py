"""Issue 11, proven end to end: "Retrieve predictions" of more tasks than Label Studio waits for.

A real Label Studio 1.23.2 with a short ``ML_TIMEOUT_PREDICT`` drives the backend as a real gunicorn
process with a shorter ``PREDICT_DEADLINE_S`` and a job store in its ``DATA_DIR``. /predict answers
what it reached by its deadline and hands the rest to a background job, which writes them through
Label Studio's API. The backend has no LABEL_STUDIO_API_KEY: the key is the one Label Studio sends in
/setup, kept in the shared database. Expected masks come from the same tiny engine run in this process
on the same bytes with the same plan. The job store is read directly (``JobStore`` on the backend's
``DATA_DIR/jobs.sqlite3``) and through the backend's ``GET /api/jobs/<id>``.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from backend.jobs.store import DONE, FAILED, JobProgress, JobStore
from tests.gunicorn_backend import GunicornBackend
from tests.ls_server import (
    DEFAULT_VENV,
    LabelStudioServer,
    connect_ml_backend,
    create_project,
    import_files,
    label_studio_installed,
    list_predictions,
    list_tasks,
    retrieve_predictions,
)

LABELS = ("tabby cat", "coffee cup")
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
          + "".join(f'<Label value="{x}"/>' for x in LABELS) + "</BrushLabels></View>")
# Label Studio gives up on a /predict after LS_TIMEOUT_S; the backend answers by DEADLINE_S.
LS_TIMEOUT_S = 15
# A task already started is finished, so the margin is one task on a loaded machine plus Label Studio's own work.
# Short, and every test that needs a job has 20 or more tasks, so the work outlasts the deadline on a fast idle
# machine too: a tiny task took ~0.3 s on an idle AMX Xeon, and 12 tasks once fitted in a 4 s deadline (no job).
DEADLINE_S = 1
ENGINE_ENV = {"BOX_THRESHOLD": "0.2", "TEXT_THRESHOLD": "0.2", "MAX_DETECTIONS": "1"}
SIDE = 128  # small images: a tiny-model task costs ~0.3-2 s on a loaded 2-core machine
WAIT_S = 300  # the bound on any job to finish
# The job store and deadline are set by each test's env, never inherited.
JOB_SETTINGS = ("DATA_DIR", "JOBS_DB", "PREDICT_DEADLINE_S")


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ls() -> Iterator[LabelStudioServer]:
    """One Label Studio for the module, with the short predict timeout (not the session's shared one)."""
    if not label_studio_installed(DEFAULT_VENV):
        if os.environ.get("REQUIRE_LABEL_STUDIO", "") not in ("", "0"):
            pytest.fail(f"REQUIRE_LABEL_STUDIO is set but Label Studio is not installed in {DEFAULT_VENV}")
        pytest.skip(f"Label Studio is not installed in {DEFAULT_VENV}; run scripts/install_label_studio.sh")
    with LabelStudioServer(extra_env={"ML_TIMEOUT_PREDICT": str(LS_TIMEOUT_S)}) as server:
        yield server


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobs-data")


@pytest.fixture(scope="module")
def store(data_dir: Path) -> Iterator[JobStore]:
    """The backends' job store, read (and only read) by the tests."""
    jobs = JobStore(f"sqlite:///{data_dir / 'jobs.sqlite3'}")
    yield jobs
    jobs.close()


def backend_env(tiny_cache: Path, data_dir: Path) -> dict[str, str]:
    # No LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY: the URL and key are what /setup brought.
    return {"ENGINE_CONFIG": str(tiny_cache / "engine.json"), **ENGINE_ENV, "DATA_DIR": str(data_dir),
            "PREDICT_DEADLINE_S": str(DEADLINE_S)}


@pytest.fixture(scope="module")
def backend(tiny_cache: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornBackend]:
    server = GunicornBackend(backend_env(tiny_cache, data_dir), tmp_path_factory.mktemp("gunicorn") / "a.log",
                             drop=JOB_SETTINGS).start()
    warm_up(server)
    yield server
    server.kill()


class Crops:
    """Small PNGs cut from one photo, each at a place no earlier one was cut (the engine caches image
    features by content: a repeated image would cost the backend almost nothing)."""

    def __init__(self) -> None:
        import skimage.data

        self.photo = skimage.data.chelsea()  # 300 x 451
        self.made = 0

    def fresh(self, count: int) -> list[bytes]:
        out = []
        for i in range(self.made, self.made + count):
            # 172 and 323 are coprime, and 37, 71 invertible modulo them: every i gets its own (y, x).
            y, x = (i * 37) % (self.photo.shape[0] - SIDE), (i * 71) % (self.photo.shape[1] - SIDE)
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(self.photo[y:y + SIDE, x:x + SIDE])).save(buffer, format="PNG")
            out.append(buffer.getvalue())
        self.made += count
        return out


@pytest.fixture(scope="module")
def crops() -> Crops:
    return Crops()


@pytest.fixture(scope="module")
def reference(engine: Any, tiny_cache: Path) -> Callable[[bytes, tuple[str, ...]], list[tuple[str, np.ndarray]]]:
    """(label, mask) of each non-empty segment the backend's engine makes of an image, memoised."""
    from backend.config import EngineConfig
    from backend.engine import Engine

    config = EngineConfig.from_env({"ENGINE_CONFIG": str(tiny_cache / "engine.json"), **ENGINE_ENV})
    same = Engine(config, detector=engine.detector, segmenter=engine.segmenter)
    memo: dict[tuple[bytes, tuple[str, ...]], list[tuple[str, np.ndarray]]] = {}

    def segments(image: bytes, phrases: tuple[str, ...] = LABELS) -> list[tuple[str, np.ndarray]]:
        if (image, phrases) not in memo:
            memo[image, phrases] = [(s.label, s.mask) for s in same.segment(image, list(phrases)) if s.mask.any()]
        return memo[image, phrases]

    return segments


# -- helpers ------------------------------------------------------------------------------------------------
def warm_up(backend: GunicornBackend) -> None:
    """One prediction, so the first task of a test isn't also the process's first inference (several
    times slower on a loaded machine): a task already started always finishes, deadline or not."""
    import base64

    buffer = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (120, 90, 60)).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    answer = backend.post("/predict", {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": CONFIG})
    assert answer.status_code == 200 and "result" in answer.json()["results"][0], answer.text


def upload_tasks(ls: LabelStudioServer, pid: int, crops: Crops, count: int, folder: Path) -> dict[int, bytes]:
    """``count`` upload tasks, each with an image of its own: {task id: image bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(crops.fresh(count)):
        path = folder / f"p{pid}-{i:03d}.png"
        path.write_bytes(image)
        paths.append(path)
    ids = import_files(ls, pid, paths)
    return {task_id: path.read_bytes() for task_id, path in zip(ids, paths, strict=True)}


def connect(ls: LabelStudioServer, backend: GunicornBackend, title: str, count: int, crops: Crops,
            folder: Path) -> tuple[int, dict[int, bytes]]:
    pid = create_project(ls, CONFIG, title=title)
    tasks = upload_tasks(ls, pid, crops, count, folder)
    ml = connect_ml_backend(ls, pid, backend.url, title="grounded-sam")
    assert ml["state"] == "CO", ml
    return pid, tasks


def model_version(backend: GunicornBackend) -> str:
    return str(backend.session.get(f"{backend.url}/health", timeout=10).json()["model_version"])


def timed_retrieve(ls: LabelStudioServer, pid: int) -> float:
    started = time.monotonic()
    answer = retrieve_predictions(ls, pid)
    elapsed = time.monotonic() - started
    assert "Retrieved" in str(answer), answer
    return elapsed


def project_jobs(store: JobStore, pid: int) -> list[JobProgress]:
    return store.list_jobs(project=str(pid))


def wait_jobs_finished(store: JobStore, pid: int, backend: GunicornBackend,
                       timeout: float = WAIT_S) -> list[JobProgress]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = project_jobs(store, pid)
        if jobs and all(job.finished for job in jobs):
            return jobs
        assert time.monotonic() < deadline, (f"jobs of project {pid} not finished in {timeout:.0f} s: {jobs}\n"
                                             f"{backend.log_tail()}")
        time.sleep(0.5)


def predictions_by_task(ls: LabelStudioServer, pid: int) -> dict[int, list[dict[str, Any]]]:
    return {int(t["id"]): t["predictions"] for t in list_tasks(ls, pid)}


def decode_brush(result: dict[str, Any]) -> np.ndarray:
    from label_studio_sdk.converter.brush import decode_rle

    h, w = result["original_height"], result["original_width"]
    return decode_rle(result["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def assert_engine_masks(prediction: dict[str, Any], expected: list[tuple[str, np.ndarray]], where: str) -> None:
    brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
    assert [r["value"]["brushlabels"] for r in brushes] == [[label] for label, _ in expected], where
    for result, (label, mask) in zip(brushes, expected, strict=True):
        decoded = decode_brush(result)
        assert decoded.shape == mask.shape, where
        assert np.array_equal(decoded, mask), (where, label, int((decoded != mask).sum()))


def assert_one_prediction_each(stored: dict[int, list[dict[str, Any]]], tasks: dict[int, bytes], version: str,
                               backend: GunicornBackend) -> None:
    assert sorted(stored) == sorted(tasks)
    counts = {task_id: [p["model_version"] for p in predictions] for task_id, predictions in stored.items()}
    assert all(versions == [version] for versions in counts.values()), (counts, backend.log_tail())


def wait_all_predicted(ls: LabelStudioServer, pid: int, backend: GunicornBackend,
                       timeout: float = WAIT_S) -> dict[int, list[dict[str, Any]]]:
    deadline = time.monotonic() + timeout
    while True:
        stored = predictions_by_task(ls, pid)
        if all(stored.values()):
            return stored
        assert time.monotonic() < deadline, (f"{sum(1 for p in stored.values() if not p)} task(s) still without "
                                             f"a prediction after {timeout:.0f} s\n{backend.log_tail()}")
        time.sleep(0.5)


# -- the tests ------------------------------------------------------------------------------------------------
def test_big_retrieve_answers_in_time_and_the_job_stores_every_task_once(
        ls: LabelStudioServer, backend: GunicornBackend, store: JobStore, crops: Crops, reference: Any,
        tmp_path: Path) -> None:
    pid, tasks = connect(ls, backend, "jobs-big", 20, crops, tmp_path)
    version = model_version(backend)

    elapsed = timed_retrieve(ls, pid)
    assert elapsed < LS_TIMEOUT_S, (f"Retrieve took {elapsed:.1f} s, over ML_TIMEOUT_PREDICT={LS_TIMEOUT_S}\n"
                                    f"{backend.log_tail(30)}")
    assert "Read timed out" not in ls.log_tail(400)
    (job,) = project_jobs(store, pid)  # the tasks /predict did not reach are a job's
    answered = sum(1 for predictions in predictions_by_task(ls, pid).values() if predictions)
    assert job.total == len(tasks) - answered > 0, (job, answered)
    assert job.model_version == version

    stored = wait_all_predicted(ls, pid, backend)
    (job,) = wait_jobs_finished(store, pid, backend)
    assert (job.state, job.done, job.failed) == (DONE, job.total, 0), job
    assert_one_prediction_each(stored, tasks, version, backend)
    for task_id, image in tasks.items():
        assert_engine_masks(stored[task_id][0], reference(image), f"task {task_id}")

    # Every task has a prediction of this version: Label Studio asks for nothing, nothing is added.
    before = len(list_predictions(ls, pid))
    timed_retrieve(ls, pid)
    assert len(list_predictions(ls, pid)) == before == len(tasks)
    assert len(project_jobs(store, pid)) == 1


def test_backend_killed_mid_job_finishes_it_after_a_restart(
        ls: LabelStudioServer, backend: GunicornBackend, store: JobStore, crops: Crops, tmp_path: Path) -> None:
    pid, tasks = connect(ls, backend, "jobs-kill", 20, crops, tmp_path)
    version = model_version(backend)
    timed_retrieve(ls, pid)
    (job,) = project_jobs(store, pid)
    deadline = time.monotonic() + WAIT_S
    while (progress := store.progress(job.id)) is not None and progress.running == 0:  # wait for a claim
        assert not progress.finished, "the job ended before it could be killed"
        assert time.monotonic() < deadline, backend.log_tail()
        time.sleep(0.1)
    backend.kill()
    killed = store.progress(job.id)
    assert killed is not None and not killed.finished and killed.running > 0, killed

    backend.start()  # same port, same DATA_DIR: the job resumes, the dead worker's claims come back
    stored = wait_all_predicted(ls, pid, backend)
    (job,) = wait_jobs_finished(store, pid, backend)
    assert (job.state, job.done, job.failed) == (DONE, job.total, 0), job
    assert_one_prediction_each(stored, tasks, version, backend)
    assert any("resuming" in line and job.id in line for line in backend.log().splitlines()), backend.log_tail()


def test_unreachable_image_is_recorded_and_predicted_by_a_later_retrieve_after_the_fix(
        ls: LabelStudioServer, backend: GunicornBackend, store: JobStore, crops: Crops, reference: Any,
        tmp_path: Path) -> None:
    pid, tasks = connect(ls, backend, "jobs-missing", 20, crops, tmp_path)
    version = model_version(backend)
    # The last task (the last /predict reaches) points at an upload that doesn't exist.
    missing = int(ls.api("POST", f"/api/projects/{pid}/import?return_task_ids=true",
                         json=[{"image": f"/data/upload/{pid}/no-such-file.png"}]).json()["task_ids"][0])
    timed_retrieve(ls, pid)
    (job,) = wait_jobs_finished(store, pid, backend)
    stored = predictions_by_task(ls, pid)
    assert stored[missing] == []
    assert job.failed == 1 and job.done == job.total - 1, job
    (error,) = job.errors
    assert error.task_id == missing and error.state == FAILED, error
    assert error.error.startswith("image download failed: HTTP 40") and error.attempts == 3, error
    shown = backend.session.get(f"{backend.url}/api/jobs/{job.id}", timeout=10).json()
    assert shown["errors"] == [{"task": missing, "state": FAILED, "attempts": 3, "error": error.error}], shown

    source = next(t for t in list_tasks(ls, pid) if t["id"] != missing)
    ls.api("PATCH", f"/api/tasks/{missing}", json={"data": {"image": source["data"]["image"]}})
    timed_retrieve(ls, pid)  # the failed task is no longer held by a job: /predict takes it
    stored = predictions_by_task(ls, pid)
    assert_one_prediction_each(stored, {**tasks, missing: tasks[source["id"]]}, version, backend)
    assert_engine_masks(stored[missing][0], reference(tasks[source["id"]]), f"task {missing}")


def test_setup_on_one_backend_serves_predict_on_another_sharing_the_data_dir(
        ls: LabelStudioServer, backend: GunicornBackend, tiny_cache: Path, data_dir: Path, crops: Crops,
        reference: Any, tmp_path: Path) -> None:
    pid = create_project(ls, CONFIG, title="jobs-replicas")
    ((task_id, image),) = upload_tasks(ls, pid, crops, 1, tmp_path).items()
    task = ls.api("GET", f"/api/tasks/{task_id}").json()
    other = GunicornBackend(backend_env(tiny_cache, data_dir), tmp_path / "b.log", drop=JOB_SETTINGS).start()
    try:
        setup = backend.post("/setup", {"project": f"{pid}.1700000000", "schema": CONFIG, "hostname": ls.url,
                                        "access_token": ls.token, "extra_params": {"prompt": "coffee cup"}})
        assert setup.status_code == 200, setup.text
        # The other replica never saw /setup: the schema, the prompt and the key come from the database.
        answer = other.post("/predict", {"tasks": [task], "project": f"{pid}.1700000000"})
        assert answer.status_code == 200, (answer.text, other.log_tail())
        body = answer.json()
        assert "errors" not in body, body
        (entry,) = body["results"]
        assert_engine_masks(entry, reference(image, ("coffee cup",)), "the other replica's prediction")
        assert entry["result"], "no mask: the comparison above proved nothing"
    finally:
        other.kill()


def test_job_with_a_wrong_key_stops_with_a_clear_error_and_does_not_spin(
        ls: LabelStudioServer, backend: GunicornBackend, store: JobStore, crops: Crops) -> None:
    import base64

    pid = create_project(ls, CONFIG, title="jobs-wrong-key")
    # More than the deadline lets /predict reach: the job stops before predicting any.
    inline = [{"image": "data:image/png;base64," + base64.b64encode(image).decode()} for image in crops.fresh(24)]
    ids = ls.api("POST", f"/api/projects/{pid}/import?return_task_ids=true", json=inline).json()["task_ids"]
    tasks = [ls.api("GET", f"/api/tasks/{task_id}").json() for task_id in ids]
    wrong = "wrong-key-" + os.urandom(8).hex()
    setup = backend.post("/setup", {"project": str(pid), "schema": CONFIG, "hostname": ls.url, "access_token": wrong})
    assert setup.status_code == 200, setup.text
    started = time.monotonic()
    answer = backend.post("/predict", {"tasks": tasks, "project": str(pid), "label_config": CONFIG})
    elapsed = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert "job" in answer.json(), (f"all {len(tasks)} tasks done before the deadline in {elapsed:.1f} s: nothing to "
                                    f"prove; {[sorted(e) for e in answer.json()['results']]}\n{backend.log_tail(20)}")
    job_id = answer.json()["job"]["id"]  # the images are inline: only the job needs Label Studio

    (job,) = wait_jobs_finished(store, pid, backend, timeout=120)
    assert job.id == job_id and job.state == FAILED, job
    deadline = time.monotonic() + 30
    while job.running:  # the runner hands back what it had claimed, untried
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
        job = store.list_jobs(project=str(pid))[0]
    assert job.error and "401" in job.error, job.error
    assert wrong not in (job.error or "") and wrong not in backend.log()
    assert f"job {job_id} (project {pid}) stopped" in backend.log()
    shown = backend.session.get(f"{backend.url}{answer.json()['job']['progress']}", timeout=10).json()
    assert (shown["state"], shown["error"]) == (FAILED, job.error), shown  # what a person sees
    # Stopped for good: a few runner polls later nothing about it has moved and nothing was logged.
    runner_lines = re.compile(rf"job {job_id} \(project|job {job_id}: ")  # the runner's, not /predict's
    lines = len(runner_lines.findall(backend.log()))
    time.sleep(5)
    later = store.progress(job_id)
    assert later is not None and (later.state, later.updated, later.pending, later.running) == (
        job.state, job.updated, job.pending, job.running), (job, later)
    assert len(runner_lines.findall(backend.log())) == lines, [
        line for line in backend.log().splitlines() if job_id in line]
    assert list_predictions(ls, pid) == []
