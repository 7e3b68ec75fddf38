"""`python -m backend.preannotate` against a real Label Studio 1.23.2 (tests/ls_server.py), with the
tiny random-weight models: the CLI runs a job of the shared job store (backend/jobs) in the
foreground. Predictions are stored, a rerun adds nothing, an interrupted run resumes its job, a job
the server left unfinished is finished by the CLI, one bad task is retried then named, a rejected key
stops the run at once, bad arguments give one clear message."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.ls_server import (
    REPO_ROOT,
    LabelStudioServer,
    create_project,
    import_files,
    list_predictions,
    list_tasks,
    personal_access_token,
)
from tests.photos import photo_files

LABELS = ("tabby cat", "coffee cup")
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
          + "".join(f'<Label value="{x}"/>' for x in LABELS) + "</BrushLabels></View>")
ENGINE_ENV = {"BOX_THRESHOLD": "0.2", "TEXT_THRESHOLD": "0.2", "MAX_DETECTIONS": "2"}
PLAN = {"phrases": list(LABELS)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return photo_files(tmp_path_factory.mktemp("preannotate-photos"))


@pytest.fixture(scope="module")
def engine_env(tiny_cache: Path) -> dict[str, str]:
    return {"ENGINE_CONFIG": str(tiny_cache / "engine.json"), **ENGINE_ENV}


@pytest.fixture(scope="module")
def quick_engine(engine: Any, engine_env: dict[str, str]) -> Any:
    """The CLI's engine at ENGINE_ENV, sharing the session engine's weights."""
    from backend.config import EngineConfig
    from backend.engine import Engine

    return Engine(EngineConfig.from_env(engine_env), detector=engine.detector, segmenter=engine.segmenter)


def run_cli(ls: LabelStudioServer, engine_env: dict[str, str], jobs_db: str,
            *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_")) and k not in ("PROMPT", "PYTHONPATH", "DATA_DIR")}
    env.update(engine_env, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", NO_PROXY="127.0.0.1,localhost", JOBS_DB=jobs_db)
    return subprocess.run([sys.executable, "-m", "backend.preannotate", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def jobs_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A job store of this test's own; JOBS_DB points at it (in-process runs) and DATA_DIR elsewhere, so
    nothing lands in the checkout's data/."""
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    monkeypatch.setenv("JOBS_DB", url)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    return url


def predictions_by_task(ls: LabelStudioServer, project: int) -> dict[int, list[dict[str, Any]]]:
    return {t["id"]: t["predictions"] for t in list_tasks(ls, project)}


def server_job(ls: LabelStudioServer, store: Any, pid: int, version: str, key: str) -> str:
    """A job as the server's /predict hands over tasks it did not reach (backend.ls_model._defer)."""
    from backend.ls_api import Credentials

    tasks = [{k: v for k, v in t.items() if k not in ("predictions", "annotations", "drafts")}
             for t in list_tasks(ls, pid)]
    created = store.create_job(str(pid), version, tasks, plan=PLAN, label_config=CONFIG,
                               credentials=Credentials(ls.url, key))
    assert created.job_id is not None and created.added == len(tasks)
    return str(created.job_id)


def test_cli_stores_predictions_and_rerun_adds_nothing(label_studio: LabelStudioServer, photos: list[Path],
                                                       engine_env: dict[str, str], quick_engine: Any,
                                                       jobs_db: str, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from label_studio_sdk.converter.brush import decode_rle

    from backend.config import EngineConfig
    from backend.engine import model_version
    from backend.jobs.store import DONE, JobStore
    from backend.preannotate import main

    ls = label_studio
    pid = create_project(ls, CONFIG, title="preannotate-cli")
    task_ids = import_files(ls, pid, photos)
    bad = ls.api("POST", f"/api/projects/{pid}/import?return_task_ids=true",
                 json=[{"image": f"/data/upload/{pid}/gone.png"}]).json()["task_ids"][0]

    first = run_cli(ls, engine_env, jobs_db, "--project", str(pid), "--batch-size", "2")
    assert first.returncode == 1, first.stderr  # one task failed
    assert "done 3 (empty 0), skipped 0, failed 1 of 4 tasks" in first.stdout, (first.stdout, first.stderr)
    assert f"task {bad} failed: image download failed" in first.stderr
    assert "4/4" in first.stderr and "failed=1" in first.stderr  # tqdm's bar reached the end, with counts
    assert ls.token not in first.stdout + first.stderr

    # The run was a job of the shared store: the server's /api/jobs shows it, with the failure.
    store = JobStore(jobs_db)
    (job,) = store.list_jobs(str(pid))
    assert (job.state, job.total, job.done, job.failed) == (DONE, 4, 3, 1), job
    (error,) = job.errors
    assert error.task_id == bad and error.attempts == store.max_attempts  # retried, then given up

    version = model_version(EngineConfig.from_env(engine_env))  # what the server reports too
    assert job.model_version == version
    stored = predictions_by_task(ls, pid)
    assert stored[bad] == []  # no empty prediction for a failure: a rerun retries it
    for tid, photo in zip(task_ids, photos, strict=True):
        (pred,) = stored[tid]
        assert pred["model_version"] == version
        w, h = Image.open(photo).size
        assert pred["result"], f"{photo.name}: nothing found"
        for r in pred["result"]:
            assert r["type"] == "brushlabels" and r["value"]["brushlabels"][0] in LABELS
            assert (r["original_width"], r["original_height"]) == (w, h)
            mask = decode_rle(r["value"]["rle"]).reshape(h, w, 4)[:, :, 3]
            assert 0 < np.count_nonzero(mask) < w * h

    # Rerun in this process (same settings, so the same model version): only the failed task is retried.
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", ls.token)
    assert main(["--project", str(pid), "--url", ls.url, "--no-progress"], engine=quick_engine) == 1
    again = capsys.readouterr()
    assert "done 0 (empty 0), skipped 3, failed 1 of 4 tasks" in again.out, (again.out, again.err)
    assert len(list_predictions(ls, pid)) == 3
    newest = store.list_jobs(str(pid))[0]
    assert newest.id != job.id and (newest.total, newest.failed) == (1, 1)  # a job of the one task left


def test_interrupted_run_resumes_its_job(label_studio: LabelStudioServer, photos: list[Path], quick_engine: Any,
                                         jobs_db: str) -> None:
    from backend.jobs.store import DONE, JobStore
    from backend.ls_api import Credentials, LabelStudioClient
    from backend.preannotate import build_model, preannotate

    ls = label_studio
    credentials = Credentials(ls.url, ls.token)
    store = JobStore(jobs_db)
    model = build_model(None, credentials, quick_engine, jobs=store)
    pid = create_project(ls, CONFIG, title="preannotate-resume")
    task_ids = import_files(ls, pid, photos)
    predict = model.predict_job_task
    predicted: list[int] = []

    def ctrl_c_on_the_third(job: Any, task: dict[str, Any]) -> dict[str, Any]:
        """Ctrl-C arrives while the third task is predicted."""
        if len(predicted) == 2:
            raise KeyboardInterrupt
        predicted.append(int(task["id"]))
        return predict(job, task)

    model.predict_job_task = ctrl_c_on_the_third  # type: ignore[method-assign]
    client = LabelStudioClient(credentials)
    summary = preannotate(client, pid, model, batch_size=2, progress=False)
    assert summary.interrupted and (summary.done, summary.skipped, summary.failed) == (2, 0, 0), summary
    assert [len(p) for p in predictions_by_task(ls, pid).values()] == [1, 1, 0]  # made = written
    (job,) = store.list_jobs(str(pid))
    assert (job.done, job.pending, job.running) == (2, 1, 0)  # the task in hand went back

    model.predict_job_task = predict  # type: ignore[method-assign]
    summary = preannotate(client, pid, model, batch_size=2, progress=False)
    assert not summary.interrupted and (summary.done, summary.skipped, summary.failed) == (1, 2, 0), summary
    assert summary.jobs == [job.id]  # the same job, resumed
    stored = predictions_by_task(ls, pid)
    assert [len(stored[t]) for t in task_ids] == [1, 1, 1]
    assert {p[0]["model_version"] for p in stored.values()} == {model.model_version}
    (job,) = store.list_jobs(str(pid))
    assert (job.state, job.done) == (DONE, 3)


def test_cli_finishes_a_job_the_server_left(label_studio: LabelStudioServer, photos: list[Path], quick_engine: Any,
                                            jobs_db: str, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A CLI run and the server share the store: tasks a server job holds are predicted once, in that job."""
    from backend.jobs.store import DONE, JobStore
    from backend.preannotate import main

    ls = label_studio
    pid = create_project(ls, CONFIG, title="preannotate-server-job")
    import_files(ls, pid, photos[:2])
    store = JobStore(jobs_db)
    job = server_job(ls, store, pid, quick_engine.model_version, ls.token)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", ls.token)
    assert main(["--project", str(pid), "--url", ls.url, "--no-progress"], engine=quick_engine) == 0
    out = capsys.readouterr()
    assert "done 2 (empty 0), skipped 0, failed 0 of 2 tasks" in out.out, (out.out, out.err)
    (progress,) = store.list_jobs(str(pid))  # no second job
    assert (progress.id, progress.state, progress.done) == (job, DONE, 2)
    assert sorted(len(p) for p in predictions_by_task(ls, pid).values()) == [1, 1]


def test_revoked_key_of_a_job_stops_the_run_at_once(label_studio: LabelStudioServer, photos: list[Path],
                                                    quick_engine: Any, jobs_db: str,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A job whose key was revoked (here: a server job with a /setup key Label Studio no longer knows)
    stops with the reason and a non-zero exit; it does not spin. A rerun takes its tasks over."""
    from backend.jobs.store import FAILED, JobStore
    from backend.preannotate import main

    ls = label_studio
    pid = create_project(ls, CONFIG, title="preannotate-revoked")
    import_files(ls, pid, photos[:2])
    store = JobStore(jobs_db)
    job = server_job(ls, store, pid, quick_engine.model_version, "revoked-key-0123456789abcdef")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", ls.token)
    started = time.monotonic()
    assert main(["--project", str(pid), "--url", ls.url, "--no-progress"], engine=quick_engine) == 2
    assert time.monotonic() - started < 30
    out = capsys.readouterr()
    assert f"preannotate: job {job} failed:" in out.err and "rejected" in out.err and "HTTP 401" in out.err, out.err
    assert "revoked-key" not in out.out + out.err and ls.token not in out.out + out.err
    progress = store.progress(job)
    assert progress is not None and progress.state == FAILED and progress.pending == 2
    assert list_predictions(ls, pid) == []

    assert main(["--project", str(pid), "--url", ls.url, "--no-progress"], engine=quick_engine) == 0
    assert "done 2 (empty 0), skipped 0, failed 0 of 2 tasks" in capsys.readouterr().out
    assert len(list_predictions(ls, pid)) == 2


def test_personal_access_token(label_studio: LabelStudioServer, photos: list[Path], quick_engine: Any,
                               jobs_db: str, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """A PAT (JWT refresh token) works for listing, image downloads and storing predictions."""
    from backend.preannotate import main

    ls = label_studio
    pid = create_project(ls, CONFIG, title="preannotate-pat")
    (task_id,) = import_files(ls, pid, photos[:1])
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", personal_access_token(ls))
    assert main(["--project", str(pid), "--url", ls.url, "--no-progress"], engine=quick_engine) == 0
    out = capsys.readouterr()
    assert "done 1 (empty 0), skipped 0, failed 0 of 1 tasks" in out.out, (out.out, out.err)
    assert "eyJ" not in out.out + out.err  # neither the PAT nor an access token is printed
    (pred,) = predictions_by_task(ls, pid)[task_id]
    assert pred["model_version"] == quick_engine.model_version and pred["result"]


@pytest.mark.parametrize("case, expected", [
    ("no-brush", "BrushLabels"),
    ("wrong-key", "rejected LABEL_STUDIO_API_KEY (HTTP 401)"),
    ("no-project", "no such object"),
    ("unknown-prompt", "unknown labels"),
    ("long-label", "Grounding DINO reads at most 256 per pass"),
])
def test_bad_input_is_one_clear_message(label_studio: LabelStudioServer, quick_engine: Any, case: str, expected: str,
                                        jobs_db: str, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from backend.jobs.store import JobStore
    from backend.preannotate import main

    ls = label_studio
    config = CONFIG
    if case == "no-brush":
        config = ('<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
                  '<Choice value="a"/></Choices></View>')
    if case == "long-label":  # no split into passes can help a label longer than one pass
        config = CONFIG.replace('<Label value="tabby cat"/>', f'<Label value="{" ".join(["tabby"] * 300)}"/>')
        assert config != CONFIG
    pid = create_project(ls, config, title=f"preannotate-{case}")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "not-a-valid-token-0123" if case == "wrong-key" else ls.token)
    args = ["--project", str(pid + 1000 if case == "no-project" else pid), "--url", ls.url, "--no-progress"]
    if case == "unknown-prompt":
        args += ["--prompt", "zebra"]
    assert main(args, engine=quick_engine) == 2
    err = capsys.readouterr().err
    assert err.startswith("preannotate: ") and expected in err, err
    assert ls.token not in err
    assert list_predictions(ls, pid) == []
    assert JobStore(jobs_db).list_jobs() == []  # refused before any job was made


def test_missing_api_key_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from backend.preannotate import main

    for name in ("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--project", "1", "--url", "http://127.0.0.1:9"])
    assert exit_info.value.code == 2
    assert "LABEL_STUDIO_API_KEY" in capsys.readouterr().err
