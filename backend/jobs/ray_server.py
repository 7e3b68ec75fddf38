"""The server's background jobs on a Ray cluster (``RAY_ADDRESS``), in place of the in-process
``JobRunner``: a thread of each server process takes the store's jobs one at a time and runs them with
``ray_runner.run_job_on_ray``, the code ``backend.preannotate --ray`` uses. So a job is predicted by the
cluster's actors with the same ``predict_job_task``, model version, skip-if-written rule, leases and
retry policy as in-process; replicas sharing one store and one cluster never run a task twice (each
claims its tasks with a lease before handing them to the cluster).

A bad address never stops the server: it is checked (its form, then a TCP connect to the head, since
``ray.init`` waits minutes on an address nobody answers), and while it fails the runner logs why,
naming ``RAY_ADDRESS``, shows it in /health (``problem``), and tries again with a growing pause; jobs
wait for it (a head that starts after the backend, as in docker-compose, is found when it answers).
Any other failure to connect (Ray itself failing to import, the cluster refusing a call) is handled
the same way: the thread never ends on it.
"""

from __future__ import annotations

import logging
import re
import socket

from .ray_runner import RaySettings, run_job_on_ray
from .runner import DEFAULT_POLL_S, JobThread
from .store import JobStore
from .workers import worker_name

logger = logging.getLogger(__name__)

# Seconds between attempts to reach the cluster: growing, then every last one.
RECONNECT_S = (2.0, 5.0, 15.0, 30.0, 60.0)
# How long the TCP check of the head's address waits.
CONNECT_TIMEOUT_S = 5.0

_HOST_PORT = re.compile(r"^(?:ray://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})$")
ADDRESS_FORMS = "auto, local, HOST:PORT (the head's GCS port, usually 6379) or ray://HOST:PORT (Ray Client, 10001)"


class RayAddressError(ValueError):
    """RAY_ADDRESS is malformed, or the cluster it names can't be reached."""


def check_ray_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ``RayAddressError`` (naming RAY_ADDRESS) unless ``address`` is ``auto``, ``local``, or a
    ``[ray://]HOST:PORT`` that accepts a TCP connection within ``timeout`` seconds."""
    if address in ("auto", "local"):
        return
    match = _HOST_PORT.match(address)
    port = int(match["port"]) if match else 0
    if match is None or not 0 < port < 65536:
        raise RayAddressError(f"RAY_ADDRESS={address!r} is not a Ray address: use {ADDRESS_FORMS}")
    host = match["host"].strip("[]")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise RayAddressError(f"RAY_ADDRESS={address!r}: nothing answers at {host}:{port} ({exc}); is the Ray "
                              "head running, and is this its address?") from exc


def connect_ray(address: str) -> None:
    """Connect this process to the cluster ``address`` names (``local``: start one here), unless it is
    connected already.

    Raises:
        RayAddressError: the address is malformed, nothing answers there, or Ray refused it.
    """
    import ray

    check_ray_address(address)
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:  # no cluster for "auto", a version mismatch
        raise RayAddressError(f"RAY_ADDRESS={address!r}: Ray could not connect: {exc}") from exc


class RayJobRunner(JobThread):
    """The server's runner when RAY_ADDRESS is set: a ``JobThread`` like ``JobRunner`` whose loop runs
    each job on the cluster, with ``problem`` saying why jobs are not running (for /health).

    Arguments:
        store: the shared job store.
        address: RAY_ADDRESS (``auto``, ``local``, ``head:6379``, ``ray://head:10001``).
        settings: the pool; default: one actor per GPU of the cluster, else one.
        poll_s: idle wait between looks for work (``wake()`` cuts it short).
    """

    thread_name = "ray-job-runner"
    where = " on Ray"

    def __init__(self, store: JobStore, address: str, *, settings: RaySettings | None = None,
                 poll_s: float = DEFAULT_POLL_S) -> None:
        super().__init__(store, poll_s)
        self.address = address
        self.settings = settings
        self.worker_id = worker_name()  # a plain one: a restart after a kill -9 takes its claims back at once
        self._problem: str | None = None

    @property
    def problem(self) -> str | None:
        return self._problem

    def _loop(self) -> None:
        settings = self._connect()
        while settings is not None and not self._stop.is_set():
            try:
                job = self.store.next_job()
                if job is not None:
                    logger.info("job %s (project %s): running on the Ray cluster at RAY_ADDRESS=%s", job.id,
                                job.project, self.address)
                    outcome = run_job_on_ray(self.store, job.id, settings, worker_id=self.worker_id,
                                             stop=self._stop.is_set, wait=False)
                    logger.info("job %s: %d written, %d skipped, %d failed, %d to retry on Ray%s", job.id,
                                len(outcome.written), len(outcome.skipped), len(outcome.failed), len(outcome.retry),
                                f"; stopped: {outcome.stopped}" if outcome.stopped else "")
                    self._problem = None
                    continue
            except Exception as exc:  # the database or the cluster failed, or a bug: keep the thread alive
                self._problem = (f"background jobs on the Ray cluster at RAY_ADDRESS={self.address!r} failed "
                                 f"({type(exc).__name__}: {exc}); retrying every {self.poll_s:g} s")
                logger.exception("%s", self._problem)
            self._wait(self.poll_s)

    def _connect(self) -> RaySettings | None:
        """Reach the cluster, retrying until it answers (None: stopped first); the pool's settings.

        Any failure, not only a bad address (Ray failing to import, the cluster refusing a call), is
        reported in /health and retried: an uncaught one would end the thread and leave jobs queued with
        nothing saying why."""
        attempt = 0
        while not self._stop.is_set():
            try:
                connect_ray(self.address)
                settings = self.settings or self._cluster_settings()
            except Exception as exc:  # see the docstring: the thread must outlive it
                pause = RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)]
                reason = str(exc) if isinstance(exc, RayAddressError) else (
                    f"RAY_ADDRESS={self.address!r}: connecting failed ({type(exc).__name__}: {exc})")
                self._problem = f"background jobs wait for the Ray cluster: {reason}"
                logger.error("%s; trying again in %.0f s", self._problem, pause)
                attempt += 1
                self._wait(pause)
                continue
            self._problem = None
            return settings
        return None

    def _cluster_settings(self) -> RaySettings:
        """One actor per GPU of the connected cluster, else one."""
        import ray

        actors = max(1, int(ray.cluster_resources().get("GPU", 0)))
        logger.info("background jobs run on the Ray cluster at RAY_ADDRESS=%s (%d actor(s))", self.address, actors)
        return RaySettings(address=self.address, num_actors=actors)
