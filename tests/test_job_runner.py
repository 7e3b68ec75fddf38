"""backend/jobs/runner.py end to end: a real Label Studio 1.23.2 (started once), a job store on a temp
SQLite file, and the tiny random-weight engine predicting through the server's own code
(``GroundedSamModel.load_task`` + ``predict_task``), images downloaded from Label Studio with the key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from backend.jobs.runner import JobRunner
from backend.jobs.store import CANCELLED, DONE, FAILED, RUNNING, Job, JobProgress, JobStore, JsonObject
from backend.label_config import parse_label_config
from backend.ls_api import ClientRegistry, Credentials, LabelStudioClient, LabelStudioError
from backend.prompts import PromptPlan
from tests.ls_server import REPO_ROOT, LabelStudioServer, create_project, import_files, list_predictions, list_tasks
from tests.photos import photo_files

LABELS = ("tabby cat", "coffee cup")
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
          + "".join(f'<Label value="{x}"/>' for x in LABELS) + "</BrushLabels></View>")
ENGINE_ENV = {"BOX_THRESHOLD": "0.2", "TEXT_THRESHOLD": "0.2", "MAX_DETECTIONS": "2"}
PLAN = {"phrases": list(LABELS), "box_threshold": 0.2, "text_threshold": 0.2}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return photo_files(tmp_path_factory.mktemp("runner-photos"))


def tiny_model(credentials: Credentials, tiny_cache: Path, engine: Any | None = None) -> Any:
    """The server's GroundedSamModel around the tiny engine at ENGINE_ENV (sharing ``engine``'s weights)."""
    from backend.config import EngineConfig
    from backend.engine import Engine
    from backend.preannotate import build_model

    config = EngineConfig.from_env({"ENGINE_CONFIG": str(tiny_cache / "engine.json"), **ENGINE_ENV})
    quick = Engine(config, detector=engine.detector, segmenter=engine.segmenter) if engine else Engine(config)
    return build_model(None, credentials, quick)


@pytest.fixture(scope="module")
def model(engine: Any, tiny_cache: Path, label_studio: LabelStudioServer) -> Any:
    return tiny_model(Credentials(label_studio.url, label_studio.token), tiny_cache, engine)


class EnginePredictor:
    """Predicts a job's task with the job's plan and labeling config; remembers which tasks it saw."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.registry = ClientRegistry()
        self.calls: list[int] = []

    def __call__(self, job: Job, task: JsonObject) -> dict[str, Any]:
        self.calls.append(int(task["id"]))
        engine = self.model.engine.get()
        assert job.label_config is not None and job.credentials is not None
        config = parse_label_config(job.label_config)
        images = self.model.load_task(engine, task, config, self.registry.get(job.credentials))
        return dict(self.model.predict_task(engine, images, plan_of(job), self.model.model_version))


def plan_of(job: Job) -> PromptPlan:
    return PromptPlan(tuple(job.plan["phrases"]), "job", job.plan.get("box_threshold"), job.plan.get("text_threshold"))


def client_factory(job: Job) -> LabelStudioClient:
    if job.credentials is None:
        raise LabelStudioError(f"job {job.id} has no Label Studio credentials")
    return LabelStudioClient(job.credentials)


def without_ids(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Region ids are random per prediction; everything else must match."""
    return [{k: v for k, v in r.items() if k != "id"} for r in results]


def new_job(store: JobStore, ls: LabelStudioServer, pid: int, version: str, *, key: str | None = None,
            task_ids: list[int] | None = None) -> str:
    tasks = [t for t in list_tasks(ls, pid) if task_ids is None or t["id"] in task_ids]
    for task in tasks:  # as /predict receives them: no annotations or predictions
        for name in ("predictions", "annotations", "drafts"):
            task.pop(name, None)
    created = store.create_job(str(pid), version, tasks, plan=PLAN, label_config=CONFIG,
                               credentials=Credentials(ls.url, key or ls.token))
    assert created.job_id is not None and created.added == len(tasks), created
    return created.job_id


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}", retry_delay_s=0.0, max_attempts=2)


def test_background_runner_writes_each_task_once_with_the_engines_masks(
        label_studio: LabelStudioServer, photos: list[Path], model: Any, store: JobStore) -> None:
    ls = label_studio
    pid = create_project(ls, CONFIG, title="runner-once")
    task_ids = import_files(ls, pid, photos)
    version = model.model_version
    job = new_job(store, ls, pid, version)
    predictor = EnginePredictor(model)
    runner = JobRunner(store, predictor, client_factory, batch_size=2, poll_s=0.2)
    runner.start()
    try:
        deadline = time.monotonic() + 300
        while not store.progress(job).finished:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, store.progress(job)
            time.sleep(0.2)
    finally:
        runner.stop()
    progress = store.progress(job)
    assert progress is not None and (progress.state, progress.done, progress.failed) == (DONE, 3, 0), progress
    assert sorted(predictor.calls) == task_ids

    engine = model.engine.get()
    target = parse_label_config(CONFIG).targets[0]
    stored = {t["id"]: t["predictions"] for t in list_tasks(ls, pid)}
    for task_id, photo in zip(task_ids, photos, strict=True):
        (prediction,) = stored[task_id]
        assert prediction["model_version"] == version
        expected = model.predict_task(engine, [(target, engine.load_image(photo.read_bytes()))],
                                      plan_of(store.get_job(job)), version)  # type: ignore[arg-type]
        assert expected["result"], f"{photo.name}: the engine found nothing, the test proves little"
        assert without_ids(prediction["result"]) == without_ids(expected["result"])

    # A second job for the same tasks finds them written: nothing is predicted or stored again.
    again = new_job(store, ls, pid, version)
    predictor.calls.clear()
    JobRunner(store, predictor, client_factory, batch_size=2).run_until_idle(timeout=120)
    progress = store.progress(again)
    assert progress is not None and (progress.state, progress.done) == (DONE, 3)
    assert predictor.calls == [] and len(list_predictions(ls, pid)) == 3


def test_wrong_key_stops_the_job_with_a_clear_error(label_studio: LabelStudioServer, photos: list[Path],
                                                    model: Any, store: JobStore,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    ls = label_studio
    pid = create_project(ls, CONFIG, title="runner-wrong-key")
    import_files(ls, pid, photos[:2])
    job = new_job(store, ls, pid, model.model_version, key="revoked-key-0123456789abcdef")
    predictor = EnginePredictor(model)
    runner = JobRunner(store, predictor, client_factory, batch_size=1)
    started = time.monotonic()
    runner.run_until_idle(timeout=60)
    assert time.monotonic() - started < 30  # it stops; it doesn't spin until the timeout
    progress = store.progress(job)
    assert progress is not None and progress.state == FAILED
    assert "rejected LABEL_STUDIO_API_KEY (HTTP 401)" in (progress.error or ""), progress.error
    assert (progress.pending, progress.done, progress.failed) == (2, 0, 0)  # handed back, not burnt
    assert runner.run_once() is False and predictor.calls == []
    assert list_predictions(ls, pid) == []
    assert any("stopped" in r.getMessage() and "HTTP 401" in r.getMessage() for r in caplog.records)
    assert "revoked-key" not in caplog.text


def test_unreachable_image_is_retried_a_bounded_number_of_times_then_again_after_the_fix(
        label_studio: LabelStudioServer, photos: list[Path], model: Any, store: JobStore) -> None:
    ls = label_studio
    pid = create_project(ls, CONFIG, title="runner-missing-image")
    (good,) = import_files(ls, pid, photos[:1])
    bad = int(ls.api("POST", f"/api/projects/{pid}/import?return_task_ids=true",
                     json=[{"image": f"/data/upload/{pid}/gone.png"}]).json()["task_ids"][0])
    version = model.model_version
    job = new_job(store, ls, pid, version)
    predictor = EnginePredictor(model)
    seen: list[JobProgress] = []  # what a CLI's progress bar is fed
    progress = JobRunner(store, predictor, client_factory, batch_size=2).run_job(job, seen.append, timeout=120)
    assert progress is not None and (progress.state, progress.done, progress.failed) == (DONE, 1, 1)
    assert seen[-1].finished and [p.done + p.failed for p in seen] == sorted(p.done + p.failed for p in seen)
    assert seen[0].state == RUNNING and seen[0].pending == 1  # the bad task waits for its retry
    (error,) = progress.errors
    assert (error.task_id, error.state, error.attempts) == (bad, FAILED, 2)
    assert error.error.startswith("image download failed: HTTP 403"), error.error  # what LS answers
    assert predictor.calls.count(bad) == 2 and predictor.calls.count(good) == 1
    assert [p["task"] for p in list_predictions(ls, pid)] == [good]

    # The cause is fixed (the task now points at an existing upload): a new job for the project's
    # tasks takes only the failed one, and stores it.
    good_image = ls.api("GET", f"/api/tasks/{good}").json()["data"]["image"]
    ls.api("PATCH", f"/api/tasks/{bad}", json={"data": {"image": good_image}})
    retry = new_job(store, ls, pid, version, task_ids=[bad])
    JobRunner(store, predictor, client_factory).run_until_idle(timeout=120)
    progress = store.progress(retry)
    assert progress is not None and (progress.state, progress.done, progress.failed) == (DONE, 1, 0)
    assert sorted(p["task"] for p in list_predictions(ls, pid)) == sorted([good, bad])


def test_changed_model_version_stops_the_job(label_studio: LabelStudioServer, photos: list[Path], model: Any,
                                             store: JobStore) -> None:
    ls = label_studio
    pid = create_project(ls, CONFIG, title="runner-old-version")
    import_files(ls, pid, photos[:1])
    job = new_job(store, ls, pid, "grounded-sam-an-older-version")
    JobRunner(store, EnginePredictor(model), client_factory).run_until_idle(timeout=60)
    progress = store.progress(job)
    assert progress is not None and progress.state == FAILED and "model version" in (progress.error or "")
    assert list_predictions(ls, pid) == []


def test_cancelled_job_is_left_alone(label_studio: LabelStudioServer, photos: list[Path], model: Any,
                                     store: JobStore) -> None:
    ls = label_studio
    pid = create_project(ls, CONFIG, title="runner-cancel")
    import_files(ls, pid, photos[:2])
    job = new_job(store, ls, pid, model.model_version)
    assert store.cancel(job)
    predictor = EnginePredictor(model)
    JobRunner(store, predictor, client_factory).run_until_idle(timeout=30)
    progress = store.progress(job)
    assert progress is not None and (progress.state, progress.pending) == (CANCELLED, 2)
    assert predictor.calls == [] and list_predictions(ls, pid) == []


def wait_finished(store: JobStore, job: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not store.progress(job).finished:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, store.progress(job)
        time.sleep(0.2)


def test_runner_killed_mid_job_is_finished_after_a_restart_with_nothing_lost_or_duplicated(
        label_studio: LabelStudioServer, photos: list[Path], model: Any, tiny_cache: Path, tmp_path: Path) -> None:
    """A worker process running the job is killed with SIGKILL; a restarted runner resumes the job."""
    ls = label_studio
    pid = create_project(ls, CONFIG, title="runner-kill")
    copies = []
    for photo in photos:  # six tasks: each photo twice, mirrored (the engine's cache must not skip the work)
        copy = tmp_path / f"copy-{photo.name}"
        with Image.open(photo) as image:
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(copy)
        copies.append(copy)
    task_ids = import_files(ls, pid, photos + copies)
    db = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    store = JobStore(db)
    job = new_job(store, ls, pid, model.model_version)
    code = """
        import os, sys
        from pathlib import Path
        from backend.jobs.runner import JobRunner
        from backend.jobs.store import JobStore
        from backend.ls_api import Credentials
        from tests.test_job_runner import EnginePredictor, client_factory, tiny_model
        model = tiny_model(Credentials(os.environ["LS_URL"], os.environ["LS_KEY"]), Path(sys.argv[2]))
        # Each prediction is written as it is made, so the kill below lands between two of them.
        JobRunner(JobStore(sys.argv[1]), EnginePredictor(model), client_factory, batch_size=1, chunk_size=1,
                  lease_s=10).run_until_idle()
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(LS_URL=ls.url, LS_KEY=ls.token, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), db, str(tiny_cache)], cwd=REPO_ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(list_predictions(ls, pid)) < 2:
            assert worker.poll() is None, worker.stderr.read().decode() if worker.stderr else ""
            assert time.monotonic() < deadline, "the worker stored no predictions"
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    before = store.progress(job)
    assert before is not None and before.done < len(task_ids), "killed too late to prove anything"

    predictor = EnginePredictor(model)
    restarted = JobRunner(JobStore(db), predictor, client_factory, batch_size=2, poll_s=0.5)
    restarted.start()  # resumes; the dead worker's task comes back when its lease ends
    try:
        wait_finished(store, job)
    finally:
        restarted.stop()
    progress = store.progress(job)
    assert progress is not None and (progress.state, progress.done, progress.failed) == (DONE, 6, 0), progress
    stored = {t["id"]: t["predictions"] for t in list_tasks(ls, pid)}
    assert sorted(stored) == sorted(task_ids)
    assert all(len(p) == 1 and p[0]["model_version"] == model.model_version for p in stored.values()), stored
    assert len(predictor.calls) <= len(task_ids) - before.done  # finished work isn't redone
