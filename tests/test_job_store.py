"""The persistent job store (backend/jobs/store.py) on real SQLite files in temp dirs and on a real
PostgreSQL (each test runs on both; tests/conftest_pg.py): idempotent job
creation, leased claims, a killed worker's tasks coming back, bounded retries, progress, cancel, and
several processes sharing one database. Time is moved with a settable clock where leases or back-offs
would otherwise need sleeping."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from backend.jobs.db import jobs_table
from backend.jobs.store import CANCELLED, DONE, FAILED, PENDING, QUEUED, RUNNING, JobStore, JobStoreError, default_url
from backend.ls_api import Credentials
from tests.ls_server import REPO_ROOT


class Clock:
    """A settable epoch clock shared by a store and its test."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def tasks(ids: range | list[int]) -> list[dict[str, object]]:
    return [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in ids]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'jobs.sqlite3'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """Each store test runs on a SQLite file and on a database of a real PostgreSQL (conftest_pg)."""
    if request.param == "sqlite":
        return sqlite_url
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db_url: str, clock: Clock) -> JobStore:
    return JobStore(db_url, clock=clock, max_attempts=3, retry_delay_s=10.0)


def run_python(code: str, *args: str) -> subprocess.Popen[str]:
    """A separate process running ``code`` (with ``sys.argv[1:] == args``) from the repository root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_create_job_is_idempotent_per_project_version_and_task(store: JobStore) -> None:
    first = store.create_job("7", "v1", tasks(range(5)), plan={"phrases": ["cat"]})
    assert (first.added, first.already_queued) == (5, 0)
    again = store.create_job("7", "v1", tasks(range(5)))
    assert (again.job_id, again.added, again.already_queued) == (first.job_id, 0, 5)  # nothing new: same job
    more = store.create_job("7", "v1", tasks(range(3, 8)))
    assert (more.added, more.already_queued) == (3, 2) and more.job_id != first.job_id
    # Another version or another project is another job for the same task ids.
    assert store.create_job("7", "v2", tasks(range(5))).added == 5
    assert store.create_job("8", "v1", tasks(range(5))).added == 5
    # Duplicates inside one call are stored once.
    assert store.create_job("9", "v1", tasks([1, 1, 2])).added == 2
    progress = store.progress(first.job_id or "")
    assert progress is not None and (progress.state, progress.total, progress.pending) == (QUEUED, 5, 5)


def test_failed_task_can_be_queued_again_but_done_one_cannot(store: JobStore) -> None:
    job = store.create_job("7", "v1", tasks(range(3))).job_id
    assert job is not None
    claimed = store.claim_tasks(job, 3, "w")
    store.mark_done(job, [0])
    assert store.mark_failed(job, 1, "image gone", retryable=False) == FAILED
    # task 2 still running in the active job; task 1 failed; task 0 done
    again = store.create_job("7", "v1", tasks(range(3)))
    assert (again.added, again.already_queued) == (1, 2) and len(claimed) == 3


def test_create_job_names_a_task_without_id(store: JobStore) -> None:
    with pytest.raises(ValueError, match="task 1 has no integer 'id'"):
        store.create_job("7", "v1", [{"id": 1}, {"data": {}}])
    assert store.list_jobs() == []


def test_claims_hand_out_each_task_once_until_its_lease_expires(store: JobStore, clock: Clock) -> None:
    job = store.create_job("7", "v1", tasks(range(5))).job_id
    assert job is not None
    a = store.claim_tasks(job, 3, "worker-a", lease_s=60)
    b = store.claim_tasks(job, 3, "worker-b", lease_s=60)
    assert [t.task_id for t in a] == [0, 1, 2] and [t.task_id for t in b] == [3, 4]
    assert a[0].task == tasks([0])[0] and a[0].attempts == 1
    assert store.claim_tasks(job, 3, "worker-c", lease_s=60) == []
    assert store.get_job(job).state == RUNNING  # type: ignore[union-attr]
    clock.advance(30)
    assert store.renew(job, [0], "worker-a", lease_s=60) == 1  # a is alive and renews task 0 only
    assert store.renew(job, [3], "worker-a", lease_s=60) == 0  # not a's task
    clock.advance(31)  # the other leases ran out: their tasks are claimable again, task 0 isn't
    c = store.claim_tasks(job, 10, "worker-c", lease_s=60)
    assert [t.task_id for t in c] == [1, 2, 3, 4] and all(t.attempts == 2 for t in c)
    # a late answer from worker-a for a task it lost doesn't undo worker-c's claim
    assert store.mark_failed(job, 1, "late", worker_id="worker-a") == RUNNING


def test_task_of_a_killed_worker_is_claimed_again_after_its_lease(db_url: str) -> None:
    """A real worker process claims tasks and is killed with SIGKILL before it finishes them."""
    store = JobStore(db_url)
    job = store.create_job("7", "v1", tasks(range(4))).job_id
    assert job is not None
    worker = run_python("""
        import sys, time
        from backend.jobs.store import JobStore
        store = JobStore(sys.argv[1])
        claimed = store.claim_tasks(sys.argv[2], 2, "doomed", lease_s=600)
        print(" ".join(str(t.task_id) for t in claimed), flush=True)
        time.sleep(600)  # "predicting" until killed
    """, db_url, job)
    assert worker.stdout is not None
    held = [int(x) for x in worker.stdout.readline().split()]
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert held == [0, 1], worker.stderr.read() if worker.stderr else ""

    # Right after the crash the dead worker's tasks are still leased ...
    assert [t.task_id for t in store.claim_tasks(job, 10, "survivor")] == [2, 3]
    # ... and a restart before the lease ends leaves them alone.
    assert store.resume() == [job]
    assert store.progress(job).running == 4  # type: ignore[union-attr]
    # After the lease a restarted process gets them back, with the crash counted as an attempt.
    later = JobStore(db_url, clock=lambda: time.time() + 601)
    assert later.resume() == [job]
    assert later.progress(job).pending == 4  # type: ignore[union-attr]
    again = later.claim_tasks(job, 2, "restarted")
    assert [(t.task_id, t.attempts) for t in again] == [(0, 2), (1, 2)]


def test_restart_reclaims_a_killed_local_workers_tasks_without_waiting_for_the_lease(db_url: str) -> None:
    """A backend killed with SIGKILL and restarted on the same host: its runner's claims (named by
    ``worker_name``: host, pid, process start) come back at once; a live runner's stay its own."""
    from backend.jobs.workers import worker_gone, worker_name

    store = JobStore(db_url)
    job = store.create_job("7", "v1", tasks(range(4))).job_id
    assert job is not None
    worker = run_python("""
        import sys, time
        from backend.jobs.workers import worker_name
        from backend.jobs.store import JobStore
        name = worker_name()
        JobStore(sys.argv[1]).claim_tasks(sys.argv[2], 2, name, lease_s=600)
        print(name, flush=True)
        time.sleep(600)
    """, db_url, job)
    assert worker.stdout is not None
    dead = worker.stdout.readline().strip()
    alive = worker_name()
    assert store.claim_tasks(job, 1, alive, lease_s=600)[0].task_id == 2
    assert not worker_gone(dead)  # still running
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert worker_gone(dead) and not worker_gone(alive) and not worker_gone("other-host:1:2:abc")
    assert store.resume(gone=worker_gone) == [job]
    progress = store.progress(job)
    assert progress is not None and (progress.pending, progress.running) == (3, 1), progress
    assert [t.task_id for t in store.claim_tasks(job, 10, "restarted")] == [0, 1, 3]


def test_retries_are_bounded_and_back_off(store: JobStore, clock: Clock) -> None:
    job = store.create_job("7", "v1", tasks([1])).job_id
    assert job is not None
    for attempt in (1, 2):
        (claimed,) = store.claim_tasks(job, 1, "w")
        assert claimed.attempts == attempt
        assert store.mark_failed(job, 1, f"image unreachable ({attempt})", worker_id="w") == PENDING
        assert store.claim_tasks(job, 1, "w") == []  # backing off
        clock.advance(10.0 * attempt)
    (claimed,) = store.claim_tasks(job, 1, "w")
    assert claimed.attempts == 3
    assert store.mark_failed(job, 1, "image unreachable (3)", worker_id="w") == FAILED
    progress = store.progress(job)
    assert progress is not None and (progress.state, progress.failed, progress.done) == (DONE, 1, 0)
    assert [(e.task_id, e.state, e.attempts, e.error) for e in progress.errors] == [
        (1, FAILED, 3, "image unreachable (3)")]


def test_crash_on_the_last_attempt_fails_the_task(store: JobStore, clock: Clock) -> None:
    """A task that kills its worker every time ends after max_attempts instead of looping."""
    job = store.create_job("7", "v1", tasks([1])).job_id
    assert job is not None
    for _ in range(3):
        assert len(store.claim_tasks(job, 1, "w", lease_s=5)) == 1
        clock.advance(6)  # the worker died: the lease runs out
    assert store.claim_tasks(job, 1, "w") == []
    progress = store.progress(job)
    assert progress is not None and (progress.state, progress.failed) == (DONE, 1)
    assert "worker stopped" in progress.errors[0].error


def test_release_does_not_count_an_attempt(store: JobStore) -> None:
    job = store.create_job("7", "v1", tasks([1, 2])).job_id
    assert job is not None
    store.claim_tasks(job, 2, "w")
    store.release(job, [1, 2], "w")
    assert [t.attempts for t in store.claim_tasks(job, 2, "w")] == [1, 1]


def test_progress_reports_rate_and_eta(store: JobStore, clock: Clock) -> None:
    job = store.create_job("7", "v1", tasks(range(10))).job_id
    assert job is not None
    assert store.progress(job).rate is None  # type: ignore[union-attr]
    for _ in range(4):  # one task every 2 s
        (claimed,) = store.claim_tasks(job, 1, "w")
        clock.advance(2.0)
        store.mark_done(job, [claimed.task_id])
    progress = store.progress(job)
    assert progress is not None
    assert (progress.state, progress.done, progress.pending, progress.total) == (RUNNING, 4, 6, 10)
    assert progress.rate == pytest.approx(0.5)
    assert progress.eta_s == pytest.approx(12.0)
    as_json = progress.to_json()
    assert as_json["eta_s"] == 12.0 and as_json["done"] == 4 and as_json["errors"] == []
    assert [p.id for p in store.list_jobs(project="7")] == [job] and store.list_jobs(project="8") == []


def test_cancelled_job_hands_out_no_more_tasks(store: JobStore) -> None:
    job = store.create_job("7", "v1", tasks(range(4))).job_id
    assert job is not None
    (first,) = store.claim_tasks(job, 1, "w")
    assert store.cancel(job) is True and store.cancel(job) is False
    assert store.claim_tasks(job, 4, "w") == []
    assert store.next_job() is None and store.unfinished_jobs() == []
    store.mark_done(job, [first.task_id])  # work finished before the cancel is still recorded
    progress = store.progress(job)
    assert progress is not None and (progress.state, progress.done, progress.pending) == (CANCELLED, 1, 3)
    # its tasks are free for a new job
    assert store.create_job("7", "v1", tasks(range(4))).added == 4


def test_failed_job_keeps_its_error(store: JobStore) -> None:
    job = store.create_job("7", "v1", tasks(range(2))).job_id
    assert job is not None
    store.fail_job(job, "Label Studio rejected the key (HTTP 401)")
    progress = store.progress(job)
    assert progress is not None and progress.state == FAILED and "HTTP 401" in (progress.error or "")
    assert store.claim_tasks(job, 2, "w") == []


def test_two_processes_never_claim_the_same_task(db_url: str) -> None:
    store = JobStore(db_url)
    job = store.create_job("7", "v1", tasks(range(120))).job_id
    assert job is not None
    code = """
        import sys
        from backend.jobs.store import JobStore
        store = JobStore(sys.argv[1])
        while True:
            claimed = store.claim_tasks(sys.argv[2], 3, sys.argv[3])
            if not claimed:
                break
            print(" ".join(str(t.task_id) for t in claimed), flush=True)
            store.mark_done(sys.argv[2], [t.task_id for t in claimed])
    """
    workers = [run_python(code, db_url, job, f"w{i}") for i in range(2)]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err for _, err in outputs]
    claimed = [[int(x) for x in out.split()] for out, _ in outputs]
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == list(range(120))
    progress = store.progress(job)
    assert progress is not None and (progress.state, progress.done) == (DONE, 120)


def test_database_file_is_private_and_survives_reopening(sqlite_url: str, tmp_path: Path) -> None:
    db_url = sqlite_url
    credentials = Credentials("http://127.0.0.1:8080", "secret-key-0123456789", "setup")
    first = JobStore(db_url)
    job = first.create_job("7", "v1", tasks([1]), plan={"phrases": ["cat"], "box_threshold": 0.3},
                           label_config="<View/>", credentials=credentials).job_id
    first.close()
    path = tmp_path / "data" / "jobs.sqlite3"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reopened = JobStore(db_url).get_job(job or "")
    assert reopened is not None and reopened.credentials == credentials
    assert reopened.plan == {"phrases": ["cat"], "box_threshold": 0.3} and reopened.label_config == "<View/>"
    assert "secret-key" not in repr(reopened)


def test_project_state_is_shared_between_stores(db_url: str, clock: Clock) -> None:
    """Two store instances stand for two gunicorn workers on one database file."""
    a, b = JobStore(db_url, clock=clock).projects, JobStore(db_url, clock=clock).projects
    assert b.get("7") is None
    a.update("7", extra={"prompt": "cat"}, label_config="<View/>",
                           credentials=Credentials("http://ls:8080", "key-of-setup-0123"))
    clock.advance(1)
    a.update("7", remembered={"phrases": ["dog"]})
    state = b.get("7")
    assert state is not None
    assert (state.extra, state.remembered, state.label_config) == ({"prompt": "cat"}, {"phrases": ["dog"]}, "<View/>")
    assert state.credentials is not None and state.credentials.api_key == "key-of-setup-0123"
    assert b.get("8") is None  # credentials belong to the project that sent them
    with pytest.raises(TypeError, match="unknown project state fields"):
        b.update("7", prompt="x")
    b.forget("7")
    assert a.get("7") is None


def all_at_once(n: int, action: Callable[[int], object]) -> list[str]:
    """Run ``action(i)`` in ``n`` threads released together; returns the errors they raised."""
    barrier = threading.Barrier(n)
    errors: list[str] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            action(i)
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append(repr(error))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_replicas_starting_together_create_the_tables_once(db_url: str) -> None:
    """Replicas started together on a new database: on PostgreSQL, concurrent CREATE TABLEs collided."""
    stores: list[JobStore] = []
    assert all_at_once(6, lambda _: stores.append(JobStore(db_url))) == []
    assert stores[0].create_job("7", "v1", tasks([1])).added == 1


def test_first_setup_of_a_project_from_two_replicas_at_once(db_url: str) -> None:
    """Each replica's read-then-insert of a new project's row: on PostgreSQL the second insert failed."""
    stores = [JobStore(db_url) for _ in range(6)]
    assert all_at_once(6, lambda i: stores[i].projects.update("7", extra={"replica": i})) == []
    state = stores[0].projects.get("7")
    assert state is not None and state.extra is not None and state.extra["replica"] in range(6)


def test_same_tasks_from_two_replicas_at_once_make_one_job(db_url: str) -> None:
    stores = [JobStore(db_url) for _ in range(6)]
    created: list[str | None] = []
    assert all_at_once(6, lambda i: created.append(stores[i].create_job("7", "v1", tasks(range(20))).job_id)) == []
    assert len(set(created)) == 1
    assert [p.total for p in stores[0].list_jobs(project="7")] == [20]


def test_workers_finishing_the_last_tasks_at_once_finish_the_job(db_url: str) -> None:
    """Each worker's commit settles the job; on PostgreSQL each used to miss the other's last task."""
    stores = [JobStore(db_url) for _ in range(8)]
    for version in ("v1", "v2", "v3"):  # a race: three rounds
        job = stores[0].create_job("7", version, tasks(range(8))).job_id
        assert job is not None and len(stores[0].claim_tasks(job, 8, "w")) == 8
        assert all_at_once(8, lambda i, job=job: stores[i].mark_done(job, [i])) == []
        progress = stores[0].progress(job)
        assert progress is not None and (progress.state, progress.done) == (DONE, 8)


def test_a_read_sees_one_snapshot(db_url: str) -> None:
    """progress() reads counts, rate and errors in several statements: a commit in between must not
    show in some of them only (PostgreSQL's default, read committed, showed it)."""
    reader, writer = JobStore(db_url), JobStore(db_url)
    count = sa.select(sa.func.count()).select_from(jobs_table)
    with reader.db.read() as conn:
        before = conn.execute(count).scalar_one()
        assert writer.create_job("7", "v1", tasks([1])).added == 1
        assert conn.execute(count).scalar_one() == before
    with reader.db.read() as conn:
        assert conn.execute(count).scalar_one() == before + 1


def test_database_location_from_the_environment(tmp_path: Path) -> None:
    assert default_url({"JOBS_DB": "postgresql://db/jobs", "DATA_DIR": "/x"}) == "postgresql://db/jobs"
    assert default_url({"DATA_DIR": str(tmp_path)}) == f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    with pytest.raises(JobStoreError, match="in-memory"):
        JobStore("sqlite://")
