"""A throwaway PostgreSQL cluster for the tests: ``initdb`` into a temp dir, ``pg_ctl start`` on a free
loopback port (its unix socket in the same temp dir), a fresh database per test, stopped at the end.

PostgreSQL refuses to run as root; as root (CI) the cluster belongs to the ``postgres`` system user the
Debian package creates, and its commands run through ``runuser``. Debian keeps the binaries in
/usr/lib/postgresql/<version>/bin, off PATH; both places are searched.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

import sqlalchemy as sa

START_TIMEOUT_S = 60


def postgres_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl (PATH first, then Debian's newest version), or None."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def missing_reason() -> str | None:
    """Why no cluster can be started here (None when one can)."""
    if postgres_bin_dir() is None:
        return "PostgreSQL (initdb, pg_ctl) is not installed; run scripts/install_postgres.sh"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing"
    try:
        import psycopg  # noqa: F401 - the driver the URLs name
    except ImportError:
        return "psycopg (the PostgreSQL driver) is not installed; see requirements.lock"
    return None


def _base_dir() -> str:
    """Where the cluster's folder goes: the temp dir, unless the postgres user can't reach it (a
    root-only TMPDIR) or a unix socket path in it would pass the 107-byte limit; then /tmp."""
    base = tempfile.gettempdir()
    reachable = os.geteuid() != 0 or all(os.stat(parent).st_mode & 0o001 for parent in
                                          [base, *map(str, Path(base).parents)])
    return base if reachable and len(base) < 60 else "/tmp"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1:``port`` with trust authentication for user ``postgres``.

    Use as a context manager; ``new_database()`` gives each test a database of its own.
    """

    def __init__(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError(missing_reason() or "PostgreSQL is not installed")
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="gsam-pg-", dir=_base_dir()))
        self.data_dir = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = _free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:  # the cluster and its folder belong to the postgres user
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self.root.chmod(0o700)

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip()}\n{log}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-locale", "--no-sync", "--no-instructions")  # no-locale: LANG may name a missing one
        # fsync off: a test cluster needs no durability, and it makes every commit cheap.
        # max_connections: every JobStore a test opens keeps a pool until it is collected.
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off " \
                  "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        self._run("pg_ctl", "start", "-w", "-t", str(START_TIMEOUT_S), "-D", str(self.data_dir),
                  "-l", str(self.log), "-o", options)

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-m", "immediate", "-D", str(self.data_dir))
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3) of ``database`` on this cluster."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            engine.dispose()
        return self.url(name)

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
