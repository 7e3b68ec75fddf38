"""The database the job store and the per-project state live in: one SQL database that every worker
process of the backend shares (SQLite in WAL mode by default, any SQLAlchemy URL).

Why a database and not memory: jobs must survive a restart (kill -9 included), and several gunicorn
workers must agree on which of them predicts which task and on what /setup told one of them. Every
state change is one transaction; on SQLite each write transaction starts with ``BEGIN IMMEDIATE``, so
two processes never interleave a read-then-write (claims, idempotent job creation), while readers
(progress polling) use a deferred BEGIN and never wait.

Secrets: to resume a job after a restart without anyone calling /setup again, the Label Studio API key
a job was created with is stored in its row (and /setup's key in ``project_state``), in clear text. The
SQLite file is created with mode 0600 (its -wal/-shm files inherit it); for other databases, protect
the database itself. Nothing here logs a key, and the dataclasses handed out keep it out of reprs.
Finished jobs, and the keys in their rows, are deleted after JOBS_KEEP_DAYS (``retention.py``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url

from ..ls_api import Credentials

JsonObject = dict[str, Any]  # a decoded JSON object (a Label Studio task, a prompt plan)

# How long SQLite waits for another process's write lock before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000

metadata = sa.MetaData()

jobs_table = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("project", sa.String(64), nullable=False, index=True),
    sa.Column("model_version", sa.String(255), nullable=False),
    sa.Column("plan", sa.JSON, nullable=False),  # prompt phrases + thresholds the job predicts with
    sa.Column("label_config", sa.Text, nullable=True),
    sa.Column("ls_url", sa.Text, nullable=True),
    sa.Column("api_key", sa.Text, nullable=True),  # see the module docstring
    sa.Column("credentials_source", sa.String(32), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("error", sa.Text, nullable=True),  # why the job stopped (failed), e.g. a rejected key
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
    sa.Column("started", sa.Float, nullable=True),
    sa.Column("finished", sa.Float, nullable=True),
)

job_tasks_table = sa.Table(
    "job_tasks", metadata,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("task_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("task", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("lease_owner", sa.String(128), nullable=True),
    sa.Column("lease_expires", sa.Float, nullable=True),
    sa.Column("not_before", sa.Float, nullable=False, default=0.0),  # retry back-off
    sa.Column("updated", sa.Float, nullable=False),
    sa.Column("finished", sa.Float, nullable=True),
    sa.Index("ix_job_tasks_job_state", "job_id", "state"),
    sa.Index("ix_job_tasks_task", "task_id"),
)

project_state_table = sa.Table(
    "project_state", metadata,
    sa.Column("project", sa.String(64), primary_key=True),
    sa.Column("remembered", sa.JSON, nullable=True),  # last prompt/thresholds a person used
    sa.Column("extra", sa.JSON, nullable=True),  # /setup extra_params
    sa.Column("label_config", sa.Text, nullable=True),  # /setup schema
    sa.Column("ls_url", sa.Text, nullable=True),  # /setup hostname
    sa.Column("api_key", sa.Text, nullable=True),  # /setup access_token (see the module docstring)
    sa.Column("updated", sa.Float, nullable=False),
)


class JobStoreError(RuntimeError):
    """The job store was misconfigured or asked for something impossible."""


def default_url(env: Mapping[str, str] | None = None) -> str:
    """JOBS_DB (any SQLAlchemy URL), else ``sqlite:///$DATA_DIR/jobs.sqlite3`` (DATA_DIR defaults to
    ./data, a docker-compose volume in the image)."""
    env = os.environ if env is None else env
    url = (env.get("JOBS_DB") or "").strip()
    if url:
        return url
    data_dir = Path(env.get("DATA_DIR") or "data").expanduser().resolve()
    return f"sqlite:///{data_dir / 'jobs.sqlite3'}"


def _prepare_sqlite_file(database: str) -> None:
    """Create the database file (and its folder) readable by its owner only: it holds API keys."""
    path = Path(database).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True)
    if not parsed.database or parsed.database == ":memory:":
        # Each connection would see its own empty database: useless across threads and processes.
        raise JobStoreError(f"JOBS_DB={url!r}: an in-memory SQLite database can't be shared; use a file path")
    _prepare_sqlite_file(parsed.database)
    engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, across processes
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe with WAL
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock at BEGIN, so a read-then-write (a claim) is atomic across
        # processes; readers (progress polling) use a deferred BEGIN and never wait for it.
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


class Database:
    """One database (engine and tables) with read and write transactions.

    Arguments:
        url: a SQLAlchemy URL (``sqlite:////data/jobs.sqlite3``, ``postgresql+psycopg://...``);
            default: ``default_url()``.
        clock: epoch seconds (``time.time``); tests pass another to move time.
    """

    def __init__(self, url: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.url = url or default_url()
        self.clock = clock
        self.engine = _make_engine(self.url)
        with self.engine.begin() as conn:
            # Idempotent; replicas starting together on a new PostgreSQL database would otherwise
            # race to create the same tables (duplicate key in pg_type).
            serialise(conn, "schema")
            metadata.create_all(conn)

    def close(self) -> None:
        self.engine.dispose()

    def after_fork(self) -> None:
        """Call in a child process (gunicorn post_fork) so it opens its own connections."""
        self.engine.dispose(close=False)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that may write (on SQLite it holds the write lock from its start)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction that sees one snapshot throughout (a job's counts, rate and errors
        agree): SQLite's deferred BEGIN does that; PostgreSQL needs repeatable read for it."""
        conn = self.engine.connect()
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        else:
            conn = conn.execution_options(sqlite_begin="DEFERRED")
        with conn, conn.begin():
            yield conn


def serialise(conn: Connection, key: str) -> None:
    """Make the rest of this write transaction exclusive among those that pass the same ``key``: for a
    read-then-insert that two processes must not interleave. On PostgreSQL a transaction-scoped advisory
    lock (released at commit or rollback); SQLite's ``BEGIN IMMEDIATE`` already serialises every writer."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})


def credentials_from_row(url: str | None, key: str | None, source: str | None) -> Credentials | None:
    return None if not url else Credentials(url, key or "", source or "setup")
