"""Running jobs: claim a few tasks, predict them, write the predictions to Label Studio, record the
outcome; in a background thread of each worker process, or in the foreground for a CLI.

Every worker process runs one ``JobRunner``; they share the work through the store's leases, so a job
is spread over all of them and survives any one of them dying. What a task is predicted with is the
job's (its prompt plan, labeling config and model version), so the runner knows nothing of models:
it is handed a ``TaskPredictor``.

Before predicting a batch, Label Studio is asked which of its tasks already have a prediction of the
job's version (written before a crash, or by a "Retrieve predictions"): those are done without
predicting them again, and the writer checks once more before writing.

Failure policy: a task that fails is retried (after a back-off) until it has used the store's
``max_attempts``, unless its data is wrong (``PermanentTaskError``, an undecodable image, a task
without the image the config names): no retry fixes that; a prediction Label Studio refuses
fails its task for good. Label Studio unreachable or unavailable (restarting: refused connections,
timeouts, 502/503/504, 429) is no fault of the tasks: they go back untried, after a growing back-off,
so a restart never burns their attempts, and a job that has waited OUTAGE_GIVE_UP_S for it stops with
the reason (its tasks kept for a later Retrieve). A cancelled job writes nothing more, even what was
predicted before the cancel. A rejected key
(``LabelStudioAuthError``, from the writer or the predictor's image download) or a model version that
no longer matches the job's stops the whole job with the reason on it, so it never spins.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..fetch import FetchError
from ..images import ImageError
from ..label_config import TaskDataError
from ..ls_api import LabelStudioAuthError, LabelStudioClient, LabelStudioError, LabelStudioUnavailable
from .store import ACTIVE_JOB_STATES, DEFAULT_LEASE_S, ClaimedTask, Job, JobProgress, JobStore, JsonObject
from .workers import worker_gone, worker_name
from .writer import DEFAULT_CHUNK, DEFAULT_CHUNK_BYTES, entry_bytes, tasks_with_prediction, write_predictions

logger = logging.getLogger(__name__)


# Tasks claimed and predicted at a time by one runner.
DEFAULT_BATCH = 8
# Predictions are written when DEFAULT_CHUNK of them are made, or when the oldest is this old (so
# Label Studio stays current when predicting is slow).
DEFAULT_FLUSH_S = 30.0
# Chunks waiting for the writer thread: the predicting thread blocks beyond this (bounded memory).
WRITE_QUEUE = 2
# How long an idle runner sleeps before looking for work again (``wake()`` cuts it short).
DEFAULT_POLL_S = 2.0
# Label Studio unavailable: a job's tasks wait this long, doubling per failed try up to the maximum ...
OUTAGE_BACKOFF_S = 5.0
MAX_OUTAGE_BACKOFF_S = 120.0
# ... and the job stops (failed, with the reason) once Label Studio has been unavailable this long.
OUTAGE_GIVE_UP_S = 1800.0


class TaskPredictor(Protocol):
    """Predicts one task of a job: returns a /predict entry ``{"result": [...], "score": float,
    "model_version": str}``, or raises (``PermanentTaskError`` when retrying can't help)."""

    def __call__(self, job: Job, task: JsonObject) -> Mapping[str, Any]: ...


ClientFactory = Callable[[Job], LabelStudioClient]


class BackgroundRunner(Protocol):
    """What the server needs of the runner of its jobs: ``JobRunner`` (in this process) or
    ``ray_server.RayJobRunner`` (on a Ray cluster, RAY_ADDRESS)."""

    @property
    def running(self) -> bool: ...

    @property
    def problem(self) -> str | None:
        """Why jobs are not running now (the cluster can't be reached), for /health; None when fine."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 30.0) -> None: ...

    def wake(self) -> None: ...


class JobThread:
    """What both runners of the server's jobs share: ``start`` resumes the store's unfinished jobs
    (tasks of dead workers go back to pending) and runs ``_loop`` in a daemon thread until ``stop``;
    ``wake`` cuts an idle ``_wait`` short. ``JobRunner`` works in this process, ``RayJobRunner`` on a
    Ray cluster; each writes its own ``_loop``."""

    thread_name = "job-runner"
    where = ""  # how the resume log line says where the jobs run

    def __init__(self, store: JobStore, poll_s: float) -> None:
        self.store = store
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def problem(self) -> str | None:
        """Why jobs are not running now, for /health; None when fine."""
        return None

    def start(self) -> None:
        """Resume unfinished jobs and work in a thread (again only once the last one has ended)."""
        if self.running:
            return
        unfinished = self.store.resume(gone=worker_gone)
        if unfinished:
            logger.info("resuming %d unfinished prediction job(s)%s: %s", len(unfinished), self.where,
                        ", ".join(unfinished))
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the work in hand and end the thread; the tasks not finished go back to pending."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def wake(self) -> None:
        """Look for work now (a job was just created)."""
        self._wake.set()

    def _wait(self, seconds: float) -> None:
        """Idle for ``seconds``, or until ``wake``/``stop``."""
        self._wake.wait(seconds)
        self._wake.clear()

    def _loop(self) -> None:
        raise NotImplementedError


class PermanentTaskError(Exception):
    """The task itself is wrong (no image in its data, ...): fail it without retrying."""


class JobStopped(Exception):
    """A job-level failure: the job is failed with this message and no task of it is tried again."""


@dataclass
class _Unwritten:
    """Predictions made for one job and not yet written; their tasks stay claimed (leased)."""

    job: Job
    client: LabelStudioClient
    entries: dict[int, Mapping[str, Any]] = field(default_factory=dict)
    items: dict[int, ClaimedTask] = field(default_factory=dict)
    since: float = field(default_factory=time.monotonic)
    size: int = 0  # about how many bytes the entries take in a bulk request (``entry_bytes``)


class JobRunner(JobThread):
    """Processes the store's jobs, a batch at a time, in the foreground (``run_until_idle``,
    ``run_job``) or in a background thread (``start``/``stop``).

    Arguments:
        store: the shared job store.
        predict: predicts one task of a job (see ``TaskPredictor``).
        client_factory: the Label Studio client to write a job's predictions with (usually from
            ``job.credentials`` through a ``ClientRegistry``); raising LabelStudioError stops the job.
        batch_size: tasks claimed and predicted at a time.
        chunk_size: predictions per bulk request to Label Studio; made predictions wait until there
            are this many, or the oldest is ``flush_s`` old, or there is nothing more to claim.
        chunk_bytes: about the most bytes of predictions per bulk request, and held unwritten.
        lease_s: how long a claim lasts; renewed while tasks are in hand.
        poll_s: idle wait between looks for work.
        outage_backoff_s, outage_give_up_s: Label Studio unavailable: the first wait (doubling up to
            MAX_OUTAGE_BACKOFF_S), and how long a job waits for it in all before it stops.
    """

    def __init__(self, store: JobStore, predict: TaskPredictor, client_factory: ClientFactory, *,
                 batch_size: int = DEFAULT_BATCH, chunk_size: int = DEFAULT_CHUNK,
                 lease_s: float = DEFAULT_LEASE_S, poll_s: float = DEFAULT_POLL_S,
                 flush_s: float = DEFAULT_FLUSH_S, worker_id: str | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, outage_backoff_s: float = OUTAGE_BACKOFF_S,
                 outage_give_up_s: float = OUTAGE_GIVE_UP_S) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        super().__init__(store, poll_s)
        self.predict = predict
        self.client_factory = client_factory
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.lease_s = lease_s
        self.flush_s = flush_s
        self.chunk_bytes = chunk_bytes
        self.outage_backoff_s = outage_backoff_s
        self.outage_give_up_s = outage_give_up_s
        # job id -> (when Label Studio first failed it, tries since): reset by any answer from it.
        self._outages: dict[str, tuple[float, int]] = {}
        self._unwritten: _Unwritten | None = None
        # Writing a chunk costs Label Studio about as long as predicting it with the tiny models, so a
        # writer thread stores one chunk while the next is predicted.
        self._writes: queue.Queue[_Unwritten | None] = queue.Queue(maxsize=WRITE_QUEUE)
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self.worker_id = worker_id or worker_name()

    # -- background --------------------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> None:
        """Finish the task in hand, write what was predicted, hand the other claimed tasks back, and
        end the thread."""
        super().stop(timeout)
        self._close_writer(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # the database is unavailable, or a bug: log it and keep the thread alive
                logger.exception("job runner: unexpected error; retrying in %.0f s", self.poll_s)
                worked = False
            if not worked:
                self._wait(self.poll_s)
        self._flush_quietly()

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except Exception:  # the database is unavailable: the leases run out and others take over
            logger.exception("job runner: could not write the last predictions")

    # -- foreground --------------------------------------------------------------------------------
    def run_until_idle(self, timeout: float | None = None) -> None:
        """Work until no unfinished job is left (waiting out retry back-offs), or ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
                if not self.run_once():
                    if not self.store.unfinished_jobs():
                        return
                    time.sleep(min(self.poll_s, 0.5))
        finally:
            self.flush()
            self.wait_written()

    def run_job(self, job_id: str, on_progress: Callable[[JobProgress], None] | None = None,
                timeout: float | None = None) -> JobProgress | None:
        """Work on one job until it is finished (or ``timeout`` s); ``on_progress`` is called after
        each batch and once at the end (a CLI's progress bar). Returns its final progress."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
                job = self.store.get_job(job_id)
                if job is None or job.state not in ACTIVE_JOB_STATES:
                    break
                worked = self._run_batch(job)
                if on_progress is not None:
                    progress = self.store.progress(job_id)
                    if progress is not None:
                        on_progress(progress)
                if not worked:
                    time.sleep(min(self.poll_s, 0.5))  # tasks held by others, or waiting out a back-off
        finally:
            self.flush()
            self.wait_written()
        final = self.store.progress(job_id)
        if on_progress is not None and final is not None:
            on_progress(final)  # after the last write: the bar ends where the job did
        return final

    def run_once(self) -> bool:
        """One batch of the oldest job with work to claim (or, with none, write what was predicted);
        False when there was nothing to do."""
        job = self.store.next_job()
        return self.flush() if job is None else self._run_batch(job)

    def flush(self) -> bool:
        """Hand the predictions made and not yet written to the writer thread; False when there were
        none. ``wait_written`` waits until they are written."""
        unwritten, self._unwritten = self._unwritten, None
        if unwritten is None or not unwritten.entries:
            return False
        self._ensure_writer()
        self._writes.put(unwritten)
        return True

    def wait_written(self) -> None:
        """Wait until every chunk handed to the writer thread is written (or failed)."""
        self._writes.join()

    def _ensure_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_loop, name="job-writer", daemon=True)
                self._writer.start()

    def _close_writer(self, timeout: float) -> None:
        with self._writer_lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            self._writes.put(None)
            writer.join(timeout)

    def _write_loop(self) -> None:
        while True:
            unwritten = self._writes.get()
            try:
                if unwritten is None:
                    return
                self._write_chunk(unwritten)
            except Exception:  # the database is unavailable: the leases run out and others take over
                logger.exception("job writer: could not record a chunk")
            finally:
                self._writes.task_done()

    def _write_chunk(self, unwritten: _Unwritten) -> None:
        job = unwritten.job
        try:
            self._write(job, unwritten.client, unwritten.entries, unwritten.items)
        except JobStopped as exc:
            self._job_stopped(job, exc)
        finally:
            self.store.release(job.id, list(unwritten.items), self.worker_id)

    def _job_stopped(self, job: Job, exc: JobStopped) -> None:
        """Fail the job; the predicting thread sees it is no longer active and hands its tasks back."""
        logger.error("job %s (project %s) stopped: %s", job.id, job.project, exc)
        self.store.fail_job(job.id, str(exc))

    # -- one batch ---------------------------------------------------------------------------------
    def _run_batch(self, job: Job) -> bool:
        if self._unwritten is not None and self._unwritten.job.id != job.id:
            self.flush()  # one job's predictions at a time
        claimed = self.store.claim_tasks(job.id, self.batch_size, self.worker_id, self.lease_s)
        if not claimed:
            return self.flush()  # the rest of the job is someone else's, or ours and predicted
        unfinished = {c.task_id: c for c in claimed}
        try:
            unwritten = self._unwritten
            if unwritten is None:
                unwritten = _Unwritten(job, self._client(job))
            else:  # predictions waiting for this batch's: keep their claims alive meanwhile
                self.store.renew(job.id, list(unwritten.items), self.worker_id, self.lease_s)
            claimed = self._skip_written(job, unwritten.client, claimed, unfinished)
            entries = self._predict(job, claimed, unfinished)
            if entries:
                self._unwritten = unwritten
                for task_id, entry in entries.items():
                    unwritten.entries[task_id] = entry
                    unwritten.items[task_id] = unfinished.pop(task_id)
                    unwritten.size += entry_bytes(entry)
                if (len(unwritten.entries) >= self.chunk_size or unwritten.size >= self.chunk_bytes
                        or time.monotonic() - unwritten.since >= self.flush_s):
                    self.flush()
        except JobStopped as exc:
            self._job_stopped(job, exc)
            unwritten, self._unwritten = self._unwritten, None
            if unwritten is not None:  # predicted for this job, which can't write them
                self.store.release(job.id, list(unwritten.items), self.worker_id)
        finally:
            # Whatever is still in hand (stop, cancel, a stopped job) goes back untried.
            self.store.release(job.id, list(unfinished), self.worker_id)
        return True

    def _client(self, job: Job) -> LabelStudioClient:
        try:
            return self.client_factory(job)
        except LabelStudioError as exc:
            raise JobStopped(str(exc)) from exc

    def _skip_written(self, job: Job, client: LabelStudioClient, claimed: list[ClaimedTask],
                      unfinished: dict[int, ClaimedTask]) -> list[ClaimedTask]:
        """Tasks that already have a prediction of the job's version (written before a crash, or by a
        "Retrieve predictions") are done without predicting them again."""
        try:
            have = tasks_with_prediction(client, _project_id(job), list(unfinished), job.model_version)
        except LabelStudioAuthError as exc:
            raise JobStopped(str(exc)) from exc
        except LabelStudioUnavailable as exc:  # the write would fail too: try the batch later
            self._unavailable(job, [item.task_id for item in claimed], exc)  # raises JobStopped at the limit
            for item in claimed:
                unfinished.pop(item.task_id)
            return []
        except LabelStudioError as exc:  # an error answer: retry, spending an attempt
            for item in claimed:
                self._failed(job, unfinished.pop(item.task_id), str(exc), retryable=True)
            return []
        self._outages.pop(job.id, None)
        if have:
            self.store.mark_done(job.id, sorted(have))
            for task_id in have:
                unfinished.pop(task_id, None)
        return [c for c in claimed if c.task_id not in have]

    def _predict(self, job: Job, claimed: list[ClaimedTask],
                 unfinished: dict[int, ClaimedTask]) -> dict[int, Mapping[str, Any]]:
        entries: dict[int, Mapping[str, Any]] = {}
        renewed = time.monotonic()
        for item in claimed:
            if self._stop.is_set() or self.store.job_state(job.id) not in ACTIVE_JOB_STATES:
                break  # stopping, or the job was cancelled: the rest goes back
            if time.monotonic() - renewed > self.lease_s / 3:  # slow tasks: keep the claim alive
                self.store.renew(job.id, list(unfinished), self.worker_id, self.lease_s)
                renewed = time.monotonic()
            try:
                entry = self.predict(job, item.task)
            except LabelStudioAuthError as exc:  # the image download's key was rejected
                raise JobStopped(str(exc)) from exc
            except (PermanentTaskError, ImageError, TaskDataError) as exc:  # the task's data is wrong
                self._failed(job, item, str(exc) or type(exc).__name__, retryable=False)
                del unfinished[item.task_id]
                continue
            except (FetchError, LabelStudioError) as exc:  # the network, or a file still missing
                self._failed(job, item, str(exc) or type(exc).__name__, retryable=True)
                del unfinished[item.task_id]
                continue
            except Exception as exc:  # a bug or a model failure: keep the traceback
                logger.exception("job %s: task %s failed", job.id, item.task_id)
                self._failed(job, item, f"internal error ({type(exc).__name__}: {exc}); see the server log",
                             retryable=True)
                del unfinished[item.task_id]
                continue
            version = entry.get("model_version")
            if version is not None and version != job.model_version:
                raise JobStopped(f"the model version is now {version!r} but the job predicts with "
                                 f"{job.model_version!r} (the models or their settings changed); retrieve "
                                 "predictions again to start a job with the new version")
            entries[item.task_id] = entry
        return entries

    def _write(self, job: Job, client: LabelStudioClient, entries: dict[int, Mapping[str, Any]],
               unfinished: dict[int, ClaimedTask]) -> None:
        if self.store.job_state(job.id) not in ACTIVE_JOB_STATES:
            # Cancelled (or stopped) after these were predicted: a cancel means nothing more is written.
            logger.info("job %s is no longer active: %d prediction(s) not written", job.id, len(entries))
            return
        self.store.renew(job.id, list(entries), self.worker_id, self.lease_s)
        try:
            outcome = write_predictions(client, _project_id(job), entries, job.model_version, self.chunk_size,
                                        self.chunk_bytes)
        except LabelStudioAuthError as exc:
            raise JobStopped(str(exc)) from exc
        except LabelStudioUnavailable as exc:  # restarting or overloaded: not the tasks' fault
            self._unavailable(job, list(entries), exc)
            return
        except LabelStudioError as exc:  # failing: worth another try later
            for task_id in entries:
                self._failed(job, unfinished.pop(task_id), str(exc), retryable=True)
            return
        self._outages.pop(job.id, None)
        self.store.mark_done(job.id, outcome.written + outcome.skipped)
        for task_id in outcome.written + outcome.skipped:
            unfinished.pop(task_id, None)
        for task_id, reason in outcome.rejected.items():
            self._failed(job, unfinished.pop(task_id), reason, retryable=False)
        if outcome.skipped:
            logger.info("job %s: %d task(s) already had a prediction of %s", job.id, len(outcome.skipped),
                        job.model_version)

    def _unavailable(self, job: Job, task_ids: list[int], exc: LabelStudioError) -> None:
        """Label Studio is unavailable: hand ``task_ids`` back untried (their attempts are for faults of
        their own) to wait a growing back-off; stop the job once it has waited ``outage_give_up_s``."""
        now = time.monotonic()
        first, tries = self._outages.get(job.id, (now, 0))
        if now - first >= self.outage_give_up_s:
            self._outages.pop(job.id, None)
            raise JobStopped(f"{exc}; Label Studio has been unavailable for {now - first:.0f} s (the limit is "
                             f"{self.outage_give_up_s:g} s), so the job stops; its unfinished tasks get "
                             "predictions from the next Retrieve once Label Studio is back")
        self._outages[job.id] = (first, tries + 1)
        delay = min(self.outage_backoff_s * 2 ** tries, MAX_OUTAGE_BACKOFF_S)
        reason = f"waiting for Label Studio (retry in {delay:.3g} s): {exc}"
        self.store.release(job.id, task_ids, self.worker_id, delay_s=delay, reason=reason)
        logger.warning("job %s: %d task(s) wait %.3g s for Label Studio: %s", job.id, len(task_ids), delay, exc)

    def _failed(self, job: Job, item: ClaimedTask, reason: str, retryable: bool) -> None:
        state = self.store.mark_failed(job.id, item.task_id, reason, retryable=retryable, worker_id=self.worker_id)
        logger.warning("job %s: task %s attempt %d failed (%s): %s", job.id, item.task_id, item.attempts,
                       "will retry" if state == "pending" else "giving up", reason)


def _project_id(job: Job) -> int:
    try:
        return int(job.project)
    except ValueError:
        raise JobStopped(f"the job's project {job.project!r} is not a Label Studio project id") from None
