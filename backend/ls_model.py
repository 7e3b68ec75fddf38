"""The Label Studio model: /setup, /predict and /webhook of one backend process.

Like a label-studio-ml ``LabelStudioMLBase`` subclass, ``GroundedSamModel`` answers /setup,
/predict and /webhook, but it is one long-lived object per process (the engine is big) and keeps
its per-project state in a small locked store instead of on the instance. The pieces it uses live
beside it: ``model_settings`` (its environment), ``prompts`` (which prompt and thresholds),
``ls_results`` (segments -> Label Studio results), ``predict_parts`` (entries, counters, read-ahead),
``project_state`` (per-project memory) and ``engine_holder`` (the engine of this process).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from .detector import PromptError
from .engine_holder import EngineHolder
from .errors import BadRequest, EngineNotReady, TaskError
from .fetch import FetchError, fetch_image
from .images import ImageError
from .jobs.store import Job, JobStore
from .label_config import ImageTarget, LabelConfig, TaskDataError, parse_label_config
from .ls_api import ClientRegistry, Credentials, LabelStudioClient, LabelStudioError, normalise_url, register_secret
from .ls_results import prediction, segments_to_results
from .model_settings import ModelSettings
from .predict_parts import PredictionStats, PredictOutcome, failed_entry, queued_entry, read_ahead
from .project_state import ProjectMemory, project_key
from .prompts import (
    PromptInput,
    PromptPlan,
    check_prompt_labels,
    check_prompt_tokens,
    maps_to_labels,
    plan_prompt,
    read_context,
    read_extra_params,
    read_results,
)

if TYPE_CHECKING:
    from .jobs.runner import BackgroundRunner, JobRunner, TaskPredictor

logger = logging.getLogger(__name__)


class GroundedSamModel:
    """Grounding DINO + SAM as a Label Studio ML backend; one instance serves every project."""

    def __init__(self, engine: EngineHolder, settings: ModelSettings | None = None,
                 memory: ProjectMemory | None = None, clients: ClientRegistry | None = None,
                 jobs: JobStore | None = None) -> None:
        """``jobs``: the shared job store; with it, per-project state lives in its database and a batch
        that reaches PREDICT_DEADLINE_S hands the rest to a background job (``start_jobs`` runs them
        in this process). Without it, tasks not reached get entries without ``result`` (Label Studio
        asks again next time)."""
        self.engine = engine
        self.settings = settings or ModelSettings()
        self.jobs = jobs
        self.memory = memory or ProjectMemory(max_bytes=self.settings.project_memory_bytes,
                                              shared=jobs.projects if jobs is not None else None)
        self.clients = clients or ClientRegistry(timeout=self.settings.fetch.timeout)
        self.stats = PredictionStats()
        self.runner: BackgroundRunner | None = None

    # -- background jobs ---------------------------------------------------------------------------
    def start_jobs(self, runner: BackgroundRunner | None = None) -> BackgroundRunner:
        """Run the store's jobs in the background (resuming unfinished ones): with ``runner`` (the
        server's ``RayJobRunner`` when RAY_ADDRESS is set), else in a thread of this process."""
        if self.runner is None:
            self.runner = runner or self.job_runner()
            self.runner.start()
        return self.runner

    def job_runner(self, predict: TaskPredictor | None = None, **options: Any) -> JobRunner:
        """A JobRunner over this model's job store, predicting with ``predict_job_task`` (or
        ``predict``, a wrapper of it) and writing with the job's credentials: the server runs one in
        the background (``start_jobs``), ``backend.preannotate`` one in the foreground. ``options``
        go to JobRunner (batch_size, chunk_size, ...)."""
        from .jobs.runner import JobRunner

        if self.jobs is None:
            raise RuntimeError("no job store: set JOBS_DB or DATA_DIR")
        return JobRunner(self.jobs, predict or self.predict_job_task, self._job_client, **options)

    def predict_job_task(self, job: Job, task: Mapping[str, Any],
                         images: Sequence[tuple[ImageTarget, np.ndarray]] | None = None) -> dict[str, Any]:
        """One task of a background job, with the job's plan and labeling config and this process's
        model version (the runner stops a job whose version no longer matches). ``images``: the
        task's images from ``load_job_task`` when the caller fetched them ahead (Ray actors)."""
        engine = self.engine.get(timeout=self.settings.engine_wait_s)
        if images is None:
            images = self.load_job_task(job, task)
        entry = self.predict_task(engine, images, PromptPlan.from_json(job.plan), self.model_version)
        self._link_regions(entry, task.get("id"), job.project)
        return entry

    def load_job_task(self, job: Job, task: Mapping[str, Any]) -> list[tuple[ImageTarget, np.ndarray]]:
        """The images of one task of a background job (its labeling config, its key): the I/O part."""
        if not job.label_config:
            raise BadRequest(f"job {job.id} has no labeling config")
        engine = self.engine.get(timeout=self.settings.engine_wait_s)
        client = self.clients.get(job.credentials) if job.credentials else None
        return self.load_task(engine, task, parse_label_config(job.label_config), client)

    def _job_client(self, job: Job) -> LabelStudioClient:
        if job.credentials is None:
            raise LabelStudioError(f"job {job.id} has no Label Studio credentials to write predictions with")
        return self.clients.get(job.credentials)

    def _link_regions(self, entry: dict[str, Any], task_id: Any, project: str | None) -> None:
        """Put "Why this mask" and a link to the region's explanation in each result's meta text.

        Label Studio 1.23.2 shows ``meta.text`` as plain text and has no clickable form for it: the
        editor's RegionDetailsMeta (libs/editor/src/components/SidePanels/DetailsPanel/RegionDetails.tsx,
        built into web/dist/apps/labelstudio/358.js) renders ``{region.meta?.text}`` as a React text
        child of a ``div.lsf-detailed-region__meta-text`` (CSS ``white-space: pre-wrap``) whose click
        only opens a textarea to edit it; ``meta`` is ``types.frozen<{text?: string[]}>`` and no other
        field of it is shown, nor is markdown, HTML or a link rendered for a region. So the link goes
        on a line of its own, short, to select and copy.
        """
        for result in entry["result"]:
            link = self.settings.explain_link(task_id, project, result.get("id") or None)
            if link is None:
                return
            result["meta"] = {"text": [f"Why this mask:\n{link}"]}

    @property
    def model_version(self) -> str:
        version = self.engine.model_version
        if version is None:
            raise EngineNotReady("the engine config can't be read; see the server log")
        return version

    # -- /setup ----------------------------------------------------------------------------------
    def setup(self, project: Any, schema: str | None, hostname: str | None, access_token: str | None,
              extra_params: Any) -> str:
        """Remember the project's connection details and extra_params; returns the model version."""
        key = project_key(project)
        register_secret(access_token)  # before anything can log it
        self.settings.check_label_config(schema)
        if schema:
            config = parse_label_config(schema)  # fail at connection time, not at the first prediction
            if self.engine.engine is not None:  # a label too long for the text encoder, when it is loaded
                self.readable_plan(self.engine.engine, PromptPlan(tuple(config.default_phrases()), "labels"))
        extra = read_extra_params(extra_params)
        changes: dict[str, Any] = {"extra": extra, "label_config": schema or None}
        if hostname:
            try:
                changes["credentials"] = Credentials(normalise_url(hostname), (access_token or "").strip(), "setup")
            except ValueError as exc:
                raise BadRequest(f"hostname: {exc}") from exc
        self.memory.update(key, **changes)
        return self.model_version

    # -- Label Studio access -----------------------------------------------------------------------
    def credentials_for(self, project: str | None) -> Credentials | None:
        """How to reach Label Studio for ``project``: LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY, completed
        by what that project sent in /setup; None when neither is known.

        A /setup's hostname and access_token belong to the project that sent them: another project
        (or a request naming none) never gets them, so one /setup can't redirect everyone's fetches
        (and the key they carry) to a host of its choosing.
        """
        env = self.settings.credentials
        setup = self.memory.get(project).credentials
        if env and env.api_key:
            return env
        if env and setup and setup.api_key:  # our URL for Label Studio, its key
            return Credentials(env.url, setup.api_key, "setup")
        return env or setup

    def client_for(self, project: str | None) -> LabelStudioClient | None:
        credentials = self.credentials_for(project)
        return self.clients.get(credentials) if credentials else None

    # -- /predict --------------------------------------------------------------------------------
    def plan(self, project: str | None, config: LabelConfig, context: Any) -> PromptPlan:
        return self.plan_for(project, config, read_context(context))

    def plan_for(self, project: str | None, config: LabelConfig, given: PromptInput) -> PromptPlan:
        """The plan a /predict of ``project`` would use, with ``given`` in the place of a context."""
        state = self.memory.get(project)
        plan = plan_prompt(config, given, state.remembered, state.extra, self.settings.default_prompt)
        if plan.source == "project" and not maps_to_labels(config, plan.phrases):
            # A remembered prompt (e.g. from an annotation webhook) for labels this config lacks
            # must not break every later batch: fall back to the next source.
            logger.info("project %s: remembered prompt %s matches no label; not using it", project,
                        list(plan.phrases))
            remembered = PromptInput(None, state.remembered.box_threshold, state.remembered.text_threshold)
            plan = plan_prompt(config, given, remembered, state.extra, self.settings.default_prompt)
        return plan

    def predict(self, tasks: Sequence[Any], project: Any, label_config: str | None,
                context: Any = None) -> PredictOutcome:
        """One entry per task, in order. A task that fails gets an entry without ``result``
        (``failed_entry``: Label Studio stores nothing and retries it next time) and an ``errors``
        item; with a single task and a context (interactive mode) its error is raised instead, so
        the person who clicked sees why. A task that simply has no detections gets an empty result."""
        key = project_key(project)
        self.settings.check_label_config(label_config)
        label_config = label_config or self.memory.get(key).label_config
        if not label_config:
            raise BadRequest("label_config is missing (and no /setup schema is known for this project)")
        config = parse_label_config(label_config)
        given = read_context(context)
        plan = check_prompt_labels(config, self.plan(key, config, context))
        engine = self.engine.get(timeout=self.settings.engine_wait_s)
        plan = self.readable_plan(engine, plan)
        if plan.dropped:
            logger.warning("project %s: prompt phrases %s match no label (%s) or have no word the text encoder "
                           "reads; not detected", key, list(plan.dropped), config.describe_labels())
        if given.phrases or given.box_threshold is not None or given.text_threshold is not None:
            self._remember(key, given)
        client = self.client_for(key)
        version = self.model_version
        logger.info("predict project=%s tasks=%d prompt=%s (from %s)", key, len(tasks), list(plan.phrases),
                    plan.source)
        batch = context is None and len(tasks) > 1  # interactive requests are never deferred
        held = self._held_by_jobs(key, version, tasks) if batch else {}
        todo, repeats = _first_copies(tasks, held)
        started = time.monotonic()
        slowest = 0.0  # the longest task so far: a task is only started when it can end in time
        entries: dict[int, dict[str, Any]] = {}  # position in ``todo`` -> entry
        errors: list[dict[str, Any]] = []
        loads = read_ahead(todo, lambda task: self.load_task(engine, task, config, client),
                           self.settings.prefetch_tasks)
        try:
            for position, (task, loaded) in enumerate(zip(todo, loads, strict=False)):
                elapsed = time.monotonic() - started
                if batch and self.settings.predict_deadline_s and elapsed + slowest > self.settings.predict_deadline_s:
                    break
                task_started = time.monotonic()
                entries[position] = self._predict_one(engine, task, loaded, plan, version, key, errors,
                                                      raise_errors=context is not None and len(tasks) == 1)
                slowest = max(slowest, time.monotonic() - task_started)
        finally:
            loads.close()  # stop reading ahead for tasks that won't be predicted here
        unreached = [task for position, task in enumerate(todo) if position not in entries]
        job_id, deferred = self._defer(key, version, plan, label_config, unreached, held, errors)
        by_id = {id(task): entries[position] for position, task in enumerate(todo) if position in entries}
        results = []
        for task in tasks:
            task_id = _task_id(task)
            if id(task) in repeats:  # one prediction per task: the first copy's (stored once)
                message = f"task {task_id} appears more than once in this request: predicted once, for its first copy"
                errors.append({"task": task_id, "error": message})
                results.append(failed_entry(message, version))
                continue
            entry = by_id.get(id(task)) or (deferred.get(task_id) if task_id is not None else None)
            if entry is None:
                entry = failed_entry("not predicted before PREDICT_DEADLINE_S",
                                                                     version)
            results.append(entry)
        return PredictOutcome(results, errors, plan, job_id, len(held) + len(unreached) if job_id else 0)

    @staticmethod
    def readable_plan(engine: Any, plan: PromptPlan) -> PromptPlan:
        """``plan`` checked against ``engine``'s text encoder (``prompts.check_prompt_tokens``) before any
        task runs: otherwise a label too long for one pass, or without a readable word, fails every task."""
        detector = engine.detector
        return check_prompt_tokens(plan, detector.tokenizer, detector.max_text_tokens)

    def _predict_one(self, engine: Any, task: Any, loaded: Future[list[tuple[ImageTarget, np.ndarray]]],
                     plan: PromptPlan, version: str, key: str | None, errors: list[dict[str, Any]],
                     raise_errors: bool) -> dict[str, Any]:
        """The entry of one task of a /predict (its error recorded in ``errors``)."""
        try:
            entry = self.predict_task(engine, loaded.result(), plan, version)
            self._link_regions(entry, task.get("id"), key)
            self.stats.record_ok(len(entry["result"]))
            return entry
        except Exception as exc:
            self.stats.record_failure(exc)
            if raise_errors:
                raise
            task_id = _task_id(task)
            if isinstance(exc, (FetchError, ImageError, LabelStudioError, TaskDataError, PromptError)):
                message = _message(exc)
                logger.warning("task %s: no prediction (Label Studio will ask again): %s", task_id, message)
            else:  # a bug or a model failure: keep the traceback, and still answer for the others
                message = f"internal error ({type(exc).__name__}); see the server log"
                logger.exception("task %s: no prediction (Label Studio will ask again)", task_id)
            errors.append({"task": task_id, "error": message})
            return failed_entry(message, version)

    def _held_by_jobs(self, key: str | None, version: str, tasks: Sequence[Any]) -> dict[int, str]:
        """{task id: job id} of the tasks an active job of this project and version already holds: a
        second "Retrieve predictions" must not predict (and store) them a second time."""
        if self.jobs is None or key is None:
            return {}
        ids = [task_id for task in tasks if (task_id := _task_id(task)) is not None]
        return self.jobs.held_tasks(key, version, ids) if ids else {}

    def _defer(self, key: str | None, version: str, plan: PromptPlan, label_config: str,
               unreached: list[Any], held: dict[int, str],
               errors: list[dict[str, Any]]) -> tuple[str | None, dict[int, dict[str, Any]]]:
        """Hand the tasks a /predict did not reach to a background job; ({task id: entry} of every
        task a job holds, the job id)."""
        if not unreached and not held:
            return None, {}
        credentials = self.credentials_for(key)
        ids = [_task_id(task) for task in unreached]
        if self.jobs is None or key is None or credentials is None or None in ids:
            why = ("no job store (JOBS_DB / DATA_DIR)" if self.jobs is None else
                   "no Label Studio URL and key to write them with (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY, "
                   "or /setup)" if credentials is None else "the tasks have no project or ids")
            for task in unreached:
                message = (f"not predicted before PREDICT_DEADLINE_S={self.settings.predict_deadline_s:g} s and "
                           f"can't be predicted in the background: {why}; retrieve predictions again")
                errors.append({"task": _task_id(task), "error": message})
            logger.warning("project %s: %d task(s) not reached before the deadline and not queued: %s", key,
                           len(unreached), why)
            return None, {task_id: queued_entry(job_id, version) for task_id, job_id in held.items()}
        created = self.jobs.create_job(key, version, [dict(task) for task in unreached], plan=plan.to_json(),
                                       label_config=label_config, credentials=credentials)
        job_id = created.job_id or next(iter(held.values()))
        if self.runner is not None:
            self.runner.wake()
        logger.info("project %s: %d task(s) handed to background job %s (%d already held by a job)", key,
                    created.added, job_id, len(held))
        deferred = {task_id: queued_entry(job, version) for task_id, job in held.items()}
        deferred.update({task_id: queued_entry(job_id, version) for task_id in ids if task_id is not None})
        return job_id, deferred

    def load_task(self, engine: Any, task: Any, config: LabelConfig,
                  client: LabelStudioClient | None) -> list[tuple[ImageTarget, np.ndarray]]:
        """Each image the config labels, fetched and decoded (RGB): the I/O part of a task."""
        if not isinstance(task, Mapping) or not isinstance(task.get("data"), Mapping):
            raise TaskError("task must be an object with a 'data' object")
        task_id = task.get("id")
        return [(target, engine.load_image(fetch_image(target.image_url(task["data"]), client, self.settings.fetch,
                                                       task_id if isinstance(task_id, int) else None)))
                for target in config.targets]

    def predict_task(self, engine: Any, images: Sequence[tuple[ImageTarget, np.ndarray]], plan: PromptPlan,
                     version: str) -> dict[str, Any]:
        results: list[dict[str, Any]] = []
        scores: list[float] = []
        for target, rgb in images:
            height, width = rgb.shape[:2]
            segments = engine.segment(rgb, list(plan.phrases), plan.box_threshold, plan.text_threshold)
            target_results, target_scores = segments_to_results(segments, target, width, height)
            results += target_results
            scores += target_scores
        return prediction(results, scores, version)

    def _remember(self, key: str | None, given: PromptInput) -> None:
        current = self.memory.get(key).remembered
        merged = PromptInput(
            given.phrases or current.phrases,
            given.box_threshold if given.box_threshold is not None else current.box_threshold,
            given.text_threshold if given.text_threshold is not None else current.text_threshold,
        )
        self.memory.update(key, remembered=merged)

    # -- /webhook --------------------------------------------------------------------------------
    def webhook(self, action: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Remember the prompt an annotation used; forget a deleted project. Never trains."""
        project = data.get("project")
        key = project_key(project) if isinstance(project, (Mapping, str, int)) else None
        listed = data.get("annotations") or []
        if not isinstance(listed, list):  # a webhook never fails: the rest of the event still counts
            logger.info("webhook %s: ignoring 'annotations' (a list of annotations expected, got %s)", action,
                        type(listed).__name__)
            listed = []
        annotations = [data.get("annotation"), *listed]
        if key is None:
            key = next((project_key(a.get("project")) for a in annotations
                        if isinstance(a, Mapping) and a.get("project") is not None), None)
        reply: dict[str, Any] = {"status": "ok", "action": action}
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"):
            for annotation in reversed([a for a in annotations if isinstance(a, Mapping)]):
                try:
                    given = read_results(annotation.get("result"), where="annotation.result")
                except (BadRequest, PromptError) as exc:
                    logger.info("webhook %s: ignoring the annotation's prompt: %s", action, exc)
                    continue
                if not given.empty:
                    self._remember(key, given)
                    reply["remembered_prompt"] = list(given.phrases or ())
                    break
        elif action == "PROJECT_DELETED":
            self.memory.forget(key)
        elif action == "START_TRAINING":
            reply["detail"] = "Grounded SAM is zero-shot: training is a no-op"
        return reply



def _first_copies(tasks: Sequence[Any], held: Mapping[int, str]) -> tuple[list[Any], set[int]]:
    """(the tasks to predict: neither held by a job nor a repeat of an earlier task's id, in order; the
    ``id()`` of the repeats). Label Studio sends each task once, but a direct caller may not, and two
    answers with a result for one task would be two stored predictions."""
    todo: list[Any] = []
    repeats: set[int] = set()
    seen: set[int] = set()
    for task in tasks:
        task_id = _task_id(task)
        if task_id is not None and task_id in seen:
            repeats.add(id(task))
            continue
        if task_id is not None:
            seen.add(task_id)
        if task_id not in held:
            todo.append(task)
    return todo, repeats


def _task_id(task: Any) -> int | None:
    task_id = task.get("id") if isinstance(task, Mapping) else None
    return task_id if isinstance(task_id, int) and not isinstance(task_id, bool) else None


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
