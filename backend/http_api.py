"""JSON API for the explain UI, under /api. Routes only parse, validate and serialise; the work is
the engine's and ``backend.ls_model``'s.

    POST /api/segment                 image (multipart file, or JSON data URL / base64) + prompt
    GET  /api/tasks/<id>              a Label Studio task: image URL, data, stored predictions
    GET  /api/tasks/<id>/image        the task's image bytes (fetched with the backend's LS key)
    POST /api/tasks/<id>/segment      segment a task's image (project labels, or a given prompt)
    POST /api/explain                 like /api/segment, plus attention heatmaps (``explanation_json``)
    POST /api/tasks/<id>/explain      like /api/tasks/<id>/segment, plus attention heatmaps
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

from . import sam_attention
from ._wsgi import current_model, field_of, json_body, read_body
from .config import parse_switch
from .detector import parse_prompt
from .errors import BadRequest
from .explainer import LEGEND, MASK_MAPS, WORKING_SIDE, HeatmapImage, MaskMaps, at_working_size, render_explanation
from .fetch import ImageTooLargeError, decode_base64, decode_data_url, fetch_image
from .label_config import LabelConfig, parse_label_config
from .ls_api import LabelStudioClient, LabelStudioError
from .ls_results import mask_to_rle, prediction, segments_to_results
from .project_state import project_key
from .prompts import PromptInput, PromptPlan, parse_threshold, split_typed_prompt
from .render import draw_segments
from .types import Explanation, Segment

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
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def segment_json(segment: Segment, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """A segment with its mask as a Label Studio brush RLE and a PNG at the image's size; with
    ``size`` (H, W), only a PNG at that size (what /api/explain sends: a view, not an annotation)."""
    body: dict[str, Any] = {
        "label": segment.label,
        "score": float(segment.score),
        "predicted_iou": float(segment.predicted_iou),
        "box": [float(v) for v in segment.box],
        "area": segment.area,
        "phrase_scores": {k: float(v) for k, v in segment.phrase_scores.items()},
        "token_scores": [[token, float(score)] for token, score in segment.token_scores],
    }
    if size is not None:
        return {**body, "mask_png": mask_png(segment.mask_source.resized(*size))}
    mask = segment.mask  # made full size once for both encodings
    return {**body, "mask_rle": mask_to_rle(mask), "mask_png": mask_png(mask)}


def segmentation_json(segments: list[Segment], phrases: tuple[str, ...], width: int, height: int,
                      version: str) -> dict[str, Any]:
    return {
        "model_version": version,
        "width": int(width),
        "height": int(height),
        "prompt": list(phrases),
        "segments": [segment_json(s) for s in segments],
    }


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
    task = client.get_task(task_id)
    try:
        project = _project_id(task.get("project")) or hint
    except BadRequest as exc:  # Label Studio's answer, not the request, is wrong
        raise LabelStudioError(f"Label Studio sent task {task_id} with a malformed project: {exc}") from None
    schema = model.memory.get(project).label_config
    if not schema and project is not None:
        schema = client.get_project(int(project)).get("label_config")
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
    return jsonify({
        "id": task.get("id", task_id),
        "project": task.get("project"),
        "image_url": target.image_url(task.get("data") or {}),
        "image_key": target.value.lstrip("$"),
        "labels": config.brush_labels,
        "data": task.get("data"),
        "predictions": task.get("predictions") or [],
    })


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

    def describe(self, task_id: int) -> dict[str, Any]:
        return {"task": self.task.get("id", task_id), "project": self.task.get("project"),
                "prompt_source": self.plan.source}


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
    body.update(run.describe(task_id), prediction=prediction(results, scores, version))
    return jsonify(body)


# -- explanations -------------------------------------------------------------------------------------
DEFAULT_ALPHA = 0.5  # heatmap opacity over the photo in the overlay PNGs


def rgb_png(image: np.ndarray) -> str:
    """Base64 PNG of an (H, W, 3) uint8 RGB image (no data: prefix)."""
    buffer = io.BytesIO()
    # Low compression: these are big photo-like images and encoding time matters more than bytes.
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buffer, format="PNG", compress_level=3)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def parse_flag(fields: Mapping[str, Any], name: str, default: bool) -> bool:
    """A boolean from JSON (true/false) or a form field ("true"/"false"/"1"/"0")."""
    value = fields.get(name)
    if value in (None, ""):
        return default
    if isinstance(value, bool):
        return value
    try:
        return parse_switch(str(value))
    except ValueError:
        raise BadRequest(f"'{name}' must be true or false, got {value!r}") from None


def parse_alpha(fields: Mapping[str, Any]) -> float:
    value = fields.get("alpha")
    return DEFAULT_ALPHA if value in (None, "") else parse_threshold(value, "alpha")


def heatmap_json(heatmap: HeatmapImage, alpha: float) -> dict[str, Any]:
    # render_explanation blends at DEFAULT_ALPHA; re-blend only when another opacity was asked for.
    blended = (heatmap.overlay if alpha == DEFAULT_ALPHA
               else sam_attention.overlay(heatmap.image, heatmap.heatmap, alpha))
    return {"title": heatmap.title, "heatmap_png": rgb_png(heatmap.heatmap), "overlay_png": rgb_png(blended)}


def mask_maps_json(mask: MaskMaps, segment: Segment, alpha: float) -> dict[str, Any]:
    decoder = heatmap_json(mask.decoder, alpha) if mask.decoder is not None else {}
    return {
        "index": mask.index,
        "label": mask.label,
        "score": float(mask.score),
        "iou": float(segment.predicted_iou),
        "decoder_heatmap_png": decoder.get("heatmap_png"),  # null past the first MASK_MAPS masks
        "decoder_overlay_png": decoder.get("overlay_png"),
        "token_look": [{"block": int(block), **heatmap_json(look, alpha)} for block, look in mask.token_look],
        "grounding": [{"token": token, "score": float(score)} for token, score in mask.grounding],
        "phrase_scores": {k: float(v) for k, v in mask.phrase_scores.items()},
    }


def explanation_json(explanation: Explanation, rgb: np.ndarray, phrases: tuple[str, ...], cached: bool,
                     alpha: float = DEFAULT_ALPHA, show_labels: bool = True) -> dict[str, Any]:
    """The /api/*explain response, sized for viewing whatever the photo's size: segments with masks
    and their overlay at ``map_width`` x ``map_height`` (at most WORKING_SIDE px on the long side),
    attention maps as PNGs of at most ENCODER_MAP_SIDE / MASK_MAP_SIDE px, for the first MASK_MAPS
    masks. ``width`` x ``height`` is the image's own size (``area`` and ``box`` are in its pixels)."""
    height, width = rgb.shape[:2]
    rgb = at_working_size(rgb, WORKING_SIDE)
    map_height, map_width = rgb.shape[:2]
    rendered = render_explanation(explanation, rgb)
    blocks = sorted(explanation.encoder_received)
    reason = None
    if not blocks:
        reason = "; ".join(explanation.notes) or "the image encoder's attention was not captured"
    notes = list(explanation.notes)
    if len(explanation.segments) > MASK_MAPS:
        notes.append(f"maps are drawn for the first {MASK_MAPS} of {len(explanation.segments)} masks")
    return {
        "model_version": explanation.model_version,
        "width": int(width),
        "height": int(height),
        "map_width": int(map_width),
        "map_height": int(map_height),
        "cached": bool(cached),
        "prompt_phrases": list(phrases),
        "segments": [segment_json(s, (map_height, map_width)) for s in explanation.segments],
        "overlay_png": rgb_png(draw_segments(rgb, [s.resized(map_height, map_width) for s in explanation.segments],
                                             show_labels=show_labels)),
        "encoder": {
            "available": bool(blocks),
            "reason": reason,
            "blocks": [{"block": int(block), "kind": "last" if block == blocks[-1] else "global",
                        **heatmap_json(image, alpha)} for block, image in rendered.encoder],
        },
        "masks": [mask_maps_json(mask, segment, alpha)
                  for mask, segment in zip(rendered.masks, explanation.segments, strict=True)],
        "legend": LEGEND,
        "notes": notes,
    }


def explain_image(engine: Any, rgb: np.ndarray, phrases: tuple[str, ...], box_threshold: float | None,
                  text_threshold: float | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Explain (from the engine's cache when this image + prompt + thresholds ran before); ``fields``
    give the drawing options ``alpha`` and ``show_labels``."""
    alpha, show_labels = parse_alpha(fields), parse_flag(fields, "show_labels", True)
    prompt = list(phrases)
    cached = engine.cached_explanation(rgb, prompt, box_threshold, text_threshold) is not None
    explanation = engine.explain(rgb, prompt, box_threshold, text_threshold)
    return explanation_json(explanation, rgb, tuple(parse_prompt(prompt)), cached, alpha, show_labels)


@api.post("/explain")
def explain() -> Response:
    image, fields = required_image_request()
    given = prompt_input(fields, required=True)
    parse_alpha(fields), parse_flag(fields, "show_labels", True)  # bad options fail before any model runs
    model = current_model()
    engine = model.engine.get(timeout=model.settings.engine_wait_s)
    rgb = engine.load_image(image)
    return jsonify(explain_image(engine, rgb, given.phrases or (), given.box_threshold, given.text_threshold, fields))


@api.post("/tasks/<int:task_id>/explain")
def explain_task(task_id: int) -> Response:
    run = _task_run(task_id)
    body = explain_image(run.engine, run.rgb, run.plan.phrases, run.plan.box_threshold, run.plan.text_threshold,
                         run.fields)
    body.update(run.describe(task_id))
    return jsonify(body)
