"""The explain page's Jobs tab (explain_ui/jobs_view.py) on JSON fetched over HTTP from the real
backend app (``create_app`` served by werkzeug on loopback, a real JobStore on a temporary SQLite file,
no model loaded): one progress bar per job with its numbers in words, recent errors, a Cancel button
for active jobs that really cancels; a backend without a store or down is a status line, not a crash.
The app's job runner is stopped so the test alone moves the jobs."""

from __future__ import annotations

import time
from html.parser import HTMLParser

import pytest

from backend.jobs.store import JobStore
from explain_ui import jobs_view
from explain_ui.app import _clicked_job, build_demo
from explain_ui.client import BackendClient, BackendError
from tests.ui_servers import ThreadedBackend, free_port

WORKER = "test-worker"


def tasks(ids: range) -> list[dict[str, object]]:
    return [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in ids]


class Jobs(HTMLParser):
    """The rendered list as data: per ``section.job`` its attributes, its progress bar's attributes,
    its buttons' attributes and its text."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.jobs: list[dict] = []
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "section" and values.get("class") == "job":
            self.jobs.append({"attrs": values, "bar": None, "buttons": [], "text": ""})
        elif self.jobs and values.get("role") == "progressbar":
            self.jobs[-1]["bar"] = values
        elif self.jobs and tag == "button":
            self.jobs[-1]["buttons"].append(values)

    def handle_data(self, data: str) -> None:
        if self.jobs:
            self.jobs[-1]["text"] += data


@pytest.fixture
def backend(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    with ThreadedBackend(None, jobs_db=url) as server:
        server.app.extensions["grounded_sam"].runner.stop()
        store = JobStore(url)
        yield server, store
        store.close()


def test_each_job_is_a_progress_bar_with_its_numbers_in_words(backend):
    server, store = backend
    active = store.create_job("4", "v1", tasks(range(1, 11))).job_id
    claimed = [t.task_id for t in store.claim_tasks(active, 5, WORKER)]
    store.mark_done(active, claimed[:3])
    store.mark_failed(active, claimed[3], "image <b>host</b> answered 404", retryable=False, worker_id=WORKER)
    finished = store.create_job("5", "v1", tasks(range(20, 22))).job_id
    store.mark_done(finished, [t.task_id for t in store.claim_tasks(finished, 5, WORKER)])

    view = jobs_view.jobs_view(BackendClient(server.url))
    shown = Jobs(view.html).jobs
    assert [job["attrs"]["data-job"] for job in shown] == [finished, active]  # newest first
    assert view.active == 1 and "2 jobs, 1 active" in view.status

    done, running = shown
    assert running["attrs"]["data-state"] == "running"
    bar = running["bar"]
    assert (bar["aria-valuemin"], bar["aria-valuemax"], bar["aria-valuenow"]) == ("0", "10", "4")
    assert bar["aria-valuetext"].startswith("3 of 10 done, 1 failed, 6 left")
    text = " ".join(running["text"].split())
    assert "Project 4" in text and "running" in text and "40%" in text
    assert "3 of 10 done, 1 failed, 6 left" in text and "tasks/s" in text and "left" in text
    # The task error is shown as text (escaped: never markup from a failure message).
    assert "task 4 (failed, 1 attempt): image <b>host</b> answered 404" in text
    assert "&lt;b&gt;host" in view.html and "<b>host</b>" not in view.html
    assert [b["data-job"] for b in running["buttons"]] == [active]
    assert "Cancel job" in running["buttons"][0]["aria-label"]

    assert done["attrs"]["data-state"] == "done" and done["buttons"] == []
    assert done["bar"]["aria-valuenow"] == "2" and "2 of 2 done, 0 failed, 0 left" in done["text"]
    assert "time left" not in done["text"] and "about" not in done["text"]

    only = jobs_view.jobs_view(BackendClient(server.url), " 5 ")
    assert [job["attrs"]["data-job"] for job in Jobs(only.html).jobs] == [finished]
    assert "for project 5" in only.status


def test_cancel_button_cancels_and_a_second_click_says_why_not(backend):
    server, store = backend
    client = BackendClient(server.url)
    job_id = store.create_job("4", "v1", tasks(range(1, 4))).job_id

    message = jobs_view.cancel_job(client, job_id)
    assert message.startswith(f"Cancelled job `{job_id[:8]}` (project 4): 0 of 3")
    assert store.job_state(job_id) == "cancelled"
    (shown,) = Jobs(jobs_view.jobs_view(client).html).jobs
    assert shown["attrs"]["data-state"] == "cancelled" and shown["buttons"] == []

    again = jobs_view.cancel_job(client, job_id)
    assert again.startswith("Not cancelled:") and "already finished (cancelled" in again
    unknown = jobs_view.cancel_job(client, "feedface")
    assert unknown.startswith("Not cancelled: no job 'feedface'")
    assert jobs_view.cancel_job(client, None) == "No job given to cancel."


def test_no_jobs_says_where_jobs_come_from(backend):
    server, _ = backend
    view = jobs_view.jobs_view(BackendClient(server.url))
    assert Jobs(view.html).jobs == [] and "No prediction jobs" in view.html
    assert "PREDICT_DEADLINE_S" in view.status and view.active == 0


def test_backend_without_store_or_down_is_a_status_line_not_an_error(tmp_path):
    with ThreadedBackend(None, jobs_db=None) as server:
        view = jobs_view.jobs_view(BackendClient(server.url))
        assert view.status.startswith("**Jobs unavailable:**") and "JOBS_DB" in view.status
        assert "DATA_DIR" in view.html and view.active == 0
        with pytest.raises(BackendError, match="JOBS_DB") as info:
            jobs_view.cancel_job(BackendClient(server.url), "abc")
        assert info.value.status == 503
    down = jobs_view.jobs_view(BackendClient(f"http://127.0.0.1:{free_port()}", connect_timeout=2))
    assert "can't reach the backend" in down.status


def test_times_and_rates_read_as_words():
    assert [jobs_view.duration(s) for s in (0, 0.2, 52, 200, 3599, 7500)] == [
        "0 s", "1 s", "52 s", "3 min 20 s", "59 min 59 s", "2 h 05 min"]
    job = {"id": "j", "project": "1", "model_version": "v", "state": "running", "total": 5, "done": 0,
           "failed": 0, "pending": 5, "running": 0, "rate": None, "eta_s": None, "error": None, "errors": [],
           "created": time.time(), "updated": time.time()}
    assert jobs_view.progress_text(job) == "0 of 5 done, 0 failed, 5 left · time left: not known yet"  # type: ignore[arg-type]
    slow = {**job, "done": 1, "pending": 4, "rate": 0.01, "eta_s": 400.0}
    assert jobs_view.progress_text(slow) == "1 of 5 done, 0 failed, 4 left · 0.6 tasks/min · about 6 min 40 s left"  # type: ignore[arg-type]


def test_cancel_click_data_and_the_tab_builds():
    import gradio as gr

    assert _clicked_job(gr.EventData(None, {"job": "abc"})) == "abc"
    assert _clicked_job(gr.EventData(None, {})) is None
    assert _clicked_job(gr.EventData(None, None)) is None
    demo = build_demo(BackendClient("http://127.0.0.1:9"))
    assert any(getattr(block, "elem_id", None) == "jobs-list" for block in demo.blocks.values())
