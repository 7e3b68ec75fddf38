"""The persistent job store: prediction jobs and their tasks, shared by every worker process.

A /predict that hits its deadline hands its unreached tasks to a job; the job's rows are in the shared
database (``db.py``: SQLite with ``BEGIN IMMEDIATE`` writers, or any SQLAlchemy URL, where claims use
``FOR UPDATE SKIP LOCKED``), so jobs survive restarts and every worker process shares the work.

A task is *claimed* with a lease: the claiming worker owns it until ``lease_expires``; a worker that
dies leaves it ``running`` with a lease that runs out, after which any worker may claim it again.
Claims count attempts, so a task that kills its worker every time still ends after
``MAX_TASK_ATTEMPTS``.

The Label Studio key a job writes with is stored with it: see ``db.py`` on secrets.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from ..api_schema import ACTIVE_JOB_STATES, JOB_STATES, JobJson
from ..ls_api import Credentials
from . import retention
from .db import (
    Database,
    JobStoreError,
    JsonObject,
    credentials_from_row,
    default_url,
    job_tasks_table,
    jobs_table,
    serialise,
)
from .projects import ProjectStates, StoredProjectState

__all__ = ["Database", "JobStoreError", "StoredProjectState", "default_url"]  # re-exported for callers

# A task is tried at most this many times (claims count, so crashes count too).
MAX_TASK_ATTEMPTS = 3
# How long a claim stays valid without renewal; a dead worker's tasks are re-claimable after it.
DEFAULT_LEASE_S = 600.0
# A retryable failure waits attempts x this before the task can be claimed again.
RETRY_DELAY_S = 5.0
# The rate in progress() counts tasks finished in this recent window.
RATE_WINDOW_S = 120.0
# How many recent task errors progress() reports.
LAST_ERRORS = 5
# SQLite's limit on bound parameters is large, but keep IN lists modest.
_IN_CHUNK = 500

# Job states
QUEUED, RUNNING, DONE, FAILED, CANCELLED = JOB_STATES  # one definition, shared with the HTTP JSON
# Task states
PENDING = "pending"  # plus RUNNING, DONE, FAILED

# -- values handed out (never ORM rows) ----------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """A job as created: what to predict with and where to write."""

    id: str
    project: str
    model_version: str
    plan: JsonObject
    label_config: str | None
    credentials: Credentials | None = field(repr=False)  # its key stays out of reprs and logs
    state: str
    error: str | None
    created: float  # epoch seconds
    updated: float


@dataclass(frozen=True)
class JobCreated:
    """What ``create_job`` did: ``job_id`` is the new job, or (``added == 0``) an active job that
    already holds these tasks, or None when no task was given."""

    job_id: str | None
    added: int  # tasks put in the new job
    already_queued: int  # tasks left out: pending, running or done in an active job of this version


@dataclass(frozen=True)
class ClaimedTask:
    job_id: str
    task_id: int
    task: JsonObject  # the Label Studio task as /predict received it
    attempts: int  # including this one


@dataclass(frozen=True)
class TaskError:
    task_id: int
    state: str  # "failed" (given up) or "pending" (will be retried)
    attempts: int
    error: str


@dataclass(frozen=True)
class JobProgress:
    """Where a job stands; ``rate`` in tasks/s over the last RATE_WINDOW_S, ``eta_s`` in seconds
    (None while there is no rate to go by)."""

    id: str
    project: str
    model_version: str
    state: str
    total: int
    done: int
    failed: int
    pending: int
    running: int
    rate: float | None
    eta_s: float | None
    error: str | None  # why the whole job stopped
    errors: tuple[TaskError, ...]  # the most recent task errors, newest first
    created: float
    updated: float

    @property
    def finished(self) -> bool:
        return self.state not in ACTIVE_JOB_STATES

    def to_json(self) -> JobJson:
        """The JSON an HTTP API answers with (its one typed definition: ``backend.api_schema``)."""
        return {
            "id": self.id, "project": self.project, "model_version": self.model_version,
            "state": self.state, "total": self.total, "done": self.done, "failed": self.failed,
            "pending": self.pending, "running": self.running,
            "rate": None if self.rate is None else round(self.rate, 4),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "error": self.error,
            "errors": [{"task": e.task_id, "state": e.state, "attempts": e.attempts, "error": e.error}
                       for e in self.errors],
            "created": self.created, "updated": self.updated,
        }


# -- the store ------------------------------------------------------------------------------------------
class JobStore:
    """Jobs and their tasks (and, as ``projects``, per-project state); safe for threads and processes.

    Arguments:
        url: a SQLAlchemy URL (``sqlite:////data/jobs.sqlite3``, ``postgresql+psycopg://...``) or an
            open ``Database``; default: ``default_url()``.
        clock: epoch seconds (``time.time``); tests pass another to move time.
        max_attempts: tries per task (MAX_TASK_ATTEMPTS).
        keep_finished: seconds a finished job stays before ``create_job`` or ``resume`` deletes it
            (``retention``; None: forever); "env": JOBS_KEEP_DAYS (default 30 days).
    """

    def __init__(self, url: str | Database | None = None, *, clock: Callable[[], float] = time.time,
                 max_attempts: int = MAX_TASK_ATTEMPTS, retry_delay_s: float = RETRY_DELAY_S,
                 keep_finished: float | None | Literal["env"] = "env") -> None:
        if max_attempts < 1:
            raise JobStoreError(f"max_attempts must be at least 1, got {max_attempts}")
        # Seconds a finished job is kept (``retention``): JOBS_KEEP_DAYS by default; None: forever.
        self.keep_finished_s = retention.keep_finished_s() if keep_finished == "env" else keep_finished
        self.db = url if isinstance(url, Database) else Database(url, clock)
        self.clock = self.db.clock
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s
        self.engine = self.db.engine
        self.projects = ProjectStates(self.db)  # per-project state, in the same database
        self._write = self.db.write
        self._read = self.db.read

    def close(self) -> None:
        self.db.close()

    def after_fork(self) -> None:
        """Call in a child process (gunicorn post_fork) so it opens its own connections."""
        self.db.after_fork()

    # -- jobs ------------------------------------------------------------------------------------------
    def create_job(self, project: str, model_version: str, tasks: Sequence[Mapping[str, Any]], *,
                   plan: Mapping[str, Any] | None = None, label_config: str | None = None,
                   credentials: Credentials | None = None) -> JobCreated:
        """A new queued job for the tasks no active job of ``(project, model_version)`` already holds.

        Arguments:
            project: the project key ("7").
            model_version: the version every prediction of the job carries.
            tasks: Label Studio tasks, each with an integer ``id`` (stored as given).
            plan: the prompt plan (phrases, thresholds) as JSON.
            label_config: the project's labeling config.
            credentials: Label Studio URL and key the writer uses (stored; see the module docstring).
        Returns:
            ``JobCreated``; a task pending, running or done in an active job of the same project and
            version is not added again (a failed one is).
        Raises:
            ValueError: a task without an integer id (named).
        """
        by_id: dict[int, JsonObject] = {}
        for index, task in enumerate(tasks):
            task_id = task.get("id") if isinstance(task, Mapping) else None
            if not isinstance(task_id, int) or isinstance(task_id, bool):
                raise ValueError(  # noqa: TRY004 - bad input from a request: the caller answers 400
                    f"task {index} has no integer 'id' (got {task_id!r}); a job needs Label Studio task ids "
                    "to write predictions to")
            by_id.setdefault(task_id, dict(task))
        if not by_id:
            return JobCreated(None, 0, 0)
        now = self.clock()
        project = str(project)
        with self._write() as conn:
            serialise(conn, f"jobs|{project}|{model_version}")  # read held tasks, then insert
            held = self._held_tasks(conn, project, model_version, list(by_id))
            new = [task_id for task_id in by_id if task_id not in held]
            if not new:
                return JobCreated(min(held.values()), 0, len(held))
            retention.prune_finished(conn, now, self.keep_finished_s)
            job_id = uuid.uuid4().hex
            conn.execute(jobs_table.insert().values(
                id=job_id, project=project, model_version=model_version, plan=dict(plan or {}),
                label_config=label_config, ls_url=credentials.url if credentials else None,
                api_key=credentials.api_key if credentials else None,
                credentials_source=credentials.source if credentials else None,
                state=QUEUED, error=None, created=now, updated=now))
            conn.execute(job_tasks_table.insert(), [
                {"job_id": job_id, "task_id": task_id, "task": by_id[task_id], "state": PENDING, "attempts": 0,
                 "not_before": 0.0, "updated": now} for task_id in new])
        return JobCreated(job_id, len(new), len(held))

    def held_tasks(self, project: str, model_version: str, task_ids: Sequence[int]) -> dict[int, str]:
        """{task id: job id} of the given tasks that an active job of (project, version) holds
        (pending, running or done): a new /predict must not predict them again."""
        with self.db.read() as conn:
            return self._held_tasks(conn, str(project), model_version, list(task_ids))

    def _held_tasks(self, conn: Connection, project: str, model_version: str,
                    task_ids: list[int]) -> dict[int, str]:
        """task id -> id of an active job of (project, version) where it is pending, running or done."""
        held: dict[int, str] = {}
        j, t = jobs_table, job_tasks_table
        for start in range(0, len(task_ids), _IN_CHUNK):
            rows = conn.execute(
                sa.select(t.c.task_id, t.c.job_id).join(j, j.c.id == t.c.job_id).where(
                    j.c.project == project, j.c.model_version == model_version,
                    j.c.state.in_(ACTIVE_JOB_STATES), t.c.state.in_((PENDING, RUNNING, DONE)),
                    t.c.task_id.in_(task_ids[start:start + _IN_CHUNK])))
            for task_id, job_id in rows:
                held.setdefault(int(task_id), str(job_id))
        return held

    def get_job(self, job_id: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).mappings().first()
        return None if row is None else _job(row)

    def cancel(self, job_id: str) -> bool:
        """Stop an active job: no task of it is claimed again. False when it wasn't active."""
        now = self.clock()
        with self._write() as conn:
            changed = conn.execute(jobs_table.update().where(
                jobs_table.c.id == job_id, jobs_table.c.state.in_(ACTIVE_JOB_STATES)).values(
                state=CANCELLED, updated=now, finished=now)).rowcount
        return bool(changed)

    def fail_job(self, job_id: str, error: str) -> None:
        """Stop a job for a reason that no retry fixes (a rejected API key); ``error`` is shown."""
        now = self.clock()
        with self._write() as conn:
            conn.execute(jobs_table.update().where(
                jobs_table.c.id == job_id, jobs_table.c.state.in_(ACTIVE_JOB_STATES)).values(
                state=FAILED, error=error, updated=now, finished=now))

    def job_state(self, job_id: str) -> str | None:
        with self._read() as conn:
            return conn.execute(sa.select(jobs_table.c.state).where(jobs_table.c.id == job_id)).scalar()

    def next_job(self) -> Job | None:
        """The oldest active job with a task that can be claimed now (pending and due, or with an
        expired lease)."""
        now = self.clock()
        j, t = jobs_table, job_tasks_table
        with self._read() as conn:
            row = conn.execute(
                sa.select(j).where(j.c.state.in_(ACTIVE_JOB_STATES), sa.exists().where(
                    t.c.job_id == j.c.id, _claimable(now))).order_by(j.c.created, j.c.id).limit(1)
            ).mappings().first()
        return None if row is None else _job(row)

    def unfinished_jobs(self) -> list[str]:
        with self._read() as conn:
            return [str(r) for r in conn.execute(sa.select(jobs_table.c.id).where(
                jobs_table.c.state.in_(ACTIVE_JOB_STATES)).order_by(jobs_table.c.created)).scalars()]

    def resume(self, gone: Callable[[str], bool] | None = None) -> list[str]:
        """On start: tasks whose lease ran out (their worker died) go back to pending, and so do the
        tasks of a worker ``gone(lease_owner)`` knows is dead (a backend restarted after a kill -9
        would otherwise wait out the whole lease); finished jobs past ``keep_finished`` are deleted;
        returns the ids of the unfinished jobs, oldest first."""
        now = self.clock()
        t = job_tasks_table
        with self._write() as conn:
            retention.prune_finished(conn, now, self.keep_finished_s)
            conn.execute(t.update().where(t.c.state == RUNNING, t.c.lease_expires < now).values(
                state=PENDING, lease_owner=None, lease_expires=None, updated=now))
            if gone is not None:
                owners = conn.execute(sa.select(t.c.lease_owner).where(
                    t.c.state == RUNNING, t.c.lease_owner.is_not(None)).distinct()).scalars().all()
                dead = [owner for owner in owners if gone(str(owner))]
                if dead:
                    conn.execute(t.update().where(t.c.state == RUNNING, t.c.lease_owner.in_(dead)).values(
                        state=PENDING, lease_owner=None, lease_expires=None, updated=now))
        return self.unfinished_jobs()

    # -- tasks -----------------------------------------------------------------------------------------
    def claim_tasks(self, job_id: str, n: int, worker_id: str, lease_s: float = DEFAULT_LEASE_S) -> list[ClaimedTask]:
        """Up to ``n`` tasks of an active job for ``worker_id``, leased for ``lease_s`` seconds.

        Tasks are pending ones that are due, or running ones whose lease expired (a dead worker's);
        one whose lease expired after its last allowed attempt is failed instead. Each claim counts
        as an attempt. Two callers never get the same task while its lease runs.
        """
        if n < 1:
            return []
        now = self.clock()
        t, j = job_tasks_table, jobs_table
        with self._write() as conn:
            state = conn.execute(sa.select(j.c.state).where(j.c.id == job_id)).scalar()
            if state not in ACTIVE_JOB_STATES:
                return []
            conn.execute(t.update().where(
                t.c.job_id == job_id, t.c.state == RUNNING, t.c.lease_expires < now,
                t.c.attempts >= self.max_attempts).values(
                state=FAILED, lease_owner=None, lease_expires=None, updated=now, finished=now,
                last_error=sa.func.coalesce(t.c.last_error + " / ", "") + (
                    f"its worker stopped (crash or kill?) on the last of {self.max_attempts} attempts")))
            rows = conn.execute(
                sa.select(t.c.task_id, t.c.task, t.c.attempts).where(t.c.job_id == job_id, _claimable(now))
                .order_by(t.c.task_id).limit(n).with_for_update(skip_locked=True)).all()
            ids = [int(r.task_id) for r in rows]
            if ids:
                conn.execute(t.update().where(t.c.job_id == job_id, t.c.task_id.in_(ids)).values(
                    state=RUNNING, lease_owner=worker_id, lease_expires=now + lease_s,
                    attempts=t.c.attempts + 1, updated=now))
                if state == QUEUED:
                    conn.execute(j.update().where(j.c.id == job_id).values(state=RUNNING, started=now, updated=now))
            self._settle(conn, job_id, now)
        return [ClaimedTask(job_id, int(r.task_id), dict(r.task), int(r.attempts) + 1) for r in rows]

    def renew(self, job_id: str, task_ids: Sequence[int], worker_id: str, lease_s: float = DEFAULT_LEASE_S) -> int:
        """Extend this worker's leases on ``task_ids``; returns how many it still held."""
        now = self.clock()
        t = job_tasks_table
        with self._write() as conn:
            return int(conn.execute(t.update().where(
                t.c.job_id == job_id, t.c.task_id.in_(list(task_ids)), t.c.state == RUNNING,
                t.c.lease_owner == worker_id).values(lease_expires=now + lease_s, updated=now)).rowcount)

    def mark_done(self, job_id: str, task_ids: Sequence[int]) -> None:
        """The tasks' predictions are in Label Studio (written now, or found there)."""
        if not task_ids:
            return
        now = self.clock()
        t = job_tasks_table
        with self._write() as conn:
            conn.execute(t.update().where(t.c.job_id == job_id, t.c.task_id.in_(list(task_ids)),
                                          t.c.state != DONE).values(
                state=DONE, lease_owner=None, lease_expires=None, updated=now, finished=now))
            self._settle(conn, job_id, now)

    def mark_failed(self, job_id: str, task_id: int, reason: str, retryable: bool = True,
                    worker_id: str | None = None) -> str:
        """Record why a running task failed; it goes back to pending (after a back-off) while it has
        attempts left and ``retryable``, else it is failed for good. Returns the task's new state
        (unchanged when the task wasn't running, or another worker holds it)."""
        now = self.clock()
        t = job_tasks_table
        where = [t.c.job_id == job_id, t.c.task_id == task_id, t.c.state == RUNNING]
        if worker_id is not None:
            where.append(t.c.lease_owner == worker_id)
        with self._write() as conn:
            # Locked: on PostgreSQL a claim of an expired lease could otherwise change attempts meanwhile.
            row = conn.execute(sa.select(t.c.attempts, t.c.state).where(*where).with_for_update()).first()
            if row is None:
                return str(conn.execute(sa.select(t.c.state).where(
                    t.c.job_id == job_id, t.c.task_id == task_id)).scalar() or "")
            again = retryable and row.attempts < self.max_attempts
            values: JsonObject = {"last_error": reason, "lease_owner": None, "lease_expires": None, "updated": now}
            if again:
                values.update(state=PENDING, not_before=now + self.retry_delay_s * row.attempts)
            else:
                values.update(state=FAILED, finished=now)
            conn.execute(t.update().where(*where).values(**values))
            self._settle(conn, job_id, now)
        return PENDING if again else FAILED

    def release(self, job_id: str, task_ids: Sequence[int], worker_id: str, *, delay_s: float = 0.0,
                reason: str | None = None) -> None:
        """Hand claimed tasks back untried (cancel, shutdown, a stopped job, Label Studio unavailable):
        the claim's attempt is not counted. ``delay_s``: not claimable before then (waiting for Label
        Studio to come back); ``reason``: shown as the tasks' error meanwhile."""
        if not task_ids:
            return
        now = self.clock()
        t = job_tasks_table
        extra: JsonObject = {"not_before": now + delay_s} if delay_s > 0 else {}
        if reason is not None:
            extra["last_error"] = reason
        with self._write() as conn:
            conn.execute(t.update().where(
                t.c.job_id == job_id, t.c.task_id.in_(list(task_ids)), t.c.state == RUNNING,
                t.c.lease_owner == worker_id).values(
                state=PENDING, lease_owner=None, lease_expires=None, updated=now, **extra,
                attempts=sa.func.max(t.c.attempts - 1, 0) if self.engine.dialect.name == "sqlite"
                else sa.func.greatest(t.c.attempts - 1, 0)))

    def _settle(self, conn: Connection, job_id: str, now: float) -> None:
        """An active job with no pending or running task left is done."""
        t, j = job_tasks_table, jobs_table
        # Lock the job's row before counting: on PostgreSQL (read committed) two workers finishing the
        # last two tasks at once would each still see the other's task running, and the job would
        # stay running with nothing left. Taken after the task updates, like every writer here.
        conn.execute(sa.select(j.c.id).where(j.c.id == job_id).with_for_update())
        left = conn.execute(sa.select(sa.func.count()).select_from(t).where(
            t.c.job_id == job_id, t.c.state.in_((PENDING, RUNNING)))).scalar_one()
        values: JsonObject = {"updated": now}
        if left == 0:
            values.update(state=DONE, finished=now)
        conn.execute(j.update().where(j.c.id == job_id, j.c.state.in_(ACTIVE_JOB_STATES)).values(**values))

    # -- progress --------------------------------------------------------------------------------------
    def progress(self, job_id: str) -> JobProgress | None:
        """Counts, rate, ETA and recent errors of a job; None for an unknown id."""
        with self._read() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).mappings().first()
            return None if row is None else self._progress(conn, row)

    def list_jobs(self, project: str | None = None, limit: int = 50) -> list[JobProgress]:
        """The most recent jobs (of ``project``), newest first."""
        query = sa.select(jobs_table).order_by(jobs_table.c.created.desc(), jobs_table.c.id).limit(limit)
        if project is not None:
            query = query.where(jobs_table.c.project == str(project))
        with self._read() as conn:
            return [self._progress(conn, row) for row in conn.execute(query).mappings().all()]

    def task_errors(self, job_id: str, limit: int | None = None) -> tuple[TaskError, ...]:
        """The job's tasks that are not done and have an error (failed for good, or pending a retry),
        newest first; ``progress`` reports the last few, a CLI's summary all of them."""
        with self._read() as conn:
            return self._task_errors(conn, job_id, limit)

    def _task_errors(self, conn: Connection, job_id: str, limit: int | None) -> tuple[TaskError, ...]:
        t = job_tasks_table
        query = sa.select(t.c.task_id, t.c.state, t.c.attempts, t.c.last_error).where(
            t.c.job_id == job_id, t.c.last_error.is_not(None), t.c.state != DONE).order_by(
            t.c.updated.desc(), t.c.task_id)
        rows = conn.execute(query if limit is None else query.limit(limit))
        return tuple(TaskError(int(r.task_id), str(r.state), int(r.attempts), str(r.last_error)) for r in rows)

    def _progress(self, conn: Connection, job: RowMapping) -> JobProgress:
        t = job_tasks_table
        now = self.clock()
        counts = {str(state): int(count) for state, count in conn.execute(
            sa.select(t.c.state, sa.func.count()).where(t.c.job_id == job["id"]).group_by(t.c.state))}
        done, failed = counts.get(DONE, 0), counts.get(FAILED, 0)
        pending, running = counts.get(PENDING, 0), counts.get(RUNNING, 0)
        rate: float | None = None
        eta: float | None = None
        started = job["started"]
        if started is not None:
            end = job["finished"] or now
            window = min(RATE_WINDOW_S, max(end - started, 1.0))  # no absurd rates in the first second
            recent = conn.execute(sa.select(sa.func.count()).select_from(t).where(
                t.c.job_id == job["id"], t.c.finished >= end - window)).scalar_one()
            rate = recent / window
            left = pending + running
            if job["state"] in ACTIVE_JOB_STATES and rate > 0:
                eta = left / rate
            elif left == 0:
                eta = 0.0
        errors = self._task_errors(conn, str(job["id"]), LAST_ERRORS)
        return JobProgress(
            id=str(job["id"]), project=str(job["project"]), model_version=str(job["model_version"]),
            state=str(job["state"]), total=sum(counts.values()), done=done, failed=failed, pending=pending,
            running=running, rate=rate, eta_s=eta, error=job["error"], errors=errors,
            created=float(job["created"]), updated=float(job["updated"]))

def _claimable(now: float) -> sa.ColumnElement[bool]:
    t = job_tasks_table
    return sa.or_(sa.and_(t.c.state == PENDING, t.c.not_before <= now),
                  sa.and_(t.c.state == RUNNING, t.c.lease_expires < now))


def _job(row: RowMapping) -> Job:
    return Job(id=str(row["id"]), project=str(row["project"]), model_version=str(row["model_version"]),
               plan=dict(row["plan"] or {}), label_config=row["label_config"],
               credentials=credentials_from_row(row["ls_url"], row["api_key"], row["credentials_source"]),
               state=str(row["state"]), error=row["error"], created=float(row["created"]),
               updated=float(row["updated"]))


