"""The Label Studio model: which prompt to use, and segments -> Label Studio results.

Like a label-studio-ml ``LabelStudioMLBase`` subclass, ``GroundedSamModel`` answers /setup,
/predict and /webhook, but it is one long-lived object per process (the engine is big) and keeps
its per-project state in a small locked store instead of on the instance.

Where the prompt comes from, first that applies:
  1. interactive mode: the text of every ``textarea`` result in ``params.context``;
  2. the last prompt this project used (from a context, or a TextArea in an annotation webhook),
     so the prompt a user typed carries over to the next image;
  3. ``prompt`` in the project's ``extra_params`` (sent by Label Studio with /setup);
  4. the PROMPT environment variable;
  5. the config's BrushLabels labels (their ``predicted_values`` aliases where given).
Thresholds: a ``<Number name="box_threshold">``/``"text_threshold"`` value in the context, then the
project's remembered ones, then ``extra_params``, then the engine's (BOX_THRESHOLD/TEXT_THRESHOLD).
Typed prompts are split on '.', ',', ';' and new lines ("cat, dog" -> ["cat", "dog"]). /predict leaves
out the phrases that map to no label before detection (``check_prompt_labels``) and names them in the
response's ``dropped_phrases``; a prompt with no phrase that maps is a 400.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import urlencode

import numpy as np

from .cache import LruCache
from .config import env_size
from .detector import PromptError, parse_prompt
from .fetch import FetchError, FetchSettings, fetch_image
from .images import ImageError
from .label_config import (BRUSH, POLYGON, RECTANGLE, ImageTarget, LabelConfig, LabelControl, TaskDataError,
                           parse_label_config)
from .ls_api import (ClientRegistry, Credentials, LabelStudioClient, LabelStudioError, normalise_url,
                     register_secret)
from .types import Segment

logger = logging.getLogger(__name__)

THRESHOLD_NAMES = ("box_threshold", "text_threshold")
DEFAULT_PREFETCH_TASKS = 2
DEFAULT_MAX_LABEL_CONFIG_BYTES = 1 << 20  # Label Studio's configs are a few KiB; 1000 labels ~60 KiB
DEFAULT_PROJECT_MEMORY_BYTES = 64 << 20
_Item = TypeVar("_Item")
_Loaded = TypeVar("_Loaded")
_PROMPT_SEPARATORS = re.compile(r"[.,;\n\r]+")


class BadRequest(ValueError):
    """The request itself is wrong (HTTP 400); the message says what to fix."""


class TaskError(TaskDataError):
    """One task can't be predicted (e.g. it has no data)."""


class EngineNotReady(RuntimeError):
    """The models aren't loaded (still loading, or weights missing)."""


# -- prompts and thresholds -----------------------------------------------------------------------
def split_typed_prompt(text: str | Sequence[str]) -> list[str]:
    """Phrases of a prompt a person typed: "cat, dog. red car" -> ["cat", "dog", "red car"]."""
    texts = [text] if isinstance(text, str) else [str(t) for t in text]
    return parse_prompt([p for t in texts for p in _PROMPT_SEPARATORS.split(t)])


def parse_threshold(value: Any, name: str) -> float:
    """A threshold from JSON or a form field; BadRequest unless it is a number within [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(f"{name} must be a number within [0, 1], got {value!r}")
    try:
        number = float(value)
    except ValueError as exc:
        raise BadRequest(f"{name} must be a number within [0, 1], got {value!r}") from exc
    if not (0.0 <= number <= 1.0) or math.isnan(number):
        raise BadRequest(f"{name} must be within [0, 1], got {number}")
    return number


@dataclass(frozen=True)
class PromptInput:
    """Prompt and thresholds found in one place (a context, an annotation, extra_params)."""

    phrases: tuple[str, ...] | None = None
    box_threshold: float | None = None
    text_threshold: float | None = None

    @property
    def empty(self) -> bool:
        return self.phrases is None and self.box_threshold is None and self.text_threshold is None


def read_results(results: Any, where: str = "context.result") -> PromptInput:
    """Prompt (every ``textarea`` result's text) and thresholds (``number`` results named
    box_threshold / text_threshold) from a context's or annotation's ``result`` list.

    Arguments:
        results: the ``result`` list (None: nothing given).
        where: how errors name the list ("context.result", "annotation.result").
    Returns:
        A ``PromptInput``; BadRequest names the field when a result has the wrong shape.
    """
    if results is None:
        return PromptInput()
    if not isinstance(results, list):
        raise BadRequest(f"{where} must be a list of results, got {type(results).__name__}")
    texts: list[str] = []
    thresholds: dict[str, float] = {}
    for i, item in enumerate(results):
        if not isinstance(item, Mapping):
            continue
        kind = str(item.get("type", "")).lower()
        value = item.get("value") if isinstance(item.get("value"), Mapping) else {}
        if kind == "textarea":
            text = value.get("text") or []
            text = [text] if isinstance(text, str) else text
            if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
                raise BadRequest(f"{where}[{i}].value.text must be a string or a list of strings, got "
                                 f"{value.get('text')!r:.80}")
            texts.extend(text)
        elif kind == "number" and str(item.get("from_name", "")).lower() in THRESHOLD_NAMES and "number" in value:
            name = str(item["from_name"]).lower()
            thresholds[name] = parse_threshold(value["number"], name)
    phrases = None
    if texts:
        try:
            phrases = tuple(split_typed_prompt(texts))
        except PromptError as exc:
            raise PromptError(f"the TextArea prompt is empty: type what to segment, e.g. 'cat, dog' ({exc})") from exc
    return PromptInput(phrases, thresholds.get("box_threshold"), thresholds.get("text_threshold"))


def read_context(context: Any) -> PromptInput:
    """What an interactive request's ``params.context`` asks for."""
    if context is None:
        return PromptInput()
    if not isinstance(context, Mapping):
        raise BadRequest("params.context must be a JSON object or null")
    return read_results(context.get("result"))


def read_extra_params(extra: Any) -> PromptInput:
    """``prompt``, ``box_threshold``, ``text_threshold`` from a project's ``extra_params``."""
    if extra in (None, "", {}):
        return PromptInput()
    if isinstance(extra, str):
        import json

        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"extra_params must be a JSON object: {exc}") from exc
    if not isinstance(extra, Mapping):
        raise BadRequest("extra_params must be a JSON object")
    unknown = sorted(set(extra) - {"prompt", *THRESHOLD_NAMES})
    if unknown:
        logger.info("ignoring unknown extra_params %s (known: prompt, box_threshold, text_threshold)", unknown)
    phrases = None
    if extra.get("prompt") not in (None, ""):
        prompt = extra["prompt"]
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list)
                                                   and not all(isinstance(p, str) for p in prompt)):
            raise BadRequest("extra_params.prompt must be a string like 'cat . dog' or a list of phrases")
        phrases = tuple(split_typed_prompt(prompt))
    return PromptInput(
        phrases,
        parse_threshold(extra["box_threshold"], "box_threshold") if extra.get("box_threshold") is not None else None,
        parse_threshold(extra["text_threshold"], "text_threshold") if extra.get("text_threshold") is not None else None,
    )


@dataclass(frozen=True)
class PromptPlan:
    """The prompt and thresholds one /predict request runs with."""

    phrases: tuple[str, ...]
    source: str  # context | project | extra_params | env | labels
    box_threshold: float | None = None
    text_threshold: float | None = None
    # Typed phrases no label matches, left out before detection: their boxes would take the
    # detection cap and then be dropped, leaving nothing for the phrases that do match.
    dropped: tuple[str, ...] = ()


def plan_prompt(config: LabelConfig, context: PromptInput, remembered: PromptInput = PromptInput(),
                extra: PromptInput = PromptInput(), env_prompt: Sequence[str] | None = None) -> PromptPlan:
    """Pick the prompt and thresholds by the precedence in the module docstring."""
    sources = (("context", context), ("project", remembered), ("extra_params", extra))
    phrases, source = None, "labels"
    for name, given in sources:
        if given.phrases:
            phrases, source = given.phrases, name
            break
    if phrases is None and env_prompt:
        phrases, source = tuple(env_prompt), "env"
    if phrases is None:
        phrases = tuple(config.default_phrases())

    def first(attr: str) -> float | None:
        return next((getattr(g, attr) for _, g in sources if getattr(g, attr) is not None), None)

    return PromptPlan(phrases, source, first("box_threshold"), first("text_threshold"))


def _maps_to_label(config: LabelConfig, phrase: str) -> bool:
    return any(target.labels_for(phrase) for target in config.targets)


def _maps_to_labels(config: LabelConfig, phrases: Sequence[str]) -> bool:
    return any(_maps_to_label(config, phrase) for phrase in phrases)


def check_prompt_labels(config: LabelConfig, plan: PromptPlan) -> PromptPlan:
    """The plan without the phrases that map to no label (named in ``dropped``), so the detection cap
    goes to phrases whose masks are kept; BadRequest when no phrase maps to a label.

    In a config with a single BrushLabels label every phrase maps (to that label): nothing is dropped.
    """
    kept = tuple(phrase for phrase in plan.phrases if _maps_to_label(config, phrase))
    if kept:
        dropped = tuple(phrase for phrase in plan.phrases if phrase not in kept)
        return replace(plan, phrases=kept, dropped=plan.dropped + dropped) if dropped else plan
    raise BadRequest(
        f"unknown labels: the prompt {list(plan.phrases)} (from {plan.source}) matches none of the BrushLabels "
        f"labels ({config.describe_labels()}); use label names, or list synonyms in a label's predicted_values")


# -- segments -> Label Studio results ---------------------------------------------------------------
def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def _base(control: LabelControl, width: int, height: int, score: float) -> dict[str, Any]:
    return {
        "id": _region_id(),
        "from_name": control.name,
        "to_name": control.to_name,
        "type": control.kind,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "score": score,
        "readonly": False,
    }


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a boolean HxW mask (label-studio-sdk's encoder)."""
    from label_studio_sdk.converter import brush

    return brush.mask2rle(np.ascontiguousarray(mask, dtype=np.uint8) * 255)


def brush_result(control: LabelControl, label: str, segment: Segment, width: int, height: int) -> dict[str, Any]:
    result = _base(control, width, height, round(float(segment.score), 4))
    result["value"] = {"format": "rle", "rle": mask_to_rle(segment.mask), "brushlabels": [label]}
    return result


def _pct(value: float, size: int) -> float:
    return float(min(100.0, max(0.0, value / size * 100.0)))


def rectangle_result(control: LabelControl, label: str, segment: Segment, width: int,
                     height: int) -> dict[str, Any]:
    x0, y0, x1, y1 = segment.box
    result = _base(control, width, height, round(float(segment.score), 4))
    x, y = _pct(x0, width), _pct(y0, height)
    result["value"] = {
        "x": x, "y": y, "width": _pct(x1, width) - x, "height": _pct(y1, height) - y,
        "rotation": 0, "rectanglelabels": [label],
    }
    return result


def mask_polygon(mask: np.ndarray, tolerance: float = 0.003) -> np.ndarray | None:
    """The mask's largest outer contour, simplified (Douglas-Peucker at ``tolerance`` x perimeter),
    as an Nx2 array of pixel (x, y); None when the mask has no polygon of 3+ points."""
    import cv2

    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    epsilon = max(1.0, tolerance * cv2.arcLength(largest, True))
    points = cv2.approxPolyDP(largest, epsilon, True).reshape(-1, 2)
    return points if len(points) >= 3 else None


def polygon_result(control: LabelControl, label: str, segment: Segment, width: int,
                   height: int) -> dict[str, Any] | None:
    points = mask_polygon(segment.mask)
    if points is None:
        return None
    result = _base(control, width, height, round(float(segment.score), 4))
    result["value"] = {
        "points": [[_pct(float(x), width), _pct(float(y), height)] for x, y in points],
        "closed": True,
        "polygonlabels": [label],
    }
    return result


_BUILDERS: dict[str, Callable[..., dict[str, Any] | None]] = {
    BRUSH: brush_result, RECTANGLE: rectangle_result, POLYGON: polygon_result,
}


def segments_to_results(segments: Iterable[Segment], target: ImageTarget, width: int,
                        height: int) -> tuple[list[dict[str, Any]], list[float]]:
    """Results for every label control on ``target``, and the score of each segment that made one.

    A segment whose phrase maps to no label of a control is left out of that control (logged).
    """
    results: list[dict[str, Any]] = []
    scores: list[float] = []
    skipped: set[tuple[str, str]] = set()
    for segment in segments:
        if segment.area == 0:  # SAM found nothing inside the box: an empty brush helps nobody
            logger.debug("skipping %r: empty mask", segment.label)
            continue
        used = False
        labels = target.labels_for(segment.label)
        for control in target.controls:
            label = labels.get(control.name)
            if label is None:
                skipped.add((segment.label, control.name))
                continue
            result = _BUILDERS[control.kind](control, label, segment, width, height)
            if result is not None:
                results.append(result)
                used = True
        if used:
            scores.append(float(segment.score))
    for phrase, control_name in sorted(skipped):
        logger.info("phrase %r matches no label of %r; skipped (name a label, or add it to a label's "
                    "predicted_values)", phrase, control_name)
    return results, scores


def prediction(results: list[dict[str, Any]], scores: Sequence[float], model_version: str) -> dict[str, Any]:
    """One /predict entry; the task score is the mean region score (0 when nothing was found)."""
    return {
        "result": results,
        "score": round(float(np.mean(scores)), 4) if scores else 0.0,
        "model_version": model_version,
    }


# -- per-project memory -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectState:
    remembered: PromptInput = PromptInput()  # last prompt/thresholds a person used
    extra: PromptInput = PromptInput()  # from /setup extra_params
    credentials: Credentials | None = None  # hostname + access_token from /setup
    label_config: str | None = None  # schema from /setup
    updated: float = field(default_factory=time.time)


def project_key(project: Any) -> str | None:
    """Label Studio's project uid "<id>.<created timestamp>" (or a bare id) -> "<id>"."""
    if project is None or isinstance(project, bool):
        return None
    if isinstance(project, Mapping):
        project = project.get("id")
        if project is None:
            return None
    if not isinstance(project, (str, int)):
        raise BadRequest(f"project must be a string like '1.1700000000' or an integer id, got {type(project).__name__}")
    key = str(project).strip().split(".", 1)[0]
    return key or None


class ProjectMemory:
    """Thread-safe store of ``ProjectState`` per project, least recently used out first, bounded in
    projects and in bytes (a schema can be up to MAX_LABEL_CONFIG_BYTES)."""

    def __init__(self, capacity: int = 1024, max_bytes: int | None = DEFAULT_PROJECT_MEMORY_BYTES) -> None:
        self._states: LruCache[ProjectState] = LruCache(capacity, max_bytes)
        self._lock = threading.Lock()  # makes update's read-modify-write atomic

    def get(self, key: str | None) -> ProjectState:
        if key is None:
            return ProjectState()
        return self._states.get(key) or ProjectState()

    def update(self, key: str | None, **changes: Any) -> ProjectState:
        if key is None:
            return ProjectState()
        with self._lock:
            state = replace(self._states.get(key) or ProjectState(), updated=time.time(), **changes)
            self._states.put(key, state)
            return state

    def forget(self, key: str | None) -> None:
        self._states.pop(key)

    def __len__(self) -> int:
        return len(self._states)


# -- the engine of this process ---------------------------------------------------------------------
def import_model_code() -> None:
    """Import every module the engine loads lazily (segment_anything, groundingdino, MobileSAM)."""
    import importlib

    from . import engine, models  # noqa: F401 - imported for their side effect on sys.modules

    for name in ("segment_anything", "segment_anything.build_sam", "groundingdino.models",
                 "groundingdino.util.slconfig", "groundingdino.util.misc", "groundingdino.datasets.transforms",
                 "groundingdino.models.GroundingDINO.bertwarper",
                 "groundingdino.models.GroundingDINO.backbone.swin_transformer", "mobile_sam.build_sam",
                 # /setup parses the schema with it: a first import (~1 s, more on a busy machine) must
                 # not eat Label Studio's 3 s /setup timeout.
                 "label_studio_sdk.label_interface", "label_studio_sdk.converter.brush"):
        try:
            importlib.import_module(name)
        except ImportError:  # MobileSAM is optional; a missing package is reported by the loader
            pass


class EngineHolder:
    """Loads the engine once per process, in a background thread, so /health and /setup answer
    at once while the weights load. A failed load (weights missing) is retried after RETRY_S, so
    downloading the weights doesn't need a restart."""

    RETRY_S = 30.0

    def __init__(self, engine: Any | None = None, config_loader: Callable[[], Any] | None = None) -> None:
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._engine = engine
        self._config = engine.config if engine is not None else None
        self._model_version: str | None = engine.model_version if engine is not None else None
        self._error: str | None = None
        self._problems: list[str] = []
        self._failed_at = 0.0
        self._loading = False
        self._config_loader = config_loader
        if engine is not None:
            self._loaded.set()

    def start(self) -> None:
        """Begin loading in the background (no-op when loaded or already loading)."""
        with self._lock:
            if self._engine is not None or self._loading:
                return
            self._loading, self._error = True, None
            self._loaded.clear()
        # Import the model code here, not in the loader thread: two threads importing
        # segment_anything / groundingdino at once can hit Python's import-lock deadlock
        # (_DeadlockError), e.g. the loader against a request thread or the Flask app's own imports.
        import_model_code()
        threading.Thread(target=self._load, name="engine-loader", daemon=True).start()

    def _load(self) -> None:
        from .config import EngineConfig
        from .engine import Engine, model_version

        engine, error, config, version, problems = None, None, None, None, []
        try:
            config = (self._config_loader or EngineConfig.from_env)()
            version = model_version(config)
            problems, error = _weights_problems(config)
            if not problems:
                started = time.time()
                engine = Engine(config)
                logger.info("models loaded in %.1f s: %s", time.time() - started, engine.describe())
        except Exception as exc:  # missing weights, bad config, broken checkpoint: report, keep serving
            logger.exception("loading the models failed")
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._engine, self._loading = engine, False
            self._problems = problems if engine is None else []
            self._config = config or self._config
            self._model_version = version or self._model_version
            self._error = error
            self._failed_at = time.time() if error else 0.0
            self._loaded.set()
        if error:
            logger.error("models not ready: %s", error)

    def _maybe_retry(self) -> None:
        with self._lock:
            retry = self._error is not None and not self._loading and time.time() - self._failed_at > self.RETRY_S
        if retry:
            self.start()

    def status(self) -> tuple[str, str | None]:
        """("UP", None), ("loading", None) or ("not ready", reason)."""
        self._maybe_retry()
        with self._lock:
            if self._engine is not None:
                return "UP", None
            if self._error is not None:
                return "not ready", self._error
            return "loading", None

    def get(self, timeout: float | None = None) -> Any:
        """The engine, waiting up to ``timeout`` s for a load in progress; raises ``EngineNotReady``."""
        self._maybe_retry()
        if self._engine is None and not self._loading and self._error is None:
            self.start()
        self._loaded.wait(timeout)
        with self._lock:
            if self._engine is not None:
                return self._engine
            if self._error is not None:
                raise EngineNotReady(self._error)
        raise EngineNotReady("the models are still loading; try again in a moment")

    @property
    def engine(self) -> Any | None:
        return self._engine

    @property
    def problems(self) -> list[str]:
        """backend.weights' list of missing/corrupt files when the load failed for want of them."""
        with self._lock:
            return list(self._problems)

    @property
    def config(self) -> Any | None:
        return self._config

    @property
    def model_version(self) -> str | None:
        """Known as soon as the config is read (before the models load), so /setup never waits."""
        if self._model_version is None and self._config is None:
            self._read_config_only()
        return self._model_version

    def _read_config_only(self) -> None:
        from .config import EngineConfig
        from .engine import model_version

        try:
            config = (self._config_loader or EngineConfig.from_env)()
            version = model_version(config)
        except Exception as exc:
            logger.error("can't read the engine config: %s", exc)
            return
        with self._lock:
            self._config = self._config or config
            self._model_version = self._model_version or version


def _weights_problems(config: Any) -> tuple[list[str], str | None]:
    """backend.weights' problem list for ``config`` and its full message (with the download command)."""
    from .weights import check_ready, ensure_ready

    problems = list(check_ready(config))
    if not problems:
        return [], None
    try:
        ensure_ready(config)
    except Exception as exc:
        return problems, str(exc)
    return problems, "model weights are not ready: " + "; ".join(problems)


# -- the model ------------------------------------------------------------------------------------
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

    def __post_init__(self) -> None:
        if self.prefetch_tasks < 0:
            raise ValueError(f"PREFETCH_TASKS must be >= 0, got {self.prefetch_tasks}")

    def check_label_config(self, schema: str | None) -> None:
        """BadRequest naming MAX_LABEL_CONFIG_BYTES when ``schema`` is bigger than that."""
        size = len(schema.encode("utf-8", "surrogatepass")) if schema else 0
        if size > self.max_label_config_bytes:
            raise BadRequest(f"the labeling config is {size:,} bytes, over the {self.max_label_config_bytes:,}-byte "
                             "limit (MAX_LABEL_CONFIG_BYTES)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ModelSettings":
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
        return cls(
            default_prompt=tuple(split_typed_prompt(prompt)) if prompt else None,
            credentials=credentials,
            fetch=FetchSettings.from_env(env),
            engine_wait_s=float(env.get("ENGINE_WAIT_S") or 60.0),
            explain_ui_url=(env.get("EXPLAIN_UI_URL") or "").strip().rstrip("/") or None,
            prefetch_tasks=prefetch_tasks,
            max_label_config_bytes=env_size(env, "MAX_LABEL_CONFIG_BYTES", DEFAULT_MAX_LABEL_CONFIG_BYTES),
            project_memory_bytes=env_size(env, "PROJECT_MEMORY_BYTES", DEFAULT_PROJECT_MEMORY_BYTES),
        )

    def explain_link(self, task_id: Any, project: str | None) -> str | None:
        """``{EXPLAIN_UI_URL}/?task=<id>&project=<project>``, or None without a URL or task id."""
        if not self.explain_ui_url or task_id is None or isinstance(task_id, bool):
            return None
        query = {"task": task_id, **({"project": project} if project is not None else {})}
        return f"{self.explain_ui_url}/?{urlencode(query)}"


@dataclass
class PredictOutcome:
    results: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    plan: PromptPlan

    @property
    def dropped_phrases(self) -> list[str]:
        """Phrases of the prompt that match no label and were not detected (see ``check_prompt_labels``)."""
        return list(self.plan.dropped)


def failed_entry(message: str, version: str) -> dict[str, Any]:
    """The /predict entry of a task that failed: no ``result``, so Label Studio stores nothing (it skips
    entries without one, keeping the others' positions) and the next "Retrieve predictions" asks again;
    ``error`` says why to whoever reads the response (Label Studio ignores keys it doesn't know)."""
    return {"error": message, "model_version": version}


class PredictionStats:
    """Tasks predicted since the process started, for /metrics and /health; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self._ok = 0
        self._empty = 0
        self._failed: dict[str, int] = {}

    def record_ok(self, regions: int) -> None:
        with self._lock:
            self._ok += 1
            self._empty += regions == 0

    def record_failure(self, exc: BaseException) -> None:
        with self._lock:
            reason = type(exc).__name__
            self._failed[reason] = self._failed.get(reason, 0) + 1

    @property
    def failed_tasks(self) -> int:
        with self._lock:
            return sum(self._failed.values())

    def snapshot(self) -> dict[str, Any]:
        """``{"since": <unix time>, "tasks_predicted": n, "tasks_empty": n, "tasks_failed": n,
        "failed_by_reason": {"FetchError": n, ...}}``; empty predictions are counted as predicted."""
        with self._lock:
            return {"since": round(self.started, 3), "tasks_predicted": self._ok, "tasks_empty": self._empty,
                    "tasks_failed": sum(self._failed.values()), "failed_by_reason": dict(sorted(self._failed.items()))}


class GroundedSamModel:
    """Grounding DINO + SAM as a Label Studio ML backend; one instance serves every project."""

    def __init__(self, engine: EngineHolder, settings: ModelSettings | None = None,
                 memory: ProjectMemory | None = None, clients: ClientRegistry | None = None) -> None:
        self.engine = engine
        self.settings = settings or ModelSettings()
        self.memory = memory or ProjectMemory(max_bytes=self.settings.project_memory_bytes)
        self.clients = clients or ClientRegistry(timeout=self.settings.fetch.timeout)
        self.stats = PredictionStats()

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
            parse_label_config(schema)  # fail at connection time, not at the first prediction
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
        if plan.source == "project" and not _maps_to_labels(config, plan.phrases):
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
        if plan.dropped:
            logger.warning("project %s: prompt phrases %s match no label (%s); not detected", key,
                           list(plan.dropped), config.describe_labels())
        engine = self.engine.get(timeout=self.settings.engine_wait_s)
        if given.phrases or given.box_threshold is not None or given.text_threshold is not None:
            self._remember(key, given)
        client = self.client_for(key)
        version = self.model_version
        logger.info("predict project=%s tasks=%d prompt=%s (from %s)", key, len(tasks), list(plan.phrases),
                    plan.source)
        results, errors = [], []
        loads = read_ahead(tasks, lambda task: self.load_task(engine, task, config, client),
                           self.settings.prefetch_tasks)
        for task, loaded in zip(tasks, loads):
            try:
                entry = self.predict_task(engine, loaded.result(), plan, version)
                link = self.settings.explain_link(task.get("id"), key)
                if link:  # Label Studio shows a region's meta text in the region panel
                    for result in entry["result"]:
                        result["meta"] = {"text": [f"Why this mask: {link}"]}
                results.append(entry)
                self.stats.record_ok(len(entry["result"]))
            except Exception as exc:
                self.stats.record_failure(exc)
                if context is not None and len(tasks) == 1:
                    raise
                task_id = task.get("id") if isinstance(task, Mapping) else None
                if isinstance(exc, (FetchError, ImageError, LabelStudioError, TaskDataError)):
                    message = _message(exc)
                    logger.warning("task %s: no prediction (Label Studio will ask again): %s", task_id, message)
                else:  # a bug or a model failure: keep the traceback, and still answer for the others
                    message = f"internal error ({type(exc).__name__}); see the server log"
                    logger.exception("task %s: no prediction (Label Studio will ask again)", task_id)
                errors.append({"task": task_id, "error": message})
                results.append(failed_entry(message, version))
        return PredictOutcome(results, errors, plan)

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


def read_ahead(items: Sequence[_Item], load: Callable[[_Item], _Loaded], ahead: int) -> Iterator[Future[_Loaded]]:
    """``load(item)`` of every item as a Future, in order, with up to ``ahead`` loads running on
    threads ahead of the consumer: downloads overlap the model's work, and at most ``ahead + 1``
    loaded items are held at once. A load's exception is raised by its Future's ``result()``."""
    if ahead < 1 or len(items) < 2:
        for item in items:
            done: Future[_Loaded] = Future()
            try:
                done.set_result(load(item))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, as a pool would
                done.set_exception(exc)
            yield done
        return
    pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="prefetch")
    try:
        pending = deque(pool.submit(load, item) for item in items[: ahead + 1])
        for item in items[ahead + 1:]:
            yield pending.popleft()
            pending.append(pool.submit(load, item))
        while pending:
            yield pending.popleft()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
