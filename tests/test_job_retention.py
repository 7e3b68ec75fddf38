"""Finished jobs leave the store after JOBS_KEEP_DAYS (``backend/jobs/retention.py``), with their task
rows and the key they wrote with; active jobs stay however old. On SQLite and on a real PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from backend.jobs.db import job_tasks_table, jobs_table
from backend.jobs.retention import DAY_S, keep_finished_s
from backend.jobs.store import JobStore
from backend.ls_api import Credentials
from tests.test_job_store import Clock, clock, db_url, sqlite_url, tasks  # noqa: F401 - fixtures

KEY = "0123456789abcdef0123456789abcdef01234567"


def rows(store: JobStore) -> tuple[set[str], int, list[str]]:
    """(job ids, task rows, stored keys)."""
    with store.engine.connect() as conn:
        jobs = conn.execute(sa.select(jobs_table.c.id, jobs_table.c.api_key)).all()
        count = conn.execute(sa.select(sa.func.count()).select_from(job_tasks_table)).scalar_one()
    return {str(job_id) for job_id, _ in jobs}, int(count), [key for _, key in jobs if key]


def test_finished_jobs_past_the_setting_go_with_their_tasks_and_keys(db_url: str, clock: Clock) -> None:  # noqa: F811
    store = JobStore(db_url, clock=clock, keep_finished=7 * DAY_S)
    credentials = Credentials("http://ls.example:8080", KEY)
    done = store.create_job("7", "v1", tasks(range(3)), credentials=credentials).job_id
    cancelled = store.create_job("8", "v1", tasks(range(2)), credentials=credentials).job_id
    active = store.create_job("9", "v1", tasks(range(4)), credentials=credentials).job_id
    assert done and cancelled and active
    store.mark_done(done, [0, 1, 2])
    assert store.cancel(cancelled)
    clock.advance(8 * DAY_S)
    recent = store.create_job("7", "v2", tasks(range(1))).job_id  # a job made: the old finished ones go
    assert recent
    jobs, task_rows, keys = rows(store)
    assert jobs == {active, recent} and task_rows == 4 + 1 and keys == [KEY]
    assert store.progress(done) is None and store.progress(active) is not None
    # A job finished a day ago stays; a week later a restart's resume deletes it.
    store.mark_done(recent, [0])
    clock.advance(DAY_S)
    assert store.resume() == [active] and rows(store)[0] == {active, recent}
    clock.advance(7 * DAY_S)
    assert store.resume() == [active] and rows(store)[0] == {active}


def test_keep_forever(sqlite_url: str, clock: Clock) -> None:  # noqa: F811
    store = JobStore(sqlite_url, clock=clock, keep_finished=None)
    job = store.create_job("7", "v1", tasks(range(2))).job_id
    assert job
    store.mark_done(job, [0, 1])
    clock.advance(10_000 * DAY_S)
    store.create_job("7", "v1", tasks(range(2, 3)))
    assert job in rows(store)[0]


@pytest.mark.parametrize("text, seconds", [("", 30 * DAY_S), ("7", 7 * DAY_S), ("0.5", DAY_S / 2), ("0", None)])
def test_keep_days_setting(text: str, seconds: float | None) -> None:
    assert keep_finished_s({"JOBS_KEEP_DAYS": text}) == seconds


@pytest.mark.parametrize("text", ["-1", "inf", "nan", "a week"])
def test_a_bad_keep_days_setting_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="JOBS_KEEP_DAYS"):
        keep_finished_s({"JOBS_KEEP_DAYS": text})
