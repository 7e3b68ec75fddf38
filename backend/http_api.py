"""JSON API for the explain UI, under /api. Routes only parse, validate and serialise; the work is
the engine's and ``backend.ls_model``'s.

    POST /api/segment                 image (multipart file, or JSON data URL / base64) + prompt
    GET  /api/tasks/<id>              a Label Studio task: image URL, data, stored predictions
    GET  /api/tasks/<id>/image        the task's image bytes (fetched with the backend's LS key)
    POST /api/tasks/<id>/segment      segment a task's image (project labels, or a given prompt)
    POST /api/explain                 like /api/segment, plus attention maps (``explanation_json``)
    POST /api/tasks/<id>/explain      like /api/tasks/<id>/segment, plus attention maps

Every answer is one of ``backend.api_schema``'s types, the ones the explain UI's client parses.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify, request
from PIL import Image

from ._wsgi import current_model, field_of, json_body, read_body
from .api_schema import (
    BlockMapJson,
    EncoderJson,
    ExplainedSegmentJson,
    ExplanationJson,
    MaskMapsJson,
    SegmentationJson,
    SegmentJson,
    TaskExplanationJson,
    TaskJson,
    TaskRunJson,
    TaskSegmentationJson,
    TokenGridJson,
    TokenScoreJson,
)
from .detector import parse_prompt
from .errors import BadRequest, NotFound
from .fetch import ImageTooLargeError, decode_base64, decode_data_url, fetch_image
from .heatmaps import LEGEND, MASK_MAPS, WORKING_SIDE, token_map_png
from .images import working_size
from .label_config import LabelConfig, parse_label_config
from .ls_api import LabelStudioClient, LabelStudioError, LabelStudioNotFound
from .ls_results import prediction, segments_to_results
from .project_state import project_key
from .prompts import PromptInput, PromptPlan, parse_threshold, split_typed_prompt
from .types import Explanation, MaskExplanation, Segment

api = Blueprint("api", __name__, url_prefix="/api")


# -- parsing ----------------------------------------------------------------------------------------
def segment_request() -> tuple[bytes | None, dict[str, Any]]:
    """(image bytes or None, the other fields) from a multipart form or a JSON body."""
    max_bytes = current_model().settings.fetch.max_bytes
    if request.files or request.form:
        fields: dict[str, Any] = dict(request.form)
        upload = request.files.get("image")
        if upload is not None:
            image = upload.read(max_bytes + 1)
            if len(image) > max_bytes:
                raise ImageTooLargeError(f"image is over {max_bytes:,} bytes (MAX_IMAGE_BYTES)")
            return image, fields
        # else a form field "image" holding a data URL or base64, as in JSON
    else:
        fields = json_body() if read_body() else {}
    encoded = field_of(fields, "image", str)
    if encoded is None:
        return None, fields
    if encoded.startswith("data:"):
        return decode_data_url(encoded, max_bytes), fields
    if len(encoded) * 3 // 4 > max_bytes:
        raise ImageTooLargeError(f"image is over {max_bytes:,} bytes (MAX_IMAGE_BYTES)")
    return decode_base64(encoded), fields


def prompt_input(fields: Mapping[str, Any], required: bool) -> PromptInput:
    """prompt ("cat . dog", "cat, dog" or a list) and thresholds from request fields."""
    prompt = fields.get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip() and not required):
        if required:
            raise BadRequest("'prompt' is required: what to segment, e.g. 'cat . dog'")
        phrases = None
    elif isinstance(prompt, (str, list)):
        phrases = tuple(split_typed_prompt(prompt))
    else:
        raise BadRequest(f"'prompt' must be a string or a list of phrases, got {type(prompt).__name__}")
    thresholds = {name: parse_threshold(fields[name], name) for name in ("box_threshold", "text_threshold")
                  if fields.get(name) not in (None, "")}
    return PromptInput(phrases, thresholds.get("box_threshold"), thresholds.get("text_threshold"))


# -- serialising --------------------------------------------------------------------------------------
def mask_png(mask: np.ndarray) -> str:
    """Base64 PNG of a mask: white where the mask is set, black elsewhere (1 bit per pixel)."""
    buffer = io.BytesIO()
    # Fast deflate: ``optimize`` took ~0.2 s a 1024 px mask (most of a cached explanation's time) to
    # save ~10% of its bytes.
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _segment_fields(segment: Segment, mask: np.ndarray) -> SegmentJson:
    return SegmentJson(
        label=segment.label,
        score=float(segment.score),
        predicted_iou=float(segment.predicted_iou),
        box=[float(v) for v in segment.box],
        area=segment.area,
        phrase_scores={k: float(v) for k, v in segment.phrase_scores.items()},
        token_scores=[TokenScoreJson(token=token, score=float(score)) for token, score in segment.token_scores],
        mask_png=mask_png(mask),
    )


def segmentation_json(segments: list[Segment], phrases: tuple[str, ...], width: int, height: int,
                      version: str) -> SegmentationJson:
    """The /api/*segment response: each mask a PNG at ``mask_width`` x ``mask_height`` (at most
    WORKING_SIDE px on the long side, as an explanation's), never made at the photo's own size: a
    12-megapixel photo's masks were ~3 MB of brush RLE each, which the page never read."""
    mask_height, mask_width = working_size((height, width), WORKING_SIDE)
    return SegmentationJson(model_version=version, width=int(width), height=int(height), mask_width=mask_width,
                            mask_height=mask_height, prompt=list(phrases),
                            segments=[SegmentJson(**_segment_fields(s, s.mask_source.resized(mask_height, mask_width)))
                                      for s in segments])


def required_image_request() -> tuple[bytes, dict[str, Any]]:
    """``segment_request`` for routes that need an uploaded image."""
    image, fields = segment_request()
    if image is None:
        raise BadRequest("'image' is required: a multipart file field 'image', or JSON {\"image\": <data URL "
                         "or base64>}")
    return image, fields


# -- image segmentation -------------------------------------------------------------------------------
@api.post("/segment")
def segment() -> Response:
    image, fields = required_image_request()
    given = prompt_input(fields, required=True)
    model = current_model()
    engine = model.engine.get(timeout=model.settings.engine_wait_s)
    rgb = engine.load_image(image)
    segments = engine.segment(rgb, list(given.phrases or ()), given.box_threshold, given.text_threshold)
    height, width = rgb.shape[:2]
    return jsonify(segmentation_json(segments, given.phrases or (), width, height, engine.model_version))


# -- Label Studio tasks -------------------------------------------------------------------------------
def _ls_client(project: str | None = None) -> LabelStudioClient:
    client = current_model().client_for(project)
    if client is None:
        raise LabelStudioError("no Label Studio is known: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                               "(or connect this backend to a project first)")
    return client


def _project_id(value: Any) -> str | None:
    """A project id ("3", 3, or Label Studio's uid "3.1700000000") -> "3"; BadRequest otherwise."""
    key = project_key(value)
    if key is not None and not (key.isascii() and key.isdigit()):
        raise BadRequest(f"project must be an id like 3 (or a uid like '3.1700000000'), got {value!r}")
    return key


def _task_and_config(task_id: int) -> tuple[dict[str, Any], LabelConfig, LabelStudioClient]:
    model = current_model()
    # ?project=<id> (the explain UI passes it) picks that project's /setup connection to Label Studio.
    hint = _project_id(request.args.get("project") or None)
    client = _ls_client(hint)
    try:
        task = client.get_task(task_id)
    except LabelStudioNotFound:  # the id typed or linked is wrong: a 404 of ours, not Label Studio failing (502)
        raise NotFound(f"Label Studio at {client.url} has no task {task_id} (or its API key can't see it): "
                       "check the Task ID") from None
    try:
        project = _project_id(task.get("project")) or hint
    except BadRequest as exc:  # Label Studio's answer, not the request, is wrong
        raise LabelStudioError(f"Label Studio sent task {task_id} with a malformed project: {exc}") from None
    schema = model.memory.get(project).label_config
    if not schema and project is not None:
        try:
            schema = client.get_project(int(project)).get("label_config")
        except LabelStudioNotFound:
            raise NotFound(f"Label Studio at {client.url} has no project {project} (or its API key can't see it): "
                           "check the Project") from None
    if not schema:
        raise LabelStudioError(f"can't find the labeling config of task {task_id}'s project")
    return task, parse_label_config(schema), client


def _task_image(task: Mapping[str, Any], config: LabelConfig, client: LabelStudioClient) -> tuple[str, bytes]:
    target = config.targets[0]
    url = target.image_url(task.get("data") or {})
    data = fetch_image(url, client, current_model().settings.fetch, task.get("id"))
    return url, data


@api.get("/tasks/<int:task_id>")
def get_task(task_id: int) -> Response:
    task, config, _ = _task_and_config(task_id)
    target = config.targets[0]
    data = task.get("data") or {}
    return jsonify(TaskJson(
        id=task_id,
        project=_task_project(task),
        image_url=target.image_url(data),
        image_key=target.value.lstrip("$"),
        labels=list(config.brush_labels),
        data=data,
        predictions=[p for p in task.get("predictions") or [] if isinstance(p, dict)],
    ))


def _task_project(task: Mapping[str, Any]) -> int | None:
    """The task's project id as a number (``_task_and_config`` already refused a malformed one)."""
    key = _project_id(task.get("project"))
    return None if key is None else int(key)


@api.get("/tasks/<int:task_id>/image")
def get_task_image(task_id: int) -> Response:
    task, config, client = _task_and_config(task_id)
    _, data = _task_image(task, config, client)
    mimetype = Image.MIME.get(_image_format(data), "application/octet-stream")
    return Response(data, mimetype=mimetype)


def _image_format(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format or ""
    except Exception:
        return ""


@dataclass
class TaskRun:
    """What a task route works on: the task, its config, the prompt, the engine and the image."""

    task: dict[str, Any]
    config: LabelConfig
    plan: PromptPlan
    engine: Any
    rgb: np.ndarray
    fields: dict[str, Any]

    def describe(self, task_id: int) -> TaskRunJson:
        return TaskRunJson(task=task_id, project=_task_project(self.task), prompt_source=self.plan.source)


def _task_run(task_id: int) -> TaskRun:
    fields = json_body() if read_body() else {}
    given = prompt_input(fields, required=False)
    model = current_model()
    task, config, client = _task_and_config(task_id)
    # The given prompt, else what a batch prediction of the project uses (its remembered prompt,
    # extra_params, PROMPT, or its labels), so explaining a predicted task hits the engine's cache.
    plan = model.plan_for(_project_id(task.get("project")) or _project_id(request.args.get("project") or None),
                          config, given)
    engine = model.engine.get(timeout=model.settings.engine_wait_s)
    _, data = _task_image(task, config, client)
    return TaskRun(task, config, plan, engine, engine.load_image(data), fields)


@api.post("/tasks/<int:task_id>/segment")
def segment_task(task_id: int) -> Response:
    run = _task_run(task_id)
    height, width = run.rgb.shape[:2]
    segments = run.engine.segment(run.rgb, list(run.plan.phrases), run.plan.box_threshold, run.plan.text_threshold)
    results, scores = segments_to_results(segments, run.config.targets[0], width, height)
    version = run.engine.model_version
    body = segmentation_json(segments, run.plan.phrases, width, height, version)
    return jsonify(TaskSegmentationJson(**body, **run.describe(task_id),
                                        prediction=prediction(results, scores, version)))


# -- explanations -------------------------------------------------------------------------------------
def explained_segment_json(segment: Segment, mask: MaskExplanation | None, explanation: Explanation,
                           size: tuple[int, int]) -> ExplainedSegmentJson:
    """A segment with its mask as a PNG at ``size`` (H, W) and, when ``mask`` is given, its maps."""
    maps = None
    if mask is not None and mask.decoder_map is not None:
        maps = MaskMapsJson(decoder_png=_map_png(mask.decoder_map, explanation),
                            token_look=[BlockMapJson(block=int(block), map_png=_map_png(look, explanation))
                                        for block, look in sorted(mask.token_look.items())])
    return ExplainedSegmentJson(**_segment_fields(segment, segment.mask_source.resized(*size)), maps=maps)


def _map_png(token_map: np.ndarray, explanation: Explanation) -> str:
    return token_map_png(token_map, explanation.input_size, explanation.img_size)


def explanation_json(explanation: Explanation, phrases: tuple[str, ...], cached: bool) -> ExplanationJson:
    """The /api/*explain response, small whatever the photo's size: segments with masks at
    ``mask_width`` x ``mask_height`` (at most WORKING_SIDE px on the long side), and every attention map
    once, as its token grid (a few KB; ``token_grid`` says how it lies over the photo), for the
    first MASK_MAPS masks. The page colours the maps and lays them over the photo it holds
    (``backend.heatmaps.render_explanation``). ``width`` x ``height`` is the image's own size
    (``area`` and ``box`` are in its pixels)."""
    height, width = explanation.original_size
    mask_height, mask_width = working_size((height, width), WORKING_SIDE)
    blocks = sorted(explanation.encoder_received)
    reason = None
    if not blocks:
        reason = "; ".join(explanation.notes) or "the image encoder's attention was not captured"
    notes = list(explanation.notes)
    if len(explanation.segments) > MASK_MAPS:
        notes.append(f"maps are drawn for the first {MASK_MAPS} of {len(explanation.segments)} masks")
    return ExplanationJson(
        model_version=explanation.model_version,
        width=int(width),
        height=int(height),
        mask_width=mask_width,
        mask_height=mask_height,
        cached=bool(cached),
        prompt=list(phrases),
        token_grid=TokenGridJson(input_height=int(explanation.input_size[0]),
                                 input_width=int(explanation.input_size[1]), img_size=int(explanation.img_size)),
        segments=[explained_segment_json(s, m if i < MASK_MAPS else None, explanation, (mask_height, mask_width))
                  for i, (s, m) in enumerate(zip(explanation.segments, explanation.masks, strict=True))],
        encoder=EncoderJson(available=bool(blocks), reason=reason,
                            blocks=[BlockMapJson(block=int(block), map_png=_map_png(token_map, explanation))
                                    for block, token_map in sorted(explanation.encoder_received.items())]),
        legend=LEGEND,
        notes=notes,
    )


def explain_image(engine: Any, rgb: np.ndarray, phrases: tuple[str, ...], box_threshold: float | None,
                  text_threshold: float | None) -> ExplanationJson:
    """Explain (from the engine's cache when this image + prompt + thresholds ran before)."""
    explanation, cached = engine.explain_and_tell(rgb, list(phrases), box_threshold, text_threshold)
    return explanation_json(explanation, tuple(parse_prompt(list(phrases))), cached)


@api.post("/explain")
def explain() -> Response:
    image, fields = required_image_request()
    given = prompt_input(fields, required=True)
    model = current_model()
    engine = model.engine.get(timeout=model.settings.engine_wait_s)
    rgb = engine.load_image(image)
    return jsonify(explain_image(engine, rgb, given.phrases or (), given.box_threshold, given.text_threshold))


@api.post("/tasks/<int:task_id>/explain")
def explain_task(task_id: int) -> Response:
    run = _task_run(task_id)
    body = explain_image(run.engine, run.rgb, run.plan.phrases, run.plan.box_threshold, run.plan.text_threshold)
    return jsonify(TaskExplanationJson(**body, **run.describe(task_id)))
