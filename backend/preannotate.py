"""Pre-annotate a whole Label Studio project from the command line, without connecting a backend.

    python -m backend.preannotate --project 7 [--url http://localhost:8080] [--api-key KEY]
                                  [--prompt "cat . dog"] [--batch-size 8] [--limit N] [--jobs-db URL]

The same job code as the server's background jobs (``backend.jobs``), run in the foreground: the
project's tasks without a prediction of the current model version become a job in the shared job
store (JOBS_DB, else DATA_DIR/jobs.sqlite3, or ``--jobs-db``), and ``JobRunner.run_job`` predicts them
with the server's own ``GroundedSamModel.predict_job_task`` and writes them to Label Studio in bulk.
So predictions carry the server's ``model_version`` ("Retrieve predictions" later skips tasks
pre-annotated here, and vice versa), and a CLI run and the server never predict a task twice: tasks an
active job of the store already holds (a server's, or an interrupted run's) are finished by running
that job, which resumes it.

Resumable: predictions are written as they are made (in chunks); Ctrl-C writes what was predicted
and hands the rest back, and a rerun continues. A task that fails (unreachable image, corrupt file) is
retried a bounded number of times, then logged and left without a prediction (a rerun retries it); it
never stops the others. A rejected key stops the run with the reason. Exit status: 0 all done, 1 some
tasks failed, 2 bad arguments/config/key (or a job stopped for such a reason), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .jobs.store import DONE, FAILED, JobProgress, JobStore, JobStoreError, JsonObject, default_url
from .ls_api import Credentials, LabelStudioClient, LabelStudioError, normalise_url

if TYPE_CHECKING:  # both import torch: loaded only once the arguments are known good
    from .engine import Engine
    from .jobs.store import Job
    from .ls_model import GroundedSamModel

logger = logging.getLogger(__name__)

PAGE_SIZE = 100
# What the job keeps of a listed task: what /predict would receive (predictions and annotations
# can be large and are not needed to predict).
_DROPPED_TASK_FIELDS = ("predictions", "annotations", "drafts")


@dataclass
class Summary:
    """What a run did; ``failures`` are (task id, reason) pairs."""

    total: int = 0
    done: int = 0  # predictions stored by this run
    empty: int = 0  # ... of which found nothing (an empty prediction is still a prediction)
    skipped: int = 0  # already had a prediction of this model version
    failed: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)
    interrupted: bool = False
    stopped: str | None = None  # why a job stopped as a whole (a rejected key, cancelled)
    jobs: list[str] = field(default_factory=list)  # the store's jobs this run worked on

    def line(self) -> str:
        text = (f"done {self.done} (empty {self.empty}), skipped {self.skipped}, failed {self.failed}"
                f" of {self.total} tasks")
        return text + (" — interrupted; rerun to continue" if self.interrupted else "")


@dataclass
class ProjectTasks:
    """A project's tasks as listed: ``todo`` lack a prediction of the version, ``skipped`` have one."""

    total: int
    skipped: int
    todo: list[JsonObject]


def list_tasks(client: LabelStudioClient, project: int, model_version: str, limit: int | None = None,
               page_size: int = PAGE_SIZE) -> ProjectTasks:
    """Page through ``project``'s tasks (id order); the first ``limit`` without a prediction of
    ``model_version`` are ``todo``."""
    listed = ProjectTasks(0, 0, [])
    page, seen = 1, 0
    while True:
        body = client.get_json(
            f"/api/tasks/?project={int(project)}&fields=all&page={page}&page_size={page_size}",
            f"listing page {page} of project {project}'s tasks")
        batch = body.get("tasks", []) if isinstance(body, Mapping) else body
        listed.total = int(body.get("total", len(batch))) if isinstance(body, Mapping) else len(batch)
        for task in batch:
            if has_prediction(task, model_version):
                listed.skipped += 1
            elif limit is None or len(listed.todo) < limit:
                listed.todo.append({k: v for k, v in task.items() if k not in _DROPPED_TASK_FIELDS})
        seen += len(batch)
        if not batch or seen >= listed.total:
            return listed
        page += 1


def has_prediction(task: Mapping[str, Any], model_version: str) -> bool:
    """True when the task already has a prediction of ``model_version`` (what Label Studio checks)."""
    return any(isinstance(p, Mapping) and p.get("model_version") == model_version
               for p in task.get("predictions") or [])


class _Bar:
    """The tqdm bar of a run: tasks finished (skipped + done + failed) of the project's, fed by the
    runner's ``on_progress``. A job's counts are taken relative to where it stood when this run
    started on it (an interrupted run's job already has some done), and summed over the run's jobs."""

    def __init__(self, project: int, total: int, skipped: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=skipped, unit="task", desc=f"project {project}",
                        disable=not enabled, dynamic_ncols=True)
        self.skipped = skipped
        self.done = self.failed = 0  # by this run, all its jobs
        self._earlier = (0, 0)  # by this run's earlier jobs
        self._base = (0, 0)  # the current job's counts when this run started on it

    def start_job(self, progress: JobProgress | None) -> None:
        self._earlier = (self.done, self.failed)
        self._base = (progress.done, progress.failed) if progress else (0, 0)

    def __call__(self, progress: JobProgress) -> None:
        self.done = self._earlier[0] + progress.done - self._base[0]
        self.failed = self._earlier[1] + progress.failed - self._base[1]
        n = min(self.skipped + self.done + self.failed, int(self.bar.total or 0))
        self.bar.update(n - self.bar.n)
        self.bar.set_postfix(done=self.done, failed=self.failed, skipped=self.skipped,
                             eta=f"{progress.eta_s:.0f}s" if progress.eta_s is not None else "?")

    def close(self) -> None:
        self.bar.close()


class _EmptyCounter:
    """The model's predictor, noting which tasks got an empty result (for the summary)."""

    def __init__(self, predict: Callable[[Job, JsonObject], dict[str, Any]]) -> None:
        self.predict = predict
        self.empty: set[int] = set()

    def __call__(self, job: Job, task: JsonObject) -> dict[str, Any]:
        entry = self.predict(job, task)
        if not entry.get("result"):
            self.empty.add(int(task["id"]))
        return entry


def preannotate(client: LabelStudioClient, project: int, model: GroundedSamModel, *, prompt: str | None = None,
                batch_size: int = 8, limit: int | None = None, progress: bool = True) -> Summary:
    """Predict and store every task of ``project`` that lacks a prediction of the model's version, as a
    job of ``model.jobs`` run in the foreground.

    Arguments:
        client: Label Studio and the key (listing, image downloads, writes).
        project: the Label Studio project id.
        model: a ``GroundedSamModel`` with a job store (``jobs``).
        prompt: what to segment ("cat . dog"); default: the project's remembered prompt, PROMPT, its labels.
        batch_size: tasks claimed and predicted at a time.
        limit: put at most this many new tasks in the job.
        progress: show a tqdm bar on stderr.
    Returns:
        ``Summary`` of the run (``interrupted`` after Ctrl-C: what was predicted is written).
    Raises:
        LabelStudioError: Label Studio unreachable, the key rejected, no such project.
        ValueError: a config without BrushLabels, a prompt matching no label (BadRequest), a phrase
            longer than Grounding DINO reads in one pass (PromptError).
    """
    from .label_config import parse_label_config
    from .project_state import project_key
    from .prompts import PromptInput, check_prompt_labels, split_typed_prompt

    store = model.jobs
    if store is None:
        raise JobStoreError("preannotate needs a job store (JOBS_DB / DATA_DIR)")
    details = client.get_project(project)
    config = details.get("label_config")
    if not config:
        raise LabelStudioError(f"project {project} has no labeling config")
    version = model.model_version
    key = project_key(project)
    assert key is not None
    # A config without BrushLabels or a prompt that matches no label fails here, before any work.
    parsed = parse_label_config(str(config))
    given = PromptInput(tuple(split_typed_prompt(prompt)) if prompt and prompt.strip() else None)
    plan = check_prompt_labels(parsed, model.plan_for(key, parsed, given))
    # Phrases the text encoder can't read are dropped, and one too long for a pass fails, here too.
    plan = model.readable_plan(model.engine.get(timeout=model.settings.engine_wait_s), plan)
    logger.info("project %s: prompt %s (from %s), model %s", project, list(plan.phrases), plan.source, version)

    listed = list_tasks(client, project, version, limit)
    summary = Summary(total=listed.total, skipped=listed.skipped)
    # Tasks an active job already holds (an interrupted run's, the server's) are finished by running
    # that job; the others go in a new one. create_job leaves the held ones out by itself.
    held = store.held_tasks(key, version, [int(t["id"]) for t in listed.todo])
    created = store.create_job(key, version, listed.todo, plan=plan.to_json(), label_config=str(config),
                               credentials=client.credentials)
    jobs = sorted(set(held.values()), key=lambda job_id: getattr(store.get_job(job_id), "created", 0.0))
    summary.jobs = jobs + ([created.job_id] if created.job_id and created.added else [])
    if held:
        logger.info("project %s: %d task(s) are in unfinished job(s) %s: running them", project, len(held),
                    ", ".join(sorted(set(held.values()))))

    predictor = _EmptyCounter(model.predict_job_task)
    runner = model.job_runner(predict=predictor, batch_size=batch_size)
    bar = _Bar(project, listed.total, listed.skipped, progress)
    current: str | None = None
    try:
        for current in summary.jobs:
            bar.start_job(store.progress(current))
            final = runner.run_job(current, bar)
            if final is not None and final.state != DONE:
                summary.stopped = f"job {current} {final.state}: {final.error or 'no reason given'}"
                break
    except KeyboardInterrupt:
        summary.interrupted = True  # predictions made were written (run_job's finally); a rerun resumes
        last = store.progress(current) if current else None
        if last is not None:
            bar(last)  # count what that final write stored
    finally:
        bar.close()
    summary.done = bar.done
    # Failed = left without a prediction by the run's jobs, each with its last error.
    failures = {e.task_id: e.error for job_id in summary.jobs for e in store.task_errors(job_id)
                if e.state == FAILED}
    summary.failures = sorted(failures.items())
    summary.failed = len(failures)
    summary.empty = len(predictor.empty - set(failures))
    return summary


def build_model(prompt: str | None, credentials: Credentials, engine: Engine | None = None,
                jobs: JobStore | None = None) -> GroundedSamModel:
    """The server's GroundedSamModel around ``engine`` (default: loaded from the environment), with
    ``prompt`` (default: PROMPT) as its default prompt and ``jobs`` as its job store."""
    from .config import EngineConfig
    from .engine import Engine
    from .engine_holder import EngineHolder
    from .fetch import FetchSettings
    from .ls_model import GroundedSamModel, ModelSettings
    from .prompts import split_typed_prompt

    env_prompt = prompt if prompt is not None else os.environ.get("PROMPT", "")
    settings = ModelSettings(
        default_prompt=tuple(split_typed_prompt(env_prompt)) if env_prompt.strip() else None,
        credentials=credentials,
        fetch=FetchSettings.from_env(),
    )
    engine = engine or Engine(EngineConfig.from_env())
    return GroundedSamModel(EngineHolder(engine), settings, jobs=jobs)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m backend.preannotate",
        description="Pre-annotate every task of a Label Studio project with Grounded SAM (resumable).")
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL") or os.environ.get("LABEL_STUDIO_HOST"),
                        help="Label Studio URL (default: LABEL_STUDIO_URL)")
    parser.add_argument("--api-key", default=None,
                        help="legacy token or personal access token (default: LABEL_STUDIO_API_KEY; "
                             "prefer the variable: arguments show up in `ps`)")
    parser.add_argument("--prompt", default=None,
                        help="what to segment, e.g. 'cat . dog' (default: the project's remembered prompt, "
                             "PROMPT, else the project's labels)")
    parser.add_argument("--batch-size", type=int, default=8, help="tasks predicted at a time (default 8)")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many new tasks")
    parser.add_argument("--jobs-db", default=None,
                        help="the job store shared with the server (default: JOBS_DB, else DATA_DIR/jobs.sqlite3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run on a Ray cluster: 'auto', 'head:6379', 'ray://head:10001'; no ADDRESS: "
                             "RAY_ADDRESS, else a local cluster (RAY_ADDRESS alone turns this on)")
    parser.add_argument("--actors", type=int, default=None,
                        help="with --ray: engines in the actor pool (default: the cluster's GPUs, else 1)")
    args = parser.parse_args(argv)
    if args.ray is None and os.environ.get("RAY_ADDRESS"):
        args.ray = ""
    if args.actors is not None and args.actors < 1:
        parser.error("--actors must be at least 1")
    if args.ray is not None and args.prompt:
        parser.error("--prompt is not used with --ray: the actors use the project's prompt (its labels, "
                     "extra_params or PROMPT)")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if not args.url:
        parser.error("no Label Studio URL: pass --url or set LABEL_STUDIO_URL")
    args.api_key = args.api_key or os.environ.get("LABEL_STUDIO_API_KEY") or os.environ.get("LABEL_STUDIO_ACCESS_TOKEN")
    if not args.api_key:
        parser.error("no API key: set LABEL_STUDIO_API_KEY (or pass --api-key)")
    return args


def main(argv: Sequence[str] | None = None, engine: Engine | None = None) -> int:
    """CLI entry point; ``engine`` replaces the one loaded from the environment (tests)."""
    from .ls_api import install_log_redaction
    from .models import ModelLoadError
    from .weights import WeightsError

    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s")
    install_log_redaction()
    try:
        credentials = Credentials(normalise_url(args.url), args.api_key.strip(), "environment")
        client = LabelStudioClient(credentials)  # registers the key with the log redactor
        store = JobStore(args.jobs_db or default_url())
        model = build_model(None, credentials, engine, jobs=store)
        if args.ray is not None:
            return _main_on_ray(args, model, client)
        summary = preannotate(client, args.project, model, prompt=args.prompt, batch_size=args.batch_size,
                              limit=args.limit, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("preannotate: interrupted before any task was predicted", file=sys.stderr)
        return 130
    except (LabelStudioError, JobStoreError, ValueError, OSError, WeightsError, ModelLoadError) as exc:
        # Bad URL or key, unknown project, a config without BrushLabels, a prompt matching no label,
        # an unusable job store, missing weights (the message names the files and the download command).
        print(f"preannotate: {exc}", file=sys.stderr)
        return 2
    for task_id, reason in summary.failures:
        print(f"task {task_id} failed: {reason}", file=sys.stderr)
    print(f"preannotate: project {args.project}, model {model.model_version}: {summary.line()}")
    if summary.interrupted:
        return 130
    if summary.stopped:
        print(f"preannotate: {summary.stopped}", file=sys.stderr)
        return 2
    return 1 if summary.failed else 0


def _main_on_ray(args: argparse.Namespace, model: GroundedSamModel, client: LabelStudioClient) -> int:
    """--ray: the project on a Ray cluster (backend/jobs/ray_runner.py); same exit statuses."""
    import ray

    from .jobs.ray_runner import RaySettings, ensure_ray, preannotate_on_ray

    ensure_ray(args.ray or None)  # None: ray.init reads RAY_ADDRESS, else starts a local cluster
    actors = args.actors or max(1, int(ray.cluster_resources().get("GPU", 0)))
    outcome = preannotate_on_ray(model, client, args.project, RaySettings(
        address=args.ray or None, num_actors=actors, batch_size=args.batch_size,
        chunk_size=max(args.batch_size, 20)))
    failed = {**outcome.failed, **outcome.retry}
    for task_id, reason in sorted(failed.items()):
        print(f"task {task_id} failed: {reason}", file=sys.stderr)
    if outcome.stopped:
        print(f"preannotate: {outcome.stopped}", file=sys.stderr)
        return 2
    print(f"preannotate: project {args.project}, model {model.model_version}, on Ray ({actors} actors): done "
          f"{len(outcome.written)}, skipped {len(outcome.skipped)}, failed {len(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
