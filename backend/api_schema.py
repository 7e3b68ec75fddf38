"""The JSON the backend's /api routes answer with, as one typed definition: the server builds it
(``backend.http_api``, ``JobProgress.to_json``, ``backend.jobs_api``) and the explain UI's client reads
it (``explain_ui.client``), both importing these types. Plain ``typing`` only: no torch, no Flask.
Each thing has one name in every answer (``prompt``, ``predicted_iou``, ``token_scores``, ...).

``parse`` checks a decoded answer against a type here, so a client fails with the field that is
wrong instead of a ``KeyError`` somewhere in a view.
"""

from __future__ import annotations

import types
from typing import Any, TypedDict, TypeVar, Union, cast, get_args, get_origin, get_type_hints, is_typeddict


class TaskErrorJson(TypedDict):
    """Why one task of a job failed (the newest few per job)."""

    task: int  # the Label Studio task id
    state: str  # "failed" (given up) or "pending" (will be retried)
    attempts: int  # tries so far
    error: str


class JobJson(TypedDict):
    """``GET /api/jobs/<id>``: where a background prediction job stands."""

    id: str
    project: str  # the Label Studio project id ("7")
    model_version: str  # every prediction the job writes carries it
    state: str  # "queued", "running", "done", "failed" or "cancelled"
    total: int  # tasks in the job: done + failed + pending + running
    done: int  # predictions in Label Studio
    failed: int  # given up (see errors)
    pending: int
    running: int
    rate: float | None  # tasks/s over the last two minutes; None before the job started
    eta_s: float | None  # seconds left at that rate; None while there is no rate to go by
    error: str | None  # why the whole job stopped (a rejected API key), else None
    errors: list[TaskErrorJson]  # the most recent task errors, newest first
    created: float  # epoch seconds
    updated: float


class JobListJson(TypedDict):
    """``GET /api/jobs``: the most recent jobs, newest first."""

    jobs: list[JobJson]


class CancelJson(TypedDict):
    """``POST /api/jobs/<id>/cancel`` on an active job (a finished one answers 409)."""

    cancelled: bool
    job: JobJson  # the job after cancelling: its state is "cancelled"


# -- segmentations and explanations (backend/http_api.py) ---------------------------------------------
class TokenScoreJson(TypedDict):
    """Grounding DINO's score of one prompt token for a box (sigmoid of its logit)."""

    token: str
    score: float


class SegmentJson(TypedDict):
    """One mask, in every answer that has masks. ``box`` and ``area`` are in the image's own pixels;
    ``mask_png`` is at the answer's ``mask_width`` x ``mask_height``."""

    label: str  # the requested phrase the box matched best
    score: float  # Grounding DINO's box score
    predicted_iou: float  # SAM's estimate of the mask's quality
    box: list[float]  # x0, y0, x1, y1
    area: int  # mask pixels at the image's size
    phrase_scores: dict[str, float]  # per requested phrase
    token_scores: list[TokenScoreJson]  # per prompt token: why this label
    mask_png: str  # base64 1-bit PNG, white = mask, at the answer's mask size


class SegmentationJson(TypedDict):
    """``POST /api/segment``: the masks, small whatever the photo's size (as an explanation's: a view to
    draw, not an annotation; Label Studio's brush RLE is /predict's, and a task's ``prediction``)."""

    model_version: str
    width: int  # the image's size, in pixels
    height: int
    mask_width: int  # the size of the masks sent: at most WORKING_SIDE px on the long side
    mask_height: int
    prompt: list[str]  # the phrases segmented
    segments: list[SegmentJson]


class TaskRunJson(TypedDict):
    """What a task route worked on (added to its segmentation or explanation)."""

    task: int  # Label Studio task id
    project: int | None  # its project
    prompt_source: str  # where the prompt came from: "request", "context", "project", "labels", ...


class TaskSegmentationJson(SegmentationJson, TaskRunJson):
    """``POST /api/tasks/<id>/segment``: a segmentation plus the Label Studio prediction it makes."""

    prediction: dict[str, Any]  # Label Studio's prediction JSON (result, score, model_version)


class TokenGridJson(TypedDict):
    """How SAM laid the photo over its token grid, to lay the maps back over the photo
    (``backend.heatmaps.token_map_to_image``): resized so the long side is ``img_size``, padded
    bottom/right to a square of ``img_size``, cut into tokens."""

    input_height: int  # the photo as SAM saw it, before padding
    input_width: int
    img_size: int  # SAM's square input side


class BlockMapJson(TypedDict):
    """A map from one global-attention block of SAM's image encoder."""

    block: int  # the encoder block's index
    map_png: str  # ``backend.heatmaps.token_map_png``: the token grid, 8-bit grayscale PNG


class MaskMapsJson(TypedDict):
    """Why SAM drew one mask."""

    decoder_png: str  # token grid PNG: where the mask decoder's token looked
    token_look: list[BlockMapJson]  # where the mask's own tokens look, per global block


class ExplainedSegmentJson(SegmentJson):
    """A segment of an explanation (``mask_png`` at the explanation's mask size)."""

    maps: MaskMapsJson | None  # None past the first MASK_MAPS segments


class EncoderJson(TypedDict):
    """SAM's image encoder: the attention each place receives, per global-attention block."""

    available: bool
    reason: str | None  # why there are no blocks (e.g. MobileSAM's TinyViT), else None
    blocks: list[BlockMapJson]  # in block order: the last one is the last global layer


class LegendJson(TypedDict):
    colormap: str  # an OpenCV colormap name ("jet")
    low: str
    high: str
    notes: list[str]  # what each kind of map means


class ExplanationJson(TypedDict):
    """``POST /api/explain``: the segmentation and the attention that made it. Maps are token grids
    (``token_grid`` says how they lie over the photo); the page colours and blends them itself."""

    model_version: str
    width: int  # the image's own size
    height: int
    mask_width: int  # the size of the masks sent: at most WORKING_SIDE px on the long side
    mask_height: int
    cached: bool  # true when the engine already had this image + prompt + thresholds: no model ran
    prompt: list[str]
    token_grid: TokenGridJson
    segments: list[ExplainedSegmentJson]
    encoder: EncoderJson
    legend: LegendJson
    notes: list[str]  # what is missing and why


class TaskExplanationJson(ExplanationJson, TaskRunJson):
    """``POST /api/tasks/<id>/explain``."""


class TaskJson(TypedDict):
    """``GET /api/tasks/<id>``: a Label Studio task as the explain page needs it."""

    id: int
    project: int | None
    image_url: str
    image_key: str  # the data field holding the image
    labels: list[str]  # the project's brush labels
    data: dict[str, Any]  # the task's data, as Label Studio holds it
    predictions: list[dict[str, Any]]  # Label Studio's stored predictions, oldest first


# The states a job can be in (``JobJson.state``; the store's own constants are these); only an
# active job can be cancelled.
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE_JOB_STATES = JOB_STATES[:2]


class SchemaError(ValueError):
    """A JSON value does not have the shape of its type here; ``str()`` names the field."""


_T = TypeVar("_T")


def parse(data: object, schema: type[_T], where: str = "answer") -> _T:
    """``data`` (decoded JSON) as ``schema`` (a TypedDict above) after checking every field's type.

    Arguments:
        data: what ``json.loads`` returned.
        schema: a TypedDict above (``ExplanationJson``, ``JobJson``, ...).
        where: how the message names the value ("answer" gives "answer.jobs[0].done").
    Returns:
        ``data`` itself, typed. Extra keys are allowed (a newer server may add fields).
    Raises:
        SchemaError: a missing key or a value of the wrong type, named by its path.
    """
    _check(data, schema, where)
    return cast(_T, data)


def _check(value: object, hint: Any, where: str) -> None:
    if is_typeddict(hint):
        if not isinstance(value, dict):
            raise SchemaError(f"{where} must be a JSON object, got {_kind(value)}")
        for name, field_hint in get_type_hints(hint).items():
            if name not in value:
                raise SchemaError(f"{where} has no '{name}'")
            _check(value[name], field_hint, f"{where}.{name}")
        return
    if hint is Any:  # a part another system defines (Label Studio's task data)
        return
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(hint):
            try:
                _check(value, option, where)
                return
            except SchemaError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise SchemaError(f"{where} must be a list, got {_kind(value)}")
        (item,) = get_args(hint)
        if item in _NAMES:  # a list of scalars (a box, or a long list): one pass in C speed
            scalars = (int, float) if item is float else (item,)
            if all(type(element) in scalars for element in value):
                return  # (bool's type is not int's: true in a list of integers falls through to the message)
        for i, element in enumerate(value):
            _check(element, item, f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{where} must be a JSON object, got {_kind(value)}")
        _, item = get_args(hint)  # JSON keys are strings
        for key, element in value.items():
            _check(element, item, f"{where}[{key!r}]")
        return
    if hint is type(None):
        if value is not None:
            raise SchemaError(f"{where} must be null, got {_kind(value)}")
        return
    # JSON has one number type: an integral float is not an int, but an int is a fine float.
    accepted: tuple[type, ...] = (int, float) if hint is float else (hint,)
    if isinstance(value, bool) and hint is not bool or not isinstance(value, accepted):
        raise SchemaError(f"{where} must be {_NAMES.get(hint, str(hint))}, got {_kind(value)}")


_NAMES: dict[Any, str] = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


__all__ = ["ACTIVE_JOB_STATES", "JOB_STATES", "BlockMapJson", "CancelJson", "EncoderJson", "ExplainedSegmentJson",
           "ExplanationJson", "JobJson", "JobListJson", "LegendJson", "MaskMapsJson",
           "SchemaError", "SegmentJson", "SegmentationJson", "TaskErrorJson", "TaskExplanationJson", "TaskJson",
           "TaskRunJson", "TaskSegmentationJson", "TokenGridJson", "TokenScoreJson", "parse"]
