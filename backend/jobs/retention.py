"""How long finished jobs stay in the store (``JOBS_KEEP_DAYS``).

A job keeps a row per task, with the task as Label Studio sent it, and the Label Studio key it wrote
with: a project pre-annotated a million images at a time would grow the store by that many rows per
run, forever, and keep every key it was ever given. A finished job (done, failed, cancelled) is only
history: its predictions are in Label Studio, and a task it failed is predicted by the next Retrieve
(``create_job`` adds tasks held by no *active* job). So finished jobs older than the setting are
deleted, with their tasks, whenever a job is created and when the store resumes on start; active jobs
are never touched, however old.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..api_schema import ACTIVE_JOB_STATES
from .db import job_tasks_table, jobs_table

DEFAULT_KEEP_DAYS = 30.0
DAY_S = 86_400.0


def keep_finished_s(env: Mapping[str, str] | None = None) -> float | None:
    """``JOBS_KEEP_DAYS`` in seconds (default 30 days); None for 0 (keep finished jobs forever).

    Raises:
        ValueError: the setting is not a finite number of days >= 0 (named).
    """
    env = os.environ if env is None else env
    text = env.get("JOBS_KEEP_DAYS", "").strip()
    try:
        days = float(text) if text else DEFAULT_KEEP_DAYS
    except ValueError:
        days = math.nan
    if not 0 <= days < math.inf:
        raise ValueError(f"JOBS_KEEP_DAYS must be a number of days >= 0 (0: keep finished jobs forever), got {text!r}")
    return days * DAY_S if days else None


def prune_finished(conn: Connection, now: float, keep_s: float | None) -> int:
    """Delete the jobs that finished more than ``keep_s`` seconds before ``now``, with their tasks, in
    ``conn``'s transaction; the number of jobs deleted (0 when ``keep_s`` is None)."""
    if keep_s is None:
        return 0
    finished = jobs_table.c.state.not_in(ACTIVE_JOB_STATES)
    last_change = sa.func.coalesce(jobs_table.c.finished, jobs_table.c.updated)
    old = [str(job_id) for job_id in conn.execute(
        sa.select(jobs_table.c.id).where(finished, last_change < now - keep_s)).scalars()]
    for start in range(0, len(old), 500):  # keep IN lists modest
        chunk = old[start:start + 500]
        # The tasks first: SQLite enforces the foreign key's cascade only with its pragma on.
        conn.execute(job_tasks_table.delete().where(job_tasks_table.c.job_id.in_(chunk)))
        conn.execute(jobs_table.delete().where(jobs_table.c.id.in_(chunk)))
    return len(old)
