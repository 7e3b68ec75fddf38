"""/predict's deadline (PREDICT_DEADLINE_S): a batch answers in time, the tasks it did not reach go to a
background job in the shared store (entries without ``result``: Label Studio stores nothing for them
now), and a second "Retrieve predictions" of the same tasks predicts none of the held ones again.

The tiny real engine predicts; the job store is a real SQLite file; the job runner is not started here
(tests/test_retrieve_jobs.py runs the whole path against a real Label Studio)."""

from __future__ import annotations

import time

import pytest

from backend._wsgi import ServerSettings, create_app
from backend.fetch import FetchSettings
from backend.jobs.store import JobStore
from backend.label_config import parse_label_config
from backend.ls_api import Credentials
from backend.ls_model import ModelSettings
from tests.test_fetch import LEGACY_TOKEN, FakeLabelStudio, data_url, png_bytes

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
          '<Label value="cat"/><Label value="dog"/></BrushLabels></View>')


@pytest.fixture
def fake_ls():
    with FakeLabelStudio() as ls:
        yield ls


def app_for(engine, tmp_path, deadline_s: float, credentials: Credentials | None):
    settings = ServerSettings(
        load_on_start=False, jobs_db=f"sqlite:///{tmp_path / 'jobs.sqlite3'}",
        model=ModelSettings(credentials=credentials, predict_deadline_s=deadline_s, prefetch_tasks=0,
                            fetch=FetchSettings(max_bytes=1 << 20, timeout=5)))
    app = create_app(engine=engine, settings=settings)
    model = app.extensions["grounded_sam"]
    model.runner.stop()  # the test looks at the queued job itself
    return app, model


def tasks_of(n: int, seed: int = 0) -> list[dict]:
    """``n`` tasks; ``seed`` picks other photos than another test's (a photo the session's engine has
    already explained is a cache hit of ~1 ms: the deadline would not have passed after it)."""
    return [{"id": 100 + i, "data": {"image": data_url(png_bytes(64, 48, seed=seed + i))}} for i in range(n)]


def test_batch_past_the_deadline_hands_the_rest_to_one_job(engine, tmp_path, fake_ls):
    app, model = app_for(engine, tmp_path, 0.01, Credentials(fake_ls.url, LEGACY_TOKEN))
    client = app.test_client()
    tasks = tasks_of(5)
    started = time.monotonic()
    body = client.post("/predict", json={"tasks": tasks, "project": "4.1700000000", "label_config": CONFIG}).get_json()
    assert time.monotonic() - started < 60
    results = body["results"]
    assert len(results) == len(tasks)
    # The first task always runs (no task time is known yet); after it, the deadline is past.
    assert "result" in results[0]
    queued = results[1:]
    assert all("result" not in entry and entry["model_version"] == model.model_version for entry in queued)
    job_id = body["job"]["id"]
    assert {entry["job"] for entry in queued} == {job_id} and body["job"]["tasks"] == 4
    store: JobStore = model.jobs
    job = store.get_job(job_id)
    assert job is not None and job.project == "4" and job.model_version == model.model_version
    assert job.label_config == CONFIG and job.credentials == Credentials(fake_ls.url, LEGACY_TOKEN)
    progress = store.progress(job_id)
    assert progress is not None and progress.total == 4 and progress.done == 0

    # Label Studio sends the same tasks again (none was stored): the held ones are not predicted again.
    again = client.post("/predict", json={"tasks": tasks[1:], "project": "4", "label_config": CONFIG}).get_json()
    assert [entry.get("job") for entry in again["results"]] == [job_id] * 4
    assert all("result" not in entry for entry in again["results"])
    assert store.progress(job_id).total == 4  # type: ignore[union-attr]


def test_without_credentials_unreached_tasks_are_left_for_the_next_retrieve(engine, tmp_path):
    app, _ = app_for(engine, tmp_path, 0.01, None)
    body = app.test_client().post("/predict", json={"tasks": tasks_of(3, seed=50), "project": "5",
                                                     "label_config": CONFIG}).get_json()
    assert "result" in body["results"][0]
    assert all("result" not in entry for entry in body["results"][1:])
    assert "job" not in body
    errors = {e["task"]: e["error"] for e in body["errors"]}
    assert set(errors) == {101, 102} and all("PREDICT_DEADLINE_S" in e and "LABEL_STUDIO_URL" in e
                                             for e in errors.values())


def test_interactive_request_is_never_deferred(engine, tmp_path, fake_ls):
    app, _ = app_for(engine, tmp_path, 0.000001, Credentials(fake_ls.url, LEGACY_TOKEN))
    context = {"result": [{"type": "textarea", "from_name": "prompt", "value": {"text": ["cat"]}}]}
    body = app.test_client().post("/predict", json={"tasks": tasks_of(1), "project": "6", "label_config": CONFIG,
                                                     "params": {"context": context}}).get_json()
    assert "result" in body["results"][0] and "job" not in body


def test_project_state_is_shared_through_the_store(engine, tmp_path, fake_ls):
    """Two apps on one store stand for two gunicorn workers: /setup on one, the prompt plan and the
    credentials on the other."""
    first, _ = app_for(engine, tmp_path, 80, None)
    second, model = app_for(engine, tmp_path, 80, None)
    setup = first.test_client().post("/setup", json={
        "project": "9.1700000000", "schema": CONFIG, "hostname": fake_ls.url, "access_token": LEGACY_TOKEN,
        "extra_params": {"prompt": "dog", "box_threshold": 0.4}})
    assert setup.status_code == 200, setup.get_json()
    assert model.credentials_for("9") == Credentials(fake_ls.url, LEGACY_TOKEN, "setup")
    assert model.credentials_for("10") is None
    plan = model.plan("9", parse_label_config(CONFIG), None)
    assert plan.phrases == ("dog",) and plan.box_threshold == 0.4 and plan.source == "extra_params"


@pytest.mark.parametrize("value, problem", [("-1", ">= 0"), ("inf", "finite"), ("nan", "finite"),
                                            ("soon", "number of seconds")])
def test_a_bad_deadline_setting_is_refused_naming_it(value, problem):
    with pytest.raises(ValueError, match="PREDICT_DEADLINE_S") as refused:
        ModelSettings.from_env({"PREDICT_DEADLINE_S": value})
    assert problem in str(refused.value)


def test_a_deadline_past_label_studios_timeout_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="backend.model_settings"):
        assert ModelSettings.from_env({"PREDICT_DEADLINE_S": "120"}).predict_deadline_s == 120
        assert ModelSettings.from_env({"PREDICT_DEADLINE_S": "0"}).predict_deadline_s == 0  # no deadline
    assert [r.message for r in caplog.records if "ML_TIMEOUT_PREDICT" in r.message] == [
        "PREDICT_DEADLINE_S=120 s is not below Label Studio's default ML_TIMEOUT_PREDICT (100 s): unless Label "
        "Studio's is raised too, it gives up on a long /predict first and stores nothing"]
