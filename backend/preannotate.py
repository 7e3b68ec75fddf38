"""Pre-annotate a whole Label Studio project from the command line, without connecting a backend.

    python -m backend.preannotate --project 7 [--url http://localhost:8080] [--api-key KEY]
                                  [--prompt "cat . dog"] [--batch-size 8] [--limit N]

Runs the engine in this process (models from the environment, as the server: ENGINE_CONFIG,
MODEL_CACHE_DIR, BOX_THRESHOLD, ...) and builds predictions with the server's own code
(``backend.ls_model.GroundedSamModel``), so they carry the server's ``model_version``: Label Studio's
"Retrieve predictions" later skips tasks pre-annotated here, and vice versa.

Resumable: tasks that already have a prediction with the current model version are skipped, and each
prediction is stored as soon as it is made, so Ctrl-C and a rerun continue where it stopped. A task
that fails (unreachable image, corrupt file) is logged, gets no prediction (a rerun retries it) and
never stops the others. Exit status: 0 all done, 1 some tasks failed, 2 bad arguments/config,
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import requests

from .ls_api import Credentials, LabelStudioClient, LabelStudioError, normalise_url

if TYPE_CHECKING:  # both import torch: loaded only once the arguments are known good
    from .engine import Engine
    from .ls_model import GroundedSamModel

logger = logging.getLogger(__name__)

PAGE_SIZE = 100


@dataclass
class Summary:
    """What a run did; ``failures`` are (task id, reason) pairs."""

    total: int = 0
    done: int = 0  # predictions stored by this run
    empty: int = 0  # ... of which found nothing (an empty prediction is still a prediction)
    skipped: int = 0  # already had a prediction of this model version
    failed: int = 0
    failures: list[tuple[Any, str]] = field(default_factory=list)
    interrupted: bool = False

    def line(self) -> str:
        text = (f"done {self.done} (empty {self.empty}), skipped {self.skipped}, failed {self.failed}"
                f" of {self.total} tasks")
        return text + (" — interrupted; rerun to continue" if self.interrupted else "")


class ProjectApi:
    """The few Label Studio calls pre-annotation needs, with ``backend.ls_api``'s token handling
    (legacy tokens and personal access tokens alike)."""

    def __init__(self, client: LabelStudioClient, project: int) -> None:
        self.client = client
        self.project = int(project)
        self.session = requests.Session()

    def label_config(self) -> str:
        config = self.client.get_project(self.project).get("label_config")
        if not config:
            raise LabelStudioError(f"project {self.project} has no labeling config")
        return str(config)

    def tasks(self, page_size: int = PAGE_SIZE) -> Iterator[tuple[int, dict[str, Any]]]:
        """(project's task count, task with its predictions), page by page in id order."""
        page = 1
        seen = 0
        while True:
            body = self.client.get_json(
                f"/api/tasks/?project={self.project}&fields=all&page={page}&page_size={page_size}",
                f"listing page {page} of project {self.project}'s tasks")
            batch = body.get("tasks", []) if isinstance(body, dict) else body
            total = int(body.get("total", len(batch))) if isinstance(body, dict) else len(batch)
            for task in batch:
                yield total, task
            seen += len(batch)
            if not batch or seen >= total:
                return
            page += 1

    def create_prediction(self, task_id: int, entry: dict[str, Any]) -> None:
        """POST /api/predictions/ with the /predict entry (result, score, model_version)."""
        payload = {"task": task_id, "result": entry["result"], "score": entry.get("score"),
                   "model_version": entry["model_version"]}
        for attempt in (1, 2):
            try:
                response = self.session.post(f"{self.client.url}/api/predictions/", json=payload,
                                             headers=self.client.auth_header(), timeout=self.client.timeout)
            except requests.RequestException as exc:
                raise LabelStudioError(f"can't reach Label Studio at {self.client.url} while storing the "
                                       f"prediction of task {task_id}: {type(exc).__name__}") from exc
            if response.status_code == 401 and attempt == 1 and self.client.is_pat:
                self.client.invalidate()  # the access token expired: refresh once
                continue
            if response.status_code == 401:
                raise self.client.auth_error(f"storing the prediction of task {task_id}")
            if not response.ok:
                raise LabelStudioError(f"Label Studio answered HTTP {response.status_code} while storing the "
                                       f"prediction of task {task_id}: {response.text[:300]}")
            return


def has_prediction(task: dict[str, Any], model_version: str) -> bool:
    """True when the task already has a prediction of ``model_version`` (what Label Studio checks)."""
    return any(isinstance(p, dict) and p.get("model_version") == model_version
               for p in task.get("predictions") or [])


def preannotate(api: ProjectApi, model: GroundedSamModel, batch_size: int = 8, limit: int | None = None,
                progress: bool = True) -> Summary:
    """Predict and store every task of ``api.project`` that lacks a prediction of the model's version.

    ``model`` is a ``GroundedSamModel``; tasks are predicted ``batch_size`` at a time (one /predict
    call of the server's), and each prediction is stored before the next batch starts.
    """
    from tqdm import tqdm

    from .label_config import parse_label_config
    from .project_state import project_key
    from .prompts import check_prompt_labels

    config = api.label_config()
    version = model.model_version
    key = project_key(api.project)
    # A config without BrushLabels or a prompt that matches no label fails here, before any work.
    parsed = parse_label_config(config)
    plan = model.plan(key, parsed, None)
    check_prompt_labels(parsed, plan)
    logger.info("project %s: prompt %s (from %s), model %s", api.project, list(plan.phrases), plan.source, version)
    summary = Summary()
    bar = tqdm(total=0, unit="task", desc=f"project {api.project}", disable=not progress, dynamic_ncols=True)
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        outcome = model.predict(pending, project=key, label_config=config)
        failed = {e["task"]: e["error"] for e in outcome.errors}
        for task, entry in zip(pending, outcome.results, strict=True):
            task_id = task["id"]
            try:
                if task_id in failed:
                    raise LabelStudioError(failed[task_id])
                api.create_prediction(task_id, entry)
            except LabelStudioError as exc:
                summary.failed += 1
                summary.failures.append((task_id, str(exc)))
                logger.warning("task %s: no prediction: %s", task_id, exc)
            else:
                summary.done += 1
                summary.empty += not entry["result"]
            bar.update(1)
            bar.set_postfix(done=summary.done, skipped=summary.skipped, failed=summary.failed, refresh=False)
        pending.clear()

    try:
        for total, task in api.tasks():
            if bar.total != total:
                summary.total = bar.total = total
                bar.refresh()
            if has_prediction(task, version):
                summary.skipped += 1
                bar.update(1)
                continue
            if limit is not None and summary.done + summary.failed + len(pending) >= limit:
                break
            pending.append(task)
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    except KeyboardInterrupt:
        summary.interrupted = True  # stored predictions stay; a rerun skips them
    finally:
        bar.close()
    return summary


def build_model(prompt: str | None, credentials: Credentials, engine: Engine | None = None) -> GroundedSamModel:
    """The server's GroundedSamModel around ``engine`` (default: loaded from the environment)."""
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
    return GroundedSamModel(EngineHolder(engine), settings)


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
                        help="what to segment, e.g. 'cat . dog' (default: PROMPT, else the project's labels)")
    parser.add_argument("--batch-size", type=int, default=8, help="tasks per prediction batch (default 8)")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many new tasks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
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
        model = build_model(args.prompt, credentials, engine)
        api = ProjectApi(client, args.project)
        summary = preannotate(api, model, batch_size=args.batch_size, limit=args.limit,
                              progress=not args.no_progress)
    except KeyboardInterrupt:
        print("preannotate: interrupted before any task was predicted", file=sys.stderr)
        return 130
    except (LabelStudioError, ValueError, OSError, WeightsError, ModelLoadError) as exc:
        # Bad URL or key, unknown project, a config without BrushLabels, a prompt matching no label,
        # missing weights (the message names the files and the download command).
        print(f"preannotate: {exc}", file=sys.stderr)
        return 2
    for task_id, reason in summary.failures:
        print(f"task {task_id} failed: {reason}", file=sys.stderr)
    print(f"preannotate: project {args.project}, model {model.model_version}: {summary.line()}")
    if summary.interrupted:
        return 130
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
