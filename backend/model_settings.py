"""``ModelSettings``: what the Label Studio model reads from the environment (prompt, Label Studio
credentials, fetching, prefetch, the /predict deadline, size limits), checked when it is built."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from .config import env_size
from .errors import BadRequest
from .fetch import FetchSettings
from .ls_api import Credentials
from .project_state import DEFAULT_PROJECT_MEMORY_BYTES
from .prompts import split_typed_prompt

logger = logging.getLogger(__name__)

DEFAULT_PREFETCH_TASKS = 2
# Label Studio waits ML_TIMEOUT_PREDICT (100 s by default) for a /predict and stores nothing when it
# gives up: answer before that, and hand the tasks not reached to a background job.
DEFAULT_PREDICT_DEADLINE_S = 80.0
LABEL_STUDIO_PREDICT_TIMEOUT_S = 100.0  # Label Studio's ML_TIMEOUT_PREDICT default
DEFAULT_MAX_LABEL_CONFIG_BYTES = 1 << 20  # Label Studio's configs are a few KiB; 1000 labels ~60 KiB


@dataclass(frozen=True)
class ModelSettings:
    default_prompt: tuple[str, ...] | None = None  # PROMPT
    credentials: Credentials | None = None  # LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY
    fetch: FetchSettings = FetchSettings()
    engine_wait_s: float = 60.0  # how long a request waits for models still loading
    explain_ui_url: str | None = None  # EXPLAIN_UI_URL: link each predicted region to its explanation
    # PREFETCH_TASKS: in a batch, images of this many next tasks are downloaded and decoded while the
    # models work on the current one (0: one after the other).
    prefetch_tasks: int = DEFAULT_PREFETCH_TASKS
    max_label_config_bytes: int = DEFAULT_MAX_LABEL_CONFIG_BYTES  # MAX_LABEL_CONFIG_BYTES: bigger schemas get 400
    project_memory_bytes: int = DEFAULT_PROJECT_MEMORY_BYTES  # PROJECT_MEMORY_BYTES: per-project state kept
    # PREDICT_DEADLINE_S: a batch /predict answers by then; tasks it did not reach go to a background
    # job (0: no deadline). Keep it below Label Studio's ML_TIMEOUT_PREDICT.
    predict_deadline_s: float = DEFAULT_PREDICT_DEADLINE_S

    def __post_init__(self) -> None:
        if self.prefetch_tasks < 0:
            raise ValueError(f"PREFETCH_TASKS must be >= 0, got {self.prefetch_tasks}")
        if not 0 <= self.predict_deadline_s < math.inf:
            raise ValueError(f"PREDICT_DEADLINE_S must be a finite number of seconds >= 0 (0: no deadline), "
                             f"got {self.predict_deadline_s}")
        if self.predict_deadline_s >= LABEL_STUDIO_PREDICT_TIMEOUT_S:
            logger.warning("PREDICT_DEADLINE_S=%g s is not below Label Studio's default ML_TIMEOUT_PREDICT (%g s): "
                           "unless Label Studio's is raised too, it gives up on a long /predict first and stores "
                           "nothing", self.predict_deadline_s, LABEL_STUDIO_PREDICT_TIMEOUT_S)

    def check_label_config(self, schema: str | None) -> None:
        """BadRequest naming MAX_LABEL_CONFIG_BYTES when ``schema`` is bigger than that."""
        size = len(schema.encode("utf-8", "surrogatepass")) if schema else 0
        if size > self.max_label_config_bytes:
            raise BadRequest(f"the labeling config is {size:,} bytes, over the {self.max_label_config_bytes:,}-byte "
                             "limit (MAX_LABEL_CONFIG_BYTES)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ModelSettings:
        env = os.environ if env is None else env
        prompt = env.get("PROMPT", "").strip()
        try:
            credentials = Credentials.from_env(env)
        except ValueError as exc:
            raise ValueError(f"LABEL_STUDIO_URL: {exc}") from exc
        try:
            prefetch_tasks = int(env.get("PREFETCH_TASKS") or DEFAULT_PREFETCH_TASKS)
        except ValueError as exc:
            raise ValueError(f"PREFETCH_TASKS must be a whole number: {exc}") from exc
        try:
            deadline = float(env.get("PREDICT_DEADLINE_S") or DEFAULT_PREDICT_DEADLINE_S)
        except ValueError as exc:
            raise ValueError(f"PREDICT_DEADLINE_S must be a number of seconds: {exc}") from exc
        return cls(
            default_prompt=tuple(split_typed_prompt(prompt)) if prompt else None,
            credentials=credentials,
            fetch=FetchSettings.from_env(env),
            engine_wait_s=float(env.get("ENGINE_WAIT_S") or 60.0),
            explain_ui_url=(env.get("EXPLAIN_UI_URL") or "").strip().rstrip("/") or None,
            prefetch_tasks=prefetch_tasks,
            max_label_config_bytes=env_size(env, "MAX_LABEL_CONFIG_BYTES", DEFAULT_MAX_LABEL_CONFIG_BYTES),
            project_memory_bytes=env_size(env, "PROJECT_MEMORY_BYTES", DEFAULT_PROJECT_MEMORY_BYTES),
            predict_deadline_s=deadline,
        )

    def explain_link(self, task_id: Any, project: str | None, region: str | None = None) -> str | None:
        """``{EXPLAIN_UI_URL}/?task=<id>&project=<project>&region=<result id>`` (the page opens that
        region's explanation first), or None without a URL or task id.

        Arguments:
            task_id: the Label Studio task id (an int; anything else gives None).
            project: the project id, left out when None.
            region: the result id (``ls_results.region_id``), left out when None.
        Returns:
            The link, percent-encoded, or None.
        """
        if not self.explain_ui_url or task_id is None or isinstance(task_id, bool):
            return None
        query = {"task": task_id, **({"project": project} if project is not None else {}),
                 **({"region": region} if region else {})}
        return f"{self.explain_ui_url}/?{urlencode(query)}"
