"""Two backend replicas on one PostgreSQL job store (JOBS_DB=postgresql+psycopg://...) answer one
project consistently: what /setup told one, the other predicts with; a job one of them queued, the
other shows, advances and cancels through /api/jobs.

Both apps are real ``create_app`` instances with the tiny real engine, each with its own engine pool
of connections to a real PostgreSQL (tests/conftest_pg.py); Label Studio is the fake of test_fetch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask

from backend._wsgi import ServerSettings, create_app
from backend.fetch import FetchSettings
from backend.jobs.store import CANCELLED, RUNNING, JobStore
from backend.label_config import parse_label_config
from backend.ls_api import Credentials
from backend.ls_model import ModelSettings
from tests.test_fetch import LEGACY_TOKEN, FakeLabelStudio, data_url, png_bytes

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
          '<Label value="cat"/><Label value="dog"/></BrushLabels></View>')


@pytest.fixture
def fake_ls() -> Iterator[FakeLabelStudio]:
    with FakeLabelStudio() as ls:
        yield ls


def replica(engine: object, jobs_db: str) -> tuple[Flask, JobStore]:
    """One backend app on ``jobs_db`` whose job runner is stopped (the test moves the job itself)."""
    settings = ServerSettings(
        load_on_start=False, jobs_db=jobs_db,
        model=ModelSettings(credentials=None, predict_deadline_s=0.01, prefetch_tasks=0,
                            fetch=FetchSettings(max_bytes=1 << 20, timeout=5)))
    app = create_app(engine=engine, settings=settings)
    model = app.extensions["grounded_sam"]
    model.runner.stop()
    return app, model.jobs


def test_two_replicas_answer_one_project_consistently(engine: object, postgres_url: str,
                                                      fake_ls: FakeLabelStudio) -> None:
    first, first_store = replica(engine, postgres_url)
    second, second_store = replica(engine, postgres_url)
    assert first_store is not second_store  # two stores, two connection pools: only the database is shared
    a, b = first.test_client(), second.test_client()

    # /setup reaches the first replica; the second predicts with its prompt and credentials.
    setup = a.post("/setup", json={"project": "9.1700000000", "schema": CONFIG, "hostname": fake_ls.url,
                                   "access_token": LEGACY_TOKEN, "extra_params": {"prompt": "dog"}})
    assert setup.status_code == 200, setup.get_json()
    model = second.extensions["grounded_sam"]
    assert model.credentials_for("9") == Credentials(fake_ls.url, LEGACY_TOKEN, "setup")
    assert model.plan("9", parse_label_config(CONFIG), None).phrases == ("dog",)

    # A batch past its deadline on the second replica queues a job with /setup's credentials ...
    tasks = [{"id": 200 + i, "data": {"image": data_url(png_bytes(64, 48, seed=i))}} for i in range(4)]
    body = b.post("/predict", json={"tasks": tasks, "project": "9.1700000000", "label_config": CONFIG}).get_json()
    job_id = body["job"]["id"]
    job = first_store.get_job(job_id)
    assert job is not None and job.credentials == Credentials(fake_ls.url, LEGACY_TOKEN, "setup")
    # ... that the first lists and shows, and does not queue again when the same tasks reach it.
    assert [j["id"] for j in a.get("/api/jobs?project=9").get_json()["jobs"]] == [job_id]
    shown = a.get(f"/api/jobs/{job_id}").get_json()
    assert (shown["total"], shown["pending"], shown["done"]) == (3, 3, 0)
    again = a.post("/predict", json={"tasks": tasks[1:], "project": "9", "label_config": CONFIG}).get_json()
    assert [entry.get("job") for entry in again["results"]] == [job_id] * 3

    # A worker of the first replica works on it: the second shows the progress.
    claimed = first_store.claim_tasks(job_id, 2, "replica-1/worker", lease_s=60)
    first_store.mark_done(job_id, [claimed[0].task_id])
    shown = b.get(f"/api/jobs/{job_id}").get_json()
    assert (shown["state"], shown["done"], shown["running"], shown["pending"]) == (RUNNING, 1, 1, 1)
    # The second cancels it; neither replica hands out its tasks any more.
    cancelled = b.post(f"/api/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.get_json()
    assert a.get(f"/api/jobs/{job_id}").get_json()["state"] == CANCELLED
    assert first_store.claim_tasks(job_id, 5, "replica-1/worker") == []
    assert second_store.claim_tasks(job_id, 5, "replica-2/worker") == []
    assert a.post(f"/api/jobs/{job_id}/cancel").status_code == 409
