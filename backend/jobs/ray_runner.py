"""Running a prediction job on a Ray cluster, for projects one machine can't get through in time.

Same work as ``JobRunner`` (same ``predict_job_task``, model version, skip-if-written rule and bulk
writer), spread with Ray Data: the CLI's pass reads the task list from Label Studio page by page (one
Ray task per page); a store job's pass (the server's runner, ``ray_server.py``) takes the tasks it
claimed with a lease, as the store holds them. ``map_batches`` runs an actor pool where each actor loads the
engine once (from the node's environment, as the server does), fetches a batch's images ahead of the
model (``read_ahead``), predicts, and writes the batch through ``write_predictions``; the driver only
sees a (task id, outcome) row per task, and records it in the JobStore when a job is given (so
/api/jobs shows the run). Ray is optional: imported only here.

Faults: an actor that dies is restarted and its batch retried (Ray Data's own policy for an actor
pool, without bound: the count can only be set through ``ray_remote_args``, deprecated from Ray 2.60,
so a ``CrashLedger`` fails a task that killed its actor ``MAX_TASK_CRASHES`` times);
the retried batch finds what the dead actor wrote already stored (the actor asks Label Studio before
predicting, and ``write_predictions`` before each chunk), so nothing is stored twice. Task failures
follow the runner's policy (``classify``): retryable ones go back to pending and another pass takes
them, up to the store's ``max_attempts``; a rejected key or a changed model version stops the job.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..fetch import FetchError
from ..images import ImageError
from ..label_config import TaskDataError
from ..ls_api import Credentials, LabelStudioAuthError, LabelStudioClient, LabelStudioError
from .runner import PermanentTaskError
from .store import ACTIVE_JOB_STATES, ClaimedTask, Job, JobStore, JsonObject
from .workers import worker_name
from .writer import DEFAULT_CHUNK, has_prediction_of, tasks_with_prediction, write_predictions

if TYPE_CHECKING:
    import ray.data
    from ray.actor import ActorHandle

    from ..ls_model import GroundedSamModel

logger = logging.getLogger(__name__)

# Tasks per page of Label Studio's task list; each page is one Ray task and one block of the dataset.
DEFAULT_PAGE_SIZE = 100
# A claim on a job's tasks while the cluster works on them; renewed while results come in.
RAY_LEASE_S = 600.0
# Fault injection for the tests: an actor exits (as if killed) after writing this many tasks, once per
# marker file (the first actor to create it).
EXIT_AFTER_ENV = "GSAM_RAY_EXIT_AFTER"
EXIT_MARKER_ENV = "GSAM_RAY_EXIT_MARKER"
# Fault injection for the tests: a file of task ids; an actor exits whenever it is about to predict one.
CRASH_TASKS_ENV = "GSAM_RAY_CRASH_TASKS_FILE"
# An actor may die this many times with a task in hand; the next try fails the task for good.
MAX_TASK_CRASHES = 3

# Row outcomes, one per task
WRITTEN, SKIPPED, REJECTED, RETRY, FAILED, STOPPED = "written", "skipped", "rejected", "retry", "failed", "stopped"


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide to run.

    Arguments:
        address: the cluster (``auto``, ``ray://head:10001``, ``head:6379``); None starts a local one.
        num_actors: size of the actor pool (one engine each).
        batch_size: tasks per actor call; written as one bulk chunk (``chunk_size``).
        page_size: tasks per page of the task list.
        num_gpus: per actor; None: 1 when the cluster has GPUs, else 0 (and ``num_cpus`` 0.5, so the
            page readers still get a CPU: whole CPUs per actor starved them on a 2-CPU cluster).
    """

    address: str | None = None
    num_actors: int = 1
    batch_size: int = DEFAULT_CHUNK
    chunk_size: int = DEFAULT_CHUNK
    page_size: int = DEFAULT_PAGE_SIZE
    num_gpus: float | None = None
    num_cpus: float = 0.5

    def __post_init__(self) -> None:
        for name in ("num_actors", "batch_size", "chunk_size", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class RayOutcome:
    """What a run did, per task id: written, skipped (already had a prediction of the version),
    failed (with the reason; ``retry`` ones may succeed on a later pass)."""

    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    retry: dict[int, str] = field(default_factory=dict)
    stopped: str | None = None  # why the whole run stopped (key rejected, model version changed)


def classify(exc: BaseException) -> str:
    """The runner's failure policy: RETRY (network, a file still missing, a bug), FAILED (the task's
    data is wrong), STOPPED (the key was rejected: nothing else will work)."""
    if isinstance(exc, LabelStudioAuthError):
        return STOPPED
    if isinstance(exc, (PermanentTaskError, ImageError, TaskDataError)):
        return FAILED
    return RETRY  # FetchError, LabelStudioError (network, a file still missing), or a bug


def read_page(client: LabelStudioClient, project: int, page: int, page_size: int, model_version: str,
              only: frozenset[int] | None) -> list[dict[str, Any]]:
    """One page of the project's tasks as dataset rows ``{"id", "task", "written"}`` (the task as JSON,
    without predictions and annotations, as /predict gets it; ``written``: it already has a prediction
    of ``model_version``, so the actor reports it skipped without predicting it), leaving out, with
    ``only``, tasks not in it."""
    body = client.get_json(f"/api/tasks/?project={int(project)}&fields=all&page={page}&page_size={page_size}",
                           f"listing page {page} of project {project}'s tasks")
    tasks = body.get("tasks", []) if isinstance(body, dict) else body
    rows = []
    for task in tasks:
        task_id = int(task["id"])
        if only is not None and task_id not in only:
            continue
        written = has_prediction_of(task, model_version)
        for name in ("predictions", "annotations", "drafts"):
            task.pop(name, None)
        rows.append({"id": task_id, "task": json.dumps(task), "written": written})
    return rows


def count_tasks(client: LabelStudioClient, project: int) -> int:
    body = client.get_json(f"/api/tasks/?project={int(project)}&page=1&page_size=1",
                           f"counting project {project}'s tasks")
    return int(body.get("total", 0)) if isinstance(body, dict) else len(body)


def stored_rows(claimed: Sequence[ClaimedTask]) -> list[dict[str, Any]]:
    """A store job's claimed tasks as dataset rows (``written`` unknown: the actor asks Label Studio):
    the task as the store holds it, which is what the in-process runner predicts."""
    return [{"id": c.task_id, "task": json.dumps({**c.task, "id": c.task_id}), "written": False} for c in claimed]


class CrashLedger:
    """Shared by one pass's actor pool (a Ray actor of its own): per task, how many times an actor died
    with it in hand. Ray Data restarts a dead actor and retries its batch without bound (the bound can
    only be set through the deprecated ``ray_remote_args``), so a task that kills its actor every time
    (out of memory on one image) would hold the pass forever; the ledger lets the next try of that
    batch go one task at a time and fail the task that keeps killing it."""

    def __init__(self) -> None:
        self.in_hand: dict[int, int] = {}

    def crashes(self, ids: list[int]) -> dict[int, int]:
        return {i: self.in_hand.get(i, 0) for i in ids}

    def begin(self, ids: list[int]) -> None:
        for i in ids:
            self.in_hand[i] = self.in_hand.get(i, 0) + 1

    def end(self, ids: list[int]) -> None:
        for i in ids:
            self.in_hand.pop(i, None)


class PredictActor:
    """One engine per actor: predicts and writes a batch of a job's tasks; returns an outcome row each.

    Arguments:
        job: what to predict with and where to write.
        chunk_size: predictions per bulk request.
        ledger: the pass's ``CrashLedger`` (a Ray actor handle).
        check_written: ask Label Studio which of a batch's tasks already have a prediction of the
            job's version before predicting (rows from the store; page rows carry ``written``).
    """

    def __init__(self, job: Job, chunk_size: int, ledger: ActorHandle, check_written: bool = False) -> None:
        from ..preannotate import build_model

        assert job.credentials is not None
        self.job = job
        self.chunk_size = chunk_size
        self.ledger = ledger
        self.check_written = check_written
        self.model: GroundedSamModel = build_model(None, job.credentials)  # engine from this node's env
        self.client = LabelStudioClient(job.credentials)
        self.done = 0

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        job, model = self.job, self.model
        written = {int(t) for t, w in zip(batch["id"], batch["written"], strict=True) if w}
        if self.check_written:
            try:  # written before a crash, by a "Retrieve predictions", or by this batch's dead first try
                written |= tasks_with_prediction(self.client, int(job.project), [int(t) for t in batch["id"]],
                                                 job.model_version)
            except LabelStudioError as exc:
                kind = STOPPED if isinstance(exc, LabelStudioAuthError) else RETRY
                return _rows({int(t): (kind, str(exc)) for t in batch["id"]})
        rows: dict[int, tuple[str, str]] = {t: (SKIPPED, "") for t in written}
        tasks: list[JsonObject] = [json.loads(str(t)) for i, t in zip(batch["id"], batch["task"], strict=True)
                                   if int(i) not in written]
        try:
            version = model.model_version
        except Exception as exc:  # noqa: BLE001 - the engine config can't be read on this node
            return _rows({int(t["id"]): (STOPPED, str(exc)) for t in tasks})
        if version != job.model_version:
            return _rows({int(t["id"]): (STOPPED, version_changed(version, job.model_version)) for t in tasks})
        ids = [int(t["id"]) for t in tasks]
        crashes = cast("dict[int, int]", ray.get(self.ledger.crashes.remote(ids)))
        if not any(crashes.values()):
            ray.get(self.ledger.begin.remote(ids))
            rows.update(self._predict_and_write(tasks, model.settings.prefetch_tasks))
            ray.get(self.ledger.end.remote(ids))
        else:  # an actor died holding some of these: one at a time, each written at once
            for task, task_id in zip(tasks, ids, strict=True):
                if crashes[task_id] >= MAX_TASK_CRASHES:
                    rows[task_id] = (FAILED, f"the actor predicting it died {crashes[task_id]} times (out of "
                                             "memory? a crash in the model?); not tried again")
                    continue
                ray.get(self.ledger.begin.remote([task_id]))
                rows.update(self._predict_and_write([task], 0))
                ray.get(self.ledger.end.remote([task_id]))
        self.done += len(tasks)
        self._maybe_exit()
        return _rows(rows)

    def _predict_and_write(self, tasks: list[JsonObject], prefetch: int) -> dict[int, tuple[str, str]]:
        from ..predict_parts import read_ahead

        job, model = self.job, self.model
        rows: dict[int, tuple[str, str]] = {}
        entries: dict[int, Mapping[str, Any]] = {}
        loads = read_ahead(tasks, lambda task: model.load_job_task(job, task), prefetch)
        for task, loaded in zip(tasks, loads, strict=True):
            task_id = int(task["id"])
            _maybe_crash(task_id)
            try:
                entries[task_id] = model.predict_job_task(job, task, loaded.result())
            except Exception as exc:  # noqa: BLE001 - classified per the runner's policy
                kind = classify(exc)
                if kind == RETRY and not isinstance(exc, (FetchError, LabelStudioError)):
                    logger.exception("job %s: task %s failed", job.id, task_id)
                rows[task_id] = (kind, str(exc) or type(exc).__name__)
        try:
            outcome = write_predictions(self.client, int(job.project), entries, job.model_version, self.chunk_size)
        except LabelStudioAuthError as exc:
            rows.update({t: (STOPPED, str(exc)) for t in entries})
        except LabelStudioError as exc:
            rows.update({t: (RETRY, str(exc)) for t in entries})
        else:
            rows.update({t: (WRITTEN, "") for t in outcome.written})
            rows.update({t: (SKIPPED, "") for t in outcome.skipped})
            rows.update({t: (REJECTED, reason) for t, reason in outcome.rejected.items()})
        return rows

    def _maybe_exit(self) -> None:
        """Fault injection (tests): die after writing, before answering: the worst moment for duplicates."""
        after, marker = os.environ.get(EXIT_AFTER_ENV), os.environ.get(EXIT_MARKER_ENV)
        if not after or not marker or self.done < int(after):
            return
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


def _maybe_crash(task_id: int) -> None:
    """Fault injection (tests): die whenever about to predict a task listed in CRASH_TASKS_ENV's file."""
    path = os.environ.get(CRASH_TASKS_ENV)
    if not path:
        return
    try:
        listed = Path(path).read_text().split()
    except OSError:
        return
    if str(task_id) in listed:
        os._exit(1)


def _rows(rows: Mapping[int, tuple[str, str]]) -> dict[str, np.ndarray]:
    ids = sorted(rows)
    return {"task_id": np.array(ids, dtype=np.int64), "state": np.array([rows[t][0] for t in ids], dtype=object),
            "error": np.array([rows[t][1] for t in ids], dtype=object)}


def version_changed(now: str, job: str) -> str:
    return (f"the model version is now {now!r} but the job predicts with {job!r} (the models or their "
            "settings changed); retrieve predictions again to start a job with the new version")


def actor_resources(num_gpus: float | None, num_cpus: float) -> tuple[float, float | None]:
    """(GPUs, CPUs) per actor: one GPU where the cluster has GPUs (CPUs left to Ray's default); else
    a fraction of a CPU."""
    import ray

    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return (num_gpus, None) if num_gpus else (0.0, num_cpus)


def ensure_ray(address: str | None) -> None:
    """Connect to ``address`` (or start a local cluster) unless this process already is connected."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)


def build_dataset(job: Job, settings: RaySettings, only: frozenset[int] | None = None,
                  rows: Sequence[dict[str, Any]] | None = None) -> ray.data.Dataset | None:
    """The lazy pipeline of one pass: ``rows`` (a store job's claimed tasks, ``stored_rows``), else the
    project's task list read page by page (``only`` these ids, if given), into the actor pool; None
    when there is no task. Only named ``map_batches`` parameters: no deprecated ``concurrency`` or
    ``ray_remote_args``."""
    import ray
    import ray.data

    assert job.credentials is not None
    credentials: Credentials = job.credentials
    project, size, version = int(job.project), settings.page_size, job.model_version
    ds: ray.data.Dataset
    if rows is not None:
        if not rows:
            return None
        ds = ray.data.from_items(list(rows), override_num_blocks=max(1, math.ceil(len(rows) / settings.batch_size)))
    else:
        pages = math.ceil(count_tasks(LabelStudioClient(credentials), project) / size)
        if pages == 0:
            return None

        def page_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
            return read_page(LabelStudioClient(credentials), project, int(row["page"]), size, version, only)

        ds = (ray.data.from_items([{"page": p} for p in range(1, pages + 1)], override_num_blocks=pages)
              .flat_map(page_rows, num_cpus=0.25))
    gpus, cpus = actor_resources(settings.num_gpus, settings.num_cpus)
    ledger = ray.remote(num_cpus=0)(CrashLedger).remote()  # lives as long as the pass's dataset holds it
    return ds.map_batches(
        PredictActor, fn_constructor_kwargs={"job": job, "chunk_size": settings.chunk_size, "ledger": ledger,
                                             "check_written": rows is not None},
        batch_size=settings.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=settings.num_actors), num_gpus=gpus, num_cpus=cpus)


def run_pass(job: Job, settings: RaySettings, only: frozenset[int] | None = None,
             rows: Sequence[dict[str, Any]] | None = None) -> Iterator[tuple[int, str, str]]:
    """One pass on the cluster over ``rows`` or the project's tasks (see ``build_dataset``): yields
    (task id, outcome, error) as batches finish."""
    ds = build_dataset(job, settings, only, rows)
    if ds is None:
        return
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for task_id, state, error in zip(batch["task_id"], batch["state"], batch["error"], strict=True):
            yield int(task_id), str(state), str(error)


def run_project_on_ray(job: Job, settings: RaySettings) -> RayOutcome:
    """Predict every task of ``job.project`` that has no prediction of ``job.model_version`` yet, on
    the cluster (one pass, no store): the CLI's path.

    Arguments:
        job: what to predict with (plan, label config, model version, credentials); ``id`` names the
            run in logs.
        settings: cluster address and pool size.
    Returns:
        ``RayOutcome``; ``stopped`` says why the run ended early.
    """
    ensure_ray(settings.address)
    outcome = RayOutcome()
    for task_id, state, error in run_pass(job, settings, None):
        _tally(outcome, task_id, state, error)
        if outcome.stopped:
            break
    return outcome


def preannotate_on_ray(model: GroundedSamModel, client: LabelStudioClient, project: int,
                       settings: RaySettings) -> RayOutcome:
    """``python -m backend.preannotate --ray``: the project's prompt plan and model version as the CLI's
    one-process path computes them (``model`` is the driver's, built like the server's; the actors build
    their own from their node's environment), then one pass over the project on the cluster.

    Raises:
        LabelStudioError: the project can't be read. ValueError: no BrushLabels, a prompt matching no label.
    """
    from ..label_config import parse_label_config
    from ..project_state import project_key
    from ..prompts import check_prompt_labels

    config = client.get_project(int(project)).get("label_config")
    if not config:
        raise LabelStudioError(f"project {project} has no labeling config")
    parsed = parse_label_config(str(config))
    plan = check_prompt_labels(parsed, model.plan(project_key(project), parsed, None))
    now = time.time()
    job = Job(id=f"ray-{worker_name()}", project=str(int(project)), model_version=model.model_version,
              plan=plan.to_json(), label_config=str(config), credentials=client.credentials, state="running",
              error=None, created=now, updated=now)
    logger.info("project %s: prompt %s (from %s), model %s, on Ray", project, list(plan.phrases), plan.source,
                job.model_version)
    return run_project_on_ray(job, settings)


def run_job_on_ray(store: JobStore, job_id: str, settings: RaySettings, timeout: float | None = None, *,
                   worker_id: str | None = None, stop: Callable[[], bool] | None = None,
                   wait: bool = True) -> RayOutcome:
    """Work a store's job on the cluster until it is finished: claim its due tasks (leased, so no other
    runner, in-process or on Ray, takes them meanwhile), run a pass over them as the store holds them,
    record each outcome (so /api/jobs shows progress), and pass again over the retryable failures until
    the store's ``max_attempts`` are used up.

    Arguments:
        store: the job store (the driver alone uses it; actors only talk to Label Studio).
        job_id: the job (created with ``create_job``, with credentials and a label config).
        settings: cluster address and pool size.
        timeout: seconds before giving up (the claimed tasks go back to pending).
        worker_id: the lease owner (default: ``ray:`` and a ``worker_name``).
        stop: called between results; True hands what is left back (the server shutting down).
        wait: while tasks wait out a retry back-off or are leased to another runner, wait for them
            (the CLI); False returns (the server's runner, which has other jobs to look at).
    Returns:
        ``RayOutcome`` of every pass together.
    """
    ensure_ray(settings.address)
    deadline = None if timeout is None else time.monotonic() + timeout
    worker = worker_id or f"ray:{worker_name()}"
    outcome = RayOutcome()
    while (deadline is None or time.monotonic() < deadline) and not (stop is not None and stop()):
        job = store.get_job(job_id)
        if job is None or job.state not in ACTIVE_JOB_STATES:
            break
        claimed = store.claim_tasks(job_id, 1 << 30, worker, RAY_LEASE_S)
        if not claimed:
            progress = store.progress(job_id)
            if progress is None or progress.finished or not wait:
                break  # done, or (not waiting) the rest is another runner's or waits out a back-off
            time.sleep(0.5)  # retries waiting out their back-off
            continue
        _record_pass(store, job, settings, claimed, worker, outcome, stop)
        if outcome.stopped:
            store.fail_job(job_id, outcome.stopped)
            break
    return outcome


def _record_pass(store: JobStore, job: Job, settings: RaySettings, claimed: Sequence[ClaimedTask], worker: str,
                 outcome: RayOutcome, stop: Callable[[], bool] | None) -> None:
    left = {c.task_id for c in claimed}
    renewed = time.monotonic()
    try:
        for task_id, state, error in run_pass(job, settings, rows=stored_rows(claimed)):
            left.discard(task_id)
            _tally(outcome, task_id, state, error)
            if state in (WRITTEN, SKIPPED):
                store.mark_done(job.id, [task_id])
            elif state in (REJECTED, FAILED, RETRY):
                store.mark_failed(job.id, task_id, error, retryable=state == RETRY, worker_id=worker)
            if (outcome.stopped or (stop is not None and stop())
                    or store.job_state(job.id) not in ACTIVE_JOB_STATES):
                return  # stopped, shutting down or cancelled: what is left goes back below
            if time.monotonic() - renewed > RAY_LEASE_S / 3:
                store.renew(job.id, sorted(left), worker, RAY_LEASE_S)
                renewed = time.monotonic()
    finally:
        store.release(job.id, sorted(left), worker)


def _tally(outcome: RayOutcome, task_id: int, state: str, error: str) -> None:
    if state == WRITTEN:
        outcome.written.append(task_id)
    elif state == SKIPPED:
        outcome.skipped.append(task_id)
    elif state == RETRY:
        outcome.retry[task_id] = error
    elif state == STOPPED:
        outcome.stopped = error
    else:
        outcome.failed[task_id] = error
