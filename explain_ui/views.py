"""What the explain page shows, as plain functions of the backend's JSON (testable without a browser).

Each function takes a ``BackendClient`` and the widgets' values and returns dataclasses of numpy
images, gallery items and HTML/markdown; ``explain_ui/app.py`` only lays them out. Bad input raises
``InputError`` and backend failures ``BackendError``: both carry a message meant for people.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from backend.api_schema import ExplanationJson, SegmentationJson, SegmentJson, TaskRunJson
from backend.heatmaps import WORKING_SIDE, HeatmapImage, at_working_size, render_explanation, token_map_from_png
from backend.images import ImageError, load_rgb, working_size
from backend.render import draw_segments
from backend.types import DenseMask, Explanation, MaskExplanation, Segment, as_box

from .client import BackendClient, BackendError, decode_ls_brush, decode_mask
from .html_parts import grounding_html, legend_html

GalleryItem = tuple[np.ndarray, str]
# Mask cut-outs are previews: Gradio encodes every gallery image on each answer (~0.2 s a megapixel),
# and a cut-out is shown at a gallery's size, well under this.
MASK_PREVIEW_SIDE = 384
# The Output picture is drawn at most this big: the masks come at this size, and the panel shows it
# narrower still (drawing and encoding a 12-megapixel overlay took ~3.5 s).
OVERLAY_SIDE = WORKING_SIDE
Progress = Callable[..., Any]  # gr.Progress: progress(fraction, desc=...)


class InputError(ValueError):
    """Something the person typed or uploaded can't be used; ``str()`` says what and how to fix it."""


def _no_progress(fraction: float, desc: str | None = None) -> None:
    return None


# -- inputs --------------------------------------------------------------------------------------------
def check_image(image: Any) -> np.ndarray:
    """The uploaded image as HxWx3 uint8 RGB (converted like the backend converts it)."""
    if image is None:
        raise InputError("Upload an image first (Input panel), then run again.")
    try:
        return load_rgb(np.asarray(image))
    except ImageError as exc:
        raise InputError(f"The uploaded image can't be used: {exc}") from None


def check_prompt(prompt: str | None) -> str:
    text = (prompt or "").strip()
    if not text or not text.strip(" .,;"):
        raise InputError("Type a text prompt: what to segment, e.g. 'cat . dog' (phrases separated by '.' or ',').")
    return text


def check_task_id(value: Any) -> int:
    """A Label Studio task id from a textbox or number field (``"12"``, ``12.0``)."""
    text = "" if value is None else str(value).strip()
    if not text:
        raise InputError("Enter a Label Studio task ID (the number in the task's URL, e.g. 12).")
    try:
        number = float(text)
    except ValueError:
        raise InputError(f"Task ID must be a whole number, got {text!r}.") from None
    if not number.is_integer() or number < 1:
        raise InputError(f"Task ID must be a positive whole number, got {text!r}.")
    return int(number)


@dataclass(frozen=True)
class DeepLink:
    """What a link to the page asks for: ``?task=ID&project=P&region=R``."""

    task_id: int
    project: str  # "" when the link names none
    region: str | None = None  # a result id, as given (checked when the masks are known: region_link)


def deep_link(query: Mapping[str, str]) -> DeepLink | None:
    """``?task=ID&project=P&region=R`` (the link the backend puts on each predicted region) -> a
    DeepLink; None without ``task``. A bad task id raises InputError; the region is kept as given
    (a bad one is reported beside the task, which is still shown)."""
    if not query.get("task"):
        return None
    region = str(query.get("region") or "").strip() or None
    return DeepLink(check_task_id(query["task"]), str(query.get("project") or "").strip(), region)


# -- segmentations ---------------------------------------------------------------------------------------
@dataclass
class Segmentation:
    """Masks on an image: what the Output panel draws."""

    rgb: np.ndarray
    segments: list[Segment]
    summary: str = ""  # markdown
    task: tuple[int, str] | None = None  # (task id, project as asked) when the image is a task's

    def overlay(self, show_labels: bool = True) -> np.ndarray:
        """The image with coloured masks, boxes and (optionally) ``label score`` text, at most
        ``OVERLAY_SIDE`` px on the long side."""
        rgb = at_working_size(self.rgb, OVERLAY_SIDE)
        height, width = rgb.shape[:2]
        segments = self.segments if rgb is self.rgb else [s.resized(height, width) for s in self.segments]
        return draw_segments(rgb, segments, show_labels=show_labels)

    def mask_gallery(self) -> list[GalleryItem]:
        """One cut-out per mask: the photo inside the mask, dimmed outside it; at most
        ``MASK_PREVIEW_SIDE`` px on the long side (the page encodes each one it shows)."""
        items = []
        rgb = at_working_size(self.rgb, MASK_PREVIEW_SIDE)
        dimmed = (rgb * 0.2).astype(np.uint8)
        for i, segment in enumerate(self.segments, 1):
            cut = np.where(segment.mask_source.resized(*rgb.shape[:2])[..., None], rgb, dimmed)
            iou = f" · IoU {segment.predicted_iou:.2f}" if np.isfinite(segment.predicted_iou) else ""
            items.append((cut, f"#{i} {segment.label} · score {segment.score:.2f}{iou}"))
        return items


@dataclass(frozen=True, eq=False)
class SentMask:
    """A mask as the backend sent it (at most WORKING_SIDE px on the long side) standing for the image's
    full-size mask: scaled (nearest neighbour) only to the size something draws it at."""

    sent: DenseMask
    size: tuple[int, int]  # H, W of the image
    area: int  # the backend's count of set pixels at the image's size

    def resized(self, height: int, width: int) -> np.ndarray:
        return self.sent.resized(height, width)


def segments_from_json(items: Sequence[SegmentJson], rgb: np.ndarray) -> list[Segment]:
    """The backend's ``segments`` (parsed by the client) -> Segments on the image (masks as sent, at
    most WORKING_SIDE px on the long side, ``SentMask``: made full size only if asked for)."""
    segments = []
    for item in items:
        sent = decode_mask(item["mask_png"])
        mask: np.ndarray | SentMask = sent
        if sent.shape != rgb.shape[:2]:
            if working_size(rgb.shape[:2], max(sent.shape)) != sent.shape:
                raise BackendError(f"the backend sent a {sent.shape[1]}x{sent.shape[0]} mask for a "
                                   f"{rgb.shape[1]}x{rgb.shape[0]} image")
            mask = SentMask(DenseMask(sent), (int(rgb.shape[0]), int(rgb.shape[1])), int(item["area"]))
        try:
            box = as_box(item["box"])
        except (TypeError, ValueError) as exc:
            raise BackendError(f"the backend sent a bad segment box ({exc})") from exc
        segments.append(Segment(
            label=item["label"], box=box, score=float(item["score"]), predicted_iou=float(item["predicted_iou"]),
            mask=mask, phrase_scores=dict(item["phrase_scores"]),
            token_scores=tuple((t["token"], float(t["score"])) for t in item["token_scores"]),
        ))
    return segments


def _image_for(body: SegmentationJson | ExplanationJson, rgb: np.ndarray) -> np.ndarray:
    """The image the backend worked on: ours, checked against the size it reports."""
    size = (body["height"], body["width"])
    if size != rgb.shape[:2]:
        raise BackendError(f"the backend worked on a {size[1]}x{size[0]} image, but this one is "
                           f"{rgb.shape[1]}x{rgb.shape[0]}")
    return rgb


def _summary(body: SegmentationJson | ExplanationJson, segments: Sequence[Segment],
             run: TaskRunJson | None = None) -> str:
    found = ", ".join(f"{s.label} ({s.score:.2f})" for s in segments) or "nothing above the thresholds"
    lines = [f"**{len(segments)} mask{'s' if len(segments) != 1 else ''}** for "
             f"{' . '.join(body['prompt']) or 'the prompt'}: {found}"]
    if run is not None:
        lines.append(f"Task {run['task']} (project {run['project']}), prompt from {run['prompt_source']}")
    lines.append(f"Model version `{body['model_version']}`")
    return "  \n".join(lines)


def segment_image(client: BackendClient, image: Any, prompt: str | None, box_threshold: float | None,
                  text_threshold: float | None, progress: Progress = _no_progress) -> Segmentation:
    """Run Segmentation on an uploaded image."""
    rgb = check_image(image)
    text = check_prompt(prompt)
    progress(0.1, desc="Segmenting on the backend")
    body = client.segment(rgb, text, box_threshold, text_threshold)
    progress(0.8, desc="Drawing the masks")
    segments = segments_from_json(body["segments"], _image_for(body, rgb))
    return Segmentation(rgb, segments, _summary(body, segments))


# -- explanations ---------------------------------------------------------------------------------------
@dataclass
class ExplanationView:
    """Everything the Explanation panel shows."""

    encoder_heatmaps: list[GalleryItem] = field(default_factory=list)
    encoder_overlays: list[GalleryItem] = field(default_factory=list)
    decoder_maps: list[GalleryItem] = field(default_factory=list)  # per mask: overlay, then heatmap
    mask_looks: list[GalleryItem] = field(default_factory=list)  # per mask and block: where its tokens look
    grounding_html: str = ""
    legend_html: str = ""
    status: str = ""  # markdown: cached or not, encoder availability, notes
    encoder_reason: str | None = None  # why encoder maps are missing (e.g. MobileSAM), else None


def explanation_from_json(body: ExplanationJson, segments: Sequence[Segment]) -> Explanation:
    """The backend's explanation (token-grid maps) as the ``Explanation`` it was made from, with
    ``segments`` (``segments_from_json`` of the same body), for ``backend.heatmaps`` to draw."""
    def grid(data: str) -> np.ndarray:
        try:
            return token_map_from_png(data)
        except ValueError as exc:
            raise BackendError(f"the backend sent a map that can't be read: {exc}") from exc

    masks = []
    for item in body["segments"]:
        maps = item["maps"]
        if maps is None:  # past the backend's first MASK_MAPS masks
            masks.append(MaskExplanation(decoder_map=None))
        else:
            masks.append(MaskExplanation(decoder_map=grid(maps["decoder_png"]),
                                         token_look={b["block"]: grid(b["map_png"]) for b in maps["token_look"]}))
    layout = body["token_grid"]
    return Explanation(
        model_version=body["model_version"],
        segments=tuple(segments),
        masks=tuple(masks),
        encoder_received={b["block"]: grid(b["map_png"]) for b in body["encoder"]["blocks"]},
        original_size=(body["height"], body["width"]),
        input_size=(layout["input_height"], layout["input_width"]),
        img_size=layout["img_size"],
        notes=tuple(body["notes"]),
    )


def explanation_view(body: ExplanationJson, rgb: np.ndarray, segments: Sequence[Segment],
                     progress: Progress = _no_progress) -> ExplanationView:
    """The backend's explanation -> heatmaps and overlays on ``rgb`` (the photo it explained, whose
    masks are ``segments``), bars and legend."""
    progress(0.7, desc="Drawing the attention maps")
    try:
        rendered = render_explanation(explanation_from_json(body, segments), rgb, mask_maps=len(segments))
    except ValueError as exc:  # a grid that doesn't tile SAM's input, sizes that don't fit the photo
        raise BackendError(f"the backend sent maps that don't fit this image: {exc}") from exc
    view = ExplanationView()
    for _, heatmap in rendered.encoder:
        view.encoder_heatmaps.append((heatmap.heatmap, heatmap.title))
        view.encoder_overlays.append((heatmap.overlay, heatmap.title))
    for mask in rendered.masks:  # maps come for the best masks only (the backend's MASK_MAPS)
        name = f"#{mask.index + 1} {mask.label}"
        decoder: HeatmapImage | None = mask.decoder
        if decoder is not None:
            view.decoder_maps.append((decoder.overlay, f"{name}: decoder, overlay"))
            view.decoder_maps.append((decoder.heatmap, f"{name}: decoder, heatmap"))
        for _, look in mask.token_look:
            view.mask_looks.append((look.overlay, f"#{mask.index + 1} {look.title}"))
    encoder = body["encoder"]
    if not encoder["available"]:
        view.encoder_reason = encoder["reason"] or "the backend captured no encoder attention"
    view.grounding_html = grounding_html(body["segments"])
    view.legend_html = legend_html(body["legend"])
    view.status = _explanation_status(body, view.encoder_reason)
    return view


def _explanation_status(body: ExplanationJson, encoder_reason: str | None) -> str:
    lines = ["From the backend's cache: no model ran." if body["cached"]
             else "Computed now (later requests for this image and prompt come from the cache)."]
    if encoder_reason:
        lines.append(f"**Encoder attention maps are unavailable:** {encoder_reason}")
    lines += [f"- {note}" for note in body["notes"] if note != encoder_reason]
    return "  \n".join(lines)



def no_masks_hint(box_threshold: float | None) -> str:
    """What to do when nothing was found (markdown)."""
    now = (f" (now {box_threshold:.2f})" if box_threshold is not None
           else " (untick \"Use the project's thresholds\" to set it)")
    return (f"**No objects found** above the thresholds. Lower the **Box confidence threshold**{now} "
            "or name the object differently, then run again.")


def explain_image(client: BackendClient, image: Any, prompt: str | None, box_threshold: float | None,
                  text_threshold: float | None,
                  progress: Progress = _no_progress) -> tuple[Segmentation, ExplanationView]:
    """Explain Segmentation for an uploaded image: its masks and every map."""
    rgb = check_image(image)
    text = check_prompt(prompt)
    progress(0.05, desc="Explaining on the backend (attention maps)")
    body = client.explain(rgb, text, box_threshold, text_threshold)
    return _explained(body, rgb, progress)


def _explained(body: ExplanationJson, rgb: np.ndarray, progress: Progress,
               run: TaskRunJson | None = None) -> tuple[Segmentation, ExplanationView]:
    progress(0.5, desc="Decoding masks")
    segments = segments_from_json(body["segments"], _image_for(body, rgb))
    view = explanation_view(body, rgb, segments, progress)
    progress(1.0, desc="Done")
    return Segmentation(rgb, segments, _summary(body, segments, run)), view


# -- Label Studio tasks ------------------------------------------------------------------------------------
@dataclass
class TaskView:
    """A task's image and its newest stored prediction."""

    task_id: int
    project: str
    rgb: np.ndarray
    stored: Segmentation
    info: str  # markdown
    predictions: tuple[Mapping[str, Any], ...] = ()  # all of the task's stored predictions, as Label Studio sent them


def _newest(predictions: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    dated = [p for p in predictions if isinstance(p, Mapping)]
    if not dated:
        return None
    # Label Studio lists predictions oldest first; created_at (ISO text) orders them when present.
    return max(enumerate(dated), key=lambda ip: (str(ip[1].get("created_at") or ""), ip[0]))[1]


def stored_segments(prediction: Mapping[str, Any] | None, rgb: np.ndarray) -> list[Segment]:
    """The brush masks of a stored Label Studio prediction as Segments (boxes from the masks)."""
    if prediction is None:
        return []
    segments = []
    for result in prediction.get("result") or []:
        if result.get("type") != "brushlabels":
            continue
        mask = decode_ls_brush(result)
        if mask.shape != rgb.shape[:2]:
            # Stored at another size (the image changed since): scale to the image we show.
            mask = np.asarray(Image.fromarray(mask).resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.NEAREST))
        ys, xs = np.nonzero(mask)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)) if xs.size else (0.0,) * 4
        labels = (result.get("value") or {}).get("brushlabels") or ["?"]
        score = result.get("score", prediction.get("score", 0.0))
        # Label Studio keeps no IoU estimate: NaN leaves it out of the captions.
        segments.append(Segment(label=str(labels[0]), box=box, score=float(score or 0.0), predicted_iou=float("nan"),
                                mask=mask))
    return segments


@contextmanager
def _typed_ids() -> Iterator[None]:
    """A task route's 404 (Label Studio has no such task or project) as an InputError: the Task ID or
    Project typed is what to fix, so its message belongs beside them, not in the Output panel."""
    try:
        yield
    except BackendError as exc:
        if exc.status == 404:
            raise InputError(str(exc)) from None
        raise


def load_task(client: BackendClient, task_id: Any, project: str | None = None,
              progress: Progress = _no_progress) -> TaskView:
    """A task's image and its newest stored prediction, through the backend (which holds the LS key)."""
    number = check_task_id(task_id)
    project = asked = (project or "").strip()
    progress(0.1, desc=f"Fetching task {number}")
    with _typed_ids():
        task = client.task(number, project or None)
    progress(0.4, desc="Fetching the task's image")
    rgb = client.task_image(number, project or None)
    predictions = task["predictions"]
    newest = _newest(predictions)
    segments = stored_segments(newest, rgb)
    project = project or str(task["project"] or "")
    if newest is None:
        stored = "No stored prediction yet: run or explain the segmentation."
    else:
        stored = (f"Newest of {len(predictions)} stored prediction(s): {len(segments)} brush mask(s), score "
                  f"{float(newest.get('score') or 0):.2f}, model version `{newest.get('model_version', '?')}`")
    info = "  \n".join([f"**Task {task['id']}** (project {project or '?'}), labels: "
                        f"{', '.join(task['labels']) or '?'}", stored])
    return TaskView(number, project, rgb, Segmentation(rgb, segments, info, (number, asked)), info,
                    tuple(p for p in predictions if isinstance(p, Mapping)))


def task_image_on_show(shown: Segmentation | None, task_id: Any, project: str | None) -> np.ndarray | None:
    """The image on show when it is this task's (saves fetching it again), else None."""
    if shown is None or shown.task is None:
        return None
    try:
        asked = (check_task_id(task_id), (project or "").strip())
    except InputError:
        return None
    return shown.rgb if shown.task == asked else None


def _task_rgb(client: BackendClient, task_id: int, project: str, rgb: np.ndarray | None) -> np.ndarray:
    return rgb if rgb is not None else client.task_image(task_id, project or None)


def _task_thresholds(use_project: bool, box_threshold: float | None,
                     text_threshold: float | None) -> tuple[float | None, float | None]:
    # The project's own thresholds (None) make a predicted task's explanation a cache hit.
    return (None, None) if use_project else (box_threshold, text_threshold)


def segment_task(client: BackendClient, task_id: Any, project: str | None, prompt: str | None,
                 box_threshold: float | None, text_threshold: float | None, use_project_thresholds: bool = True,
                 rgb: np.ndarray | None = None, progress: Progress = _no_progress) -> Segmentation:
    """Run Segmentation on a task's image (empty prompt: the project's labels / remembered prompt)."""
    number, project = check_task_id(task_id), (project or "").strip()
    with _typed_ids():
        rgb = _task_rgb(client, number, project, rgb)
        progress(0.1, desc=f"Segmenting task {number} on the backend")
        body = client.segment_task(number, project or None, prompt, *_task_thresholds(
            use_project_thresholds, box_threshold, text_threshold))
    segments = segments_from_json(body["segments"], _image_for(body, rgb))
    return Segmentation(rgb, segments, _summary(body, segments, body), (number, project))


def explain_task(client: BackendClient, task_id: Any, project: str | None, prompt: str | None,
                 box_threshold: float | None, text_threshold: float | None, use_project_thresholds: bool = True,
                 rgb: np.ndarray | None = None,
                 progress: Progress = _no_progress) -> tuple[Segmentation, ExplanationView]:
    """Explain a task's segmentation (a task the backend already predicted comes from its cache)."""
    number, project = check_task_id(task_id), (project or "").strip()
    with _typed_ids():
        rgb = _task_rgb(client, number, project, rgb)
        progress(0.05, desc=f"Explaining task {number} on the backend")
        body = client.explain_task(number, project or None, prompt, *_task_thresholds(
            use_project_thresholds, box_threshold, text_threshold))
    result, view = _explained(body, rgb, progress, body)
    result.task = (number, project)
    return result, view
