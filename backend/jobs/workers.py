"""Who holds a task's lease: a runner's name (host, pid, the process's start time, a random part) and
whether the process behind a name is gone, so a restart after a kill -9 takes a dead runner's claims
back at once instead of waiting out their leases."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path


def worker_name() -> str:
    """Unique per runner: host, process id, the process's start time (a reused pid is another
    process) and a random part (two runners in one process differ)."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_started(pid)}:{uuid.uuid4().hex[:6]}"


def _process_started(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22); "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else ""


def worker_gone(owner: str) -> bool:
    """True when ``owner`` (a ``worker_name``) is a runner of a process on this host that no longer
    runs (killed, crashed): its claims need not wait for their leases to run out. False when that
    can't be told (another host, an unknown name): the lease decides."""
    host, _, rest = owner.partition(":")
    parts = rest.split(":")
    if host != socket.gethostname() or len(parts) != 3 or not parts[0].isdigit():
        return False
    pid, started = int(parts[0]), parts[1]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        pass
    now = _process_started(pid)
    return bool(started and now) and now != started  # the pid was reused by another process
