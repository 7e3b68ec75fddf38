"""The /api/jobs routes (backend/jobs_api.py) through the real app (``create_app``, Flask's test
client) over a real job store on a temporary SQLite file: the JSON of a job whose tasks are done,
failed, retried and still running; the list newest first and per project; cancel; an unknown id; a
server without a job store; basic auth. The answers are checked against ``backend.api_schema`` too.

No model is loaded (the routes don't need one) and the app's job runner is stopped, so job states are
exactly what each test sets through the store."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

from backend._wsgi import ServerSettings, create_app
from backend.api_schema import CancelJson, JobJson, JobListJson, SchemaError, parse
from backend.jobs.store import JobStore

WORKER = "test-worker"


def tasks(ids: range) -> list[dict[str, object]]:
    return [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in ids]


class Clock:
    """A settable epoch clock for the test's own store handle (the app reads with real time)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def app_with_store(tmp_path: Path, **settings: object):
    """The real app on a JobStore file; its runner stopped so only the test moves jobs."""
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    app = create_app(settings=ServerSettings(load_on_start=False, jobs_db=url, **settings))  # type: ignore[arg-type]
    model = app.extensions["grounded_sam"]
    model.runner.stop()
    return app, url


@pytest.fixture
def served(tmp_path):
    app, url = app_with_store(tmp_path)
    yield app.test_client(), url
    app.extensions["grounded_sam"].jobs.close()


def test_job_json_has_counts_rate_eta_and_recent_errors(served):
    client, url = served
    started = time.time() - 30  # the job started 30 s ago; three tasks finished 10 s ago
    clock = Clock(started)
    store = JobStore(url, clock=clock, max_attempts=2)
    job_id = store.create_job("4", "v1", tasks(range(1, 11))).job_id
    assert job_id is not None
    claimed = [t.task_id for t in store.claim_tasks(job_id, 6, WORKER)]
    clock.now = started + 20
    store.mark_done(job_id, claimed[:3])
    store.mark_failed(job_id, claimed[3], "image host answered 404", retryable=False, worker_id=WORKER)
    store.mark_failed(job_id, claimed[4], "image host timed out", retryable=True, worker_id=WORKER)

    response = client.get(f"/api/jobs/{job_id}")
    assert response.status_code == 200
    job = parse(response.get_json(), JobJson)
    assert (job["id"], job["project"], job["model_version"], job["state"]) == (job_id, "4", "v1", "running")
    # 3 done, 1 failed for good, 1 back to pending (retry) plus 4 never claimed, 1 still running.
    assert (job["total"], job["done"], job["failed"], job["pending"], job["running"]) == (10, 3, 1, 5, 1)
    # Four tasks finished (3 done + 1 failed) in the ~30 s since the job started.
    assert job["rate"] == pytest.approx(4 / 30, rel=0.1)
    assert job["eta_s"] == pytest.approx(6 / job["rate"], rel=0.01)
    assert {(e["task"], e["state"], e["attempts"], e["error"]) for e in job["errors"]} == {
        (claimed[3], "failed", 1, "image host answered 404"), (claimed[4], "pending", 1, "image host timed out")}
    assert job["error"] is None and job["created"] == pytest.approx(started)

    store.mark_done(job_id, [t.task_id for t in store.claim_tasks(job_id, 10, WORKER)] + [claimed[5]])
    clock.now = started + 60  # past the retry's back-off
    store.mark_done(job_id, [t.task_id for t in store.claim_tasks(job_id, 10, WORKER)])
    finished = parse(client.get(f"/api/jobs/{job_id}").get_json(), JobJson)
    assert (finished["state"], finished["done"], finished["failed"], finished["eta_s"]) == ("done", 9, 1, 0.0)
    store.close()


def test_list_is_newest_first_and_filters_by_project(served):
    client, url = served
    clock = Clock(time.time() - 100)
    store = JobStore(url, clock=clock)
    ids = []
    for n, project in enumerate(("4", "5", "4")):
        clock.now += 10
        ids.append(store.create_job(project, "v1", tasks(range(100 * n, 100 * n + n + 1))).job_id)
    store.close()

    listed = parse(client.get("/api/jobs").get_json(), JobListJson)["jobs"]
    assert [job["id"] for job in listed] == ids[::-1]
    assert [job["total"] for job in listed] == [3, 2, 1]
    # Label Studio's project uid ("4.1700000000") names the same project as its id.
    for project in ("4", "4.1700000000", " 4 "):
        only = client.get("/api/jobs", query_string={"project": project}).get_json()["jobs"]
        assert [job["id"] for job in only] == [ids[2], ids[0]], project
    for other in ("99", "\x00", "猫", "x" * 5000, "-4"):
        assert client.get("/api/jobs", query_string={"project": other}).get_json() == {"jobs": []}, other
    assert client.get("/api/jobs/").get_json() == client.get("/api/jobs").get_json()
    assert [job["id"] for job in client.get("/api/jobs?limit=1").get_json()["jobs"]] == [ids[2]]


@pytest.mark.parametrize("limit", ["0", "501", "ten", "-1", "1.5"])
def test_bad_limit_is_a_400_naming_it(served, limit):
    client, _ = served
    response = client.get("/api/jobs", query_string={"limit": limit})
    assert response.status_code == 400
    assert "'limit'" in response.get_json()["error"]


def test_cancel_stops_an_active_job_and_a_finished_one_is_a_409(served):
    client, url = served
    store = JobStore(url)
    job_id = store.create_job("4", "v1", tasks(range(1, 5))).job_id
    store.claim_tasks(job_id, 1, WORKER)

    response = client.post(f"/api/jobs/{job_id}/cancel")
    assert response.status_code == 200
    body = parse(response.get_json(), CancelJson)
    assert body["cancelled"] is True and body["job"]["state"] == "cancelled" and body["job"]["id"] == job_id
    assert store.job_state(job_id) == "cancelled"
    assert store.claim_tasks(job_id, 10, WORKER) == [], "no task of a cancelled job is claimed again"

    again = client.post(f"/api/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert "already finished (cancelled" in again.get_json()["error"] and job_id in again.get_json()["error"]

    done_id = store.create_job("4", "v2", tasks(range(1, 3))).job_id
    store.mark_done(done_id, [t.task_id for t in store.claim_tasks(done_id, 10, WORKER)])
    refused = client.post(f"/api/jobs/{done_id}/cancel")
    assert refused.status_code == 409 and "(done: 2 done, 0 failed of 2)" in refused.get_json()["error"]
    assert store.job_state(done_id) == "done"
    store.close()


@pytest.mark.parametrize("job_id", ["0123456789abcdef", "no-such-job", pytest.param("x" * 300, id="long"), "caf%C3%A9"])
def test_unknown_job_is_a_404_naming_it(served, job_id):
    client, _ = served
    for response in (client.get(f"/api/jobs/{job_id}"), client.post(f"/api/jobs/{job_id}/cancel")):
        assert response.status_code == 404
        error = response.get_json()["error"]
        assert error.startswith("no job '") and job_id.replace("%C3%A9", "é")[:64] in error and len(error) < 300


def test_without_a_job_store_every_route_says_how_to_configure_one():
    app = create_app(settings=ServerSettings(load_on_start=False, jobs_db=None))
    client = app.test_client()
    for response in (client.get("/api/jobs"), client.get("/api/jobs/abc"), client.post("/api/jobs/abc/cancel")):
        assert response.status_code == 503
        error = response.get_json()["error"]
        assert "no job store" in error and "JOBS_DB" in error and "DATA_DIR" in error


def test_job_routes_need_the_servers_basic_auth(tmp_path):
    app, url = app_with_store(tmp_path, basic_auth=("ann", "s3cret"))
    client = app.test_client()
    job_id = JobStore(url).create_job("4", "v1", tasks(range(1, 3))).job_id
    good = {"Authorization": "Basic " + base64.b64encode(b"ann:s3cret").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ann:wrong").decode()}
    for method, path in (("GET", "/api/jobs"), ("GET", f"/api/jobs/{job_id}"), ("POST", f"/api/jobs/{job_id}/cancel")):
        for headers in ({}, bad):
            assert client.open(path, method=method, headers=headers).status_code == 401, (method, path)
        assert client.open(path, method=method, headers=good).status_code == 200, (method, path)


# -- the shared schema ---------------------------------------------------------------------------------------
def test_schema_names_the_field_that_does_not_match(served):
    client, url = served
    store = JobStore(url)
    store.create_job("4", "v1", tasks(range(1, 3)))
    store.close()
    body = client.get("/api/jobs").get_json()
    assert parse(body, JobListJson) is body
    body["jobs"][0]["rate"] = 0.5  # numbers: an int or float; rate may also be null
    body["jobs"][0]["eta_s"] = 3
    parse(body, JobListJson)
    cases = [
        (("done",), "3", "answer.jobs[0].done must be an integer, got a string"),
        (("done",), True, "answer.jobs[0].done must be an integer, got a boolean"),
        (("rate",), "fast", "answer.jobs[0].rate must be a number, got a string"),
        (("errors",), [{"task": 1, "state": "failed", "attempts": 1}], "answer.jobs[0].errors[0] has no 'error'"),
        (("errors",), {}, "answer.jobs[0].errors must be a list, got an object"),
        (("state",), None, "answer.jobs[0].state must be a string, got null"),
    ]
    for (key,), value, message in cases:
        broken = {"jobs": [{**body["jobs"][0], key: value}]}
        with pytest.raises(SchemaError) as info:
            parse(broken, JobListJson)
        assert str(info.value) == message
    missing = {k: v for k, v in body["jobs"][0].items() if k != "total"}
    with pytest.raises(SchemaError, match=r"^job has no 'total'$"):
        parse(missing, JobJson, "job")
    with pytest.raises(SchemaError, match="answer must be a JSON object, got a list"):
        parse([], JobListJson)
