"""The explain page's Gradio layout and event wiring (the logic lives in ``explain_ui.views``).

    python -m explain_ui        # BACKEND_URL, EXPLAIN_UI_HOST / EXPLAIN_UI_PORT, EXPLAIN_UI_AUTH

Two tabs with the same three panels (Input, Output, Explanation): an uploaded image, or a Label
Studio task (``/?task=ID&project=P`` opens that task and explains it on load); and a Jobs tab with the
backend's background prediction jobs as progress bars that refresh themselves while it is on show.

What is on show always belongs together: Run segments and then explains at once (a cache hit on the
backend), and any change of the inputs clears the Output and Explanation panels. Each panel has one
lasting error line, cleared by the next success, instead of pop-ups; one progress line per tab names
the stage. Pictures are HTML grids (alt text, whole captions, as many columns as fit).
"""

from __future__ import annotations

import functools
import html
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import gradio as gr
import numpy as np
from gradio.components import Component
from PIL import Image

from backend.config import EngineConfig
from backend.images import ImageError, load_rgb

from . import jobs_view, views
from .client import BackendClient, BackendError

logger = logging.getLogger(__name__)

TITLE = "Explainable Grounded SAM"


@dataclass(frozen=True)
class UISettings:
    host: str = "0.0.0.0"  # EXPLAIN_UI_HOST
    port: int = 7860  # EXPLAIN_UI_PORT
    auth: tuple[str, str] | None = None  # EXPLAIN_UI_AUTH="user:pass": Gradio's own login page
    # The sliders start at the engine's thresholds (same env vars as the backend, same defaults).
    box_threshold: float = EngineConfig.box_threshold
    text_threshold: float = EngineConfig.text_threshold

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> UISettings:
        env = os.environ if env is None else env
        auth = None
        if env.get("EXPLAIN_UI_AUTH"):
            user, sep, password = env["EXPLAIN_UI_AUTH"].partition(":")
            if not sep or not user or not password:
                raise ValueError("EXPLAIN_UI_AUTH must be 'user:password'")
            auth = (user, password)
        try:
            return cls(host=env.get("EXPLAIN_UI_HOST") or cls.host, port=int(env.get("EXPLAIN_UI_PORT") or cls.port),
                       auth=auth, box_threshold=float(env.get("BOX_THRESHOLD") or cls.box_threshold),
                       text_threshold=float(env.get("TEXT_THRESHOLD") or cls.text_threshold))
        except ValueError as exc:
            raise ValueError(f"explain UI settings: {exc} (EXPLAIN_UI_PORT, BOX_THRESHOLD, TEXT_THRESHOLD)") from exc


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _failure(exc: Exception, what: str) -> str:
    """The one line a person reads for ``exc``: our own message for bad input and backend failures;
    anything else is a bug of ours, logged with its trace here and summarised there."""
    if isinstance(exc, (views.InputError, BackendError)):
        return str(exc)
    logger.error("explain UI: %s failed", what, exc_info=exc)
    return f"The explain UI failed ({type(exc).__name__}: {exc}); see its log."


def shown_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Bad input and backend failures become a gr.Error with their message (never a stack trace);
    for the Jobs tab and the deep link, whose failures have no panel of their own."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise gr.Error(_failure(exc, fn.__name__), print_exception=False) from None

    return wrapper


# -- look: contrast and layout --------------------------------------------------------------------------------
# Gradio's default help text (#bbbbc2 on white, 1.9:1) and Run button (white on #f97316, 2.8:1) are below
# WCAG's 4.5:1 for text; these colours pass it in light and dark mode (tests measure both).
THEME = gr.themes.Default(primary_hue="orange").set(
    body_text_color_subdued="*neutral_600", body_text_color_subdued_dark="*neutral_300",
    block_info_text_color="*neutral_600", block_info_text_color_dark="*neutral_300",
    button_primary_background_fill="*primary_700", button_primary_background_fill_hover="*primary_800",
    button_primary_background_fill_dark="*primary_700", button_primary_background_fill_hover_dark="*primary_800",
    button_primary_text_color="white", button_primary_text_color_dark="white",
)

# Grids size their columns to the panel (one column on a narrow phone); captions wrap instead of being
# cut; the legend stays in view while the maps scroll under it.
CSS = """
.figure-grid h4 { margin: 4px 0; }
.figure-grid .figures { display: grid; gap: 8px;
  grid-template-columns: repeat(auto-fill, minmax(min(150px, 100%), 1fr)); }
.figure-grid figure { margin: 0; min-width: 0; }
.figure-grid img, img.picture { display: block; max-width: 100%; max-height: 70vh; width: auto; height: auto;
  border-radius: 4px; }
.figure-grid img { max-height: 40vh; }
.figure-grid figcaption { font-size: var(--text-sm); line-height: 1.3; white-space: normal;
  overflow-wrap: anywhere; margin-top: 2px; }
.panel-error p { color: #b91c1c; font-weight: 600; margin: 4px 0; }
.dark .panel-error p { color: #fca5a5; }
.progress-line { min-height: 2.2em; }
.progress-line p.step::before { content: ""; display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.5em;
  vertical-align: -0.1em; border: 2px solid currentColor; border-right-color: transparent; border-radius: 50%;
  animation: step-spin 1s linear infinite; }
@keyframes step-spin { to { transform: rotate(360deg); } }
.block.collapse-empty:has(.html-container > .prose:empty) { display: none; }
.legend { position: sticky; top: 0; z-index: 3; background: var(--background-fill-primary); padding: 4px 0; }
/* A phone shows the Output panel below the form: room to scroll it to the top when Run is pressed. */
@media (max-width: 767px) { .output-column { min-height: 100vh; } }
.legend ul { margin: 4px 0; padding-left: 1.2em; font-size: var(--text-sm); }
"""

# On a phone the Output panel is below the form (on a desktop it may be scrolled away): Run brings its
# progress line into view, where the result will appear.
_SCROLL_JS = ("() => { const line = document.getElementById('{id}'); if (!line) return;"
              " const top = line.getBoundingClientRect().top;"
              " if (top < 0 || top > window.innerHeight / 2) line.scrollIntoView({block: 'start'}); }")


# -- layout ----------------------------------------------------------------------------------------------
@dataclass
class Panels:
    """The Output and Explanation panels of one tab, its Input panel's error line and its buttons.

    Each panel has one error line that stays until that panel's next success; ``progress`` is the
    tab's one progress line (the stages of a run show there, nowhere else)."""

    input_error: gr.HTML
    progress: gr.HTML
    output_error: gr.HTML
    overlay: gr.HTML
    masks: gr.HTML
    summary: gr.Markdown
    explain_error: gr.HTML
    status: gr.Markdown
    legend: gr.HTML
    encoder_heatmaps: gr.HTML
    encoder_overlays: gr.HTML
    decoder_maps: gr.HTML
    mask_looks: gr.HTML
    grounding: gr.HTML
    state: gr.State  # the Segmentation on show, redrawn when the labels toggle changes
    buttons: tuple[gr.Button, ...]  # disabled while a run is busy

    def outputs(self) -> list[Component]:
        return [self.input_error, self.progress, self.output_error, self.overlay, self.masks, self.summary,
                self.explain_error, self.status, self.legend, self.encoder_heatmaps, self.encoder_overlays,
                self.decoder_maps, self.mask_looks, self.grounding, self.state, *self.buttons]

    # -- what events write (dicts: components left out keep their value) --
    def busy(self, on: bool) -> dict[Component, Any]:
        return {button: gr.Button(interactive=not on) for button in self.buttons}

    def no_explanation(self) -> dict[Component, Any]:
        return {self.explain_error: "", self.status: "", self.legend: "", self.encoder_heatmaps: "",
                self.encoder_overlays: "", self.decoder_maps: "", self.mask_looks: "", self.grounding: ""}

    def nothing_shown(self, note: str = "") -> dict[Component, Any]:
        """Output and Explanation emptied (the inputs changed: what was on show no longer matches)."""
        return {**self.no_explanation(), self.output_error: "", self.overlay: "", self.masks: "",
                self.summary: "", self.state: None, self.progress: note}

    def segmentation(self, result: views.Segmentation, show_labels: bool,
                     box_threshold: float | None) -> dict[Component, Any]:
        return {self.output_error: "", self.overlay: views.picture_html(result.overlay(show_labels), _alt(result)),
                self.masks: views.figure_grid_html("Masks", result.mask_gallery(), "Mask cut-out", views.THUMB_PX),
                self.summary: segmentation_summary(result, box_threshold), self.state: result}

    def explanation(self, view: views.ExplanationView) -> dict[Component, Any]:
        return {
            self.explain_error: "", self.status: view.status, self.legend: view.legend_html,
            self.encoder_heatmaps: views.figure_grid_html(
                "Encoder: attention each place received", view.encoder_heatmaps,
                "Encoder attention heatmap"),
            self.encoder_overlays: views.figure_grid_html(
                "Encoder: the same, over the image", view.encoder_overlays, "Encoder attention overlay"),
            self.decoder_maps: views.figure_grid_html(
                "Decoder: where each mask's token looked", view.decoder_maps, "Mask decoder attention"),
            self.mask_looks: views.figure_grid_html(
                "Encoder, last global block: where each mask's own tokens look", view.mask_looks,
                "Mask tokens' attention"),
            self.grounding: _WHY_LABEL + view.grounding_html if view.grounding_html else "",
        }


_WHY_LABEL = "<h4>Why this label</h4><p><small>Grounding DINO's score of each prompt word, per mask</small></p>"


def segmentation_summary(result: views.Segmentation, box_threshold: float | None) -> str:
    """The Output panel's text: the masks found, or what to change when there are none (markdown).
    ``box_threshold`` is the one the run used (None: the project's own)."""
    return result.summary if result.segments else f"{views.no_masks_hint(box_threshold)}  \n{result.summary}"


def _alt(result: views.Segmentation) -> str:
    masks = ", ".join(f"#{i} {s.label} {s.score:.2f}" for i, s in enumerate(result.segments, 1))
    return f"The image with {len(result.segments)} mask(s) drawn" + (f": {masks}" if masks else "")


def _error_html(message: str) -> str:
    return f'<p role="alert">&#9888; {html.escape(message)}</p>' if message else ""


def _error_line(elem_id: str) -> gr.HTML:
    return gr.HTML(elem_id=elem_id, elem_classes=["panel-error", "collapse-empty"], js_on_load=None)


def _shown_html(elem_id: str) -> gr.HTML:
    """An HTML output that takes no room while empty (no click handler: these are pictures and text)."""
    return gr.HTML(elem_id=elem_id, elem_classes=["collapse-empty"], js_on_load=None)


def _output_and_explanation(prefix: str, input_error: gr.HTML, buttons: tuple[gr.Button, ...]) -> Panels:
    with gr.Column(scale=1, min_width=300, elem_classes=["output-column"]):
        gr.Markdown("### Output")
        progress = gr.HTML(elem_id=f"{prefix}-progress", elem_classes=["progress-line"], js_on_load=None)
        output_error = _error_line(f"{prefix}-output-error")
        overlay = _shown_html(f"{prefix}-output")
        masks = _shown_html(f"{prefix}-masks")
        summary = gr.Markdown(elem_id=f"{prefix}-summary")
    with gr.Column(scale=2, min_width=300):
        gr.Markdown("### Explanation")
        explain_error = _error_line(f"{prefix}-explain-error")
        status = gr.Markdown(elem_id=f"{prefix}-explain-status")
        legend = _shown_html(f"{prefix}-legend")
        encoder_heatmaps = _shown_html(f"{prefix}-encoder-heatmaps")
        encoder_overlays = _shown_html(f"{prefix}-encoder-overlays")
        decoder_maps = _shown_html(f"{prefix}-decoder-maps")
        mask_looks = _shown_html(f"{prefix}-mask-looks")
        grounding = _shown_html(f"{prefix}-grounding")
    return Panels(input_error, progress, output_error, overlay, masks, summary, explain_error, status, legend,
                  encoder_heatmaps, encoder_overlays, decoder_maps, mask_looks, grounding, gr.State(), buttons)


@dataclass
class JobsPanel:
    """The Jobs tab: a project filter, the job list (one progress bar per job) and its timer."""

    project: gr.Textbox
    refresh: gr.Button
    status: gr.Markdown
    message: gr.Markdown  # what the last Cancel did
    listing: gr.HTML
    timer: gr.Timer  # ticks every REFRESH_S while the tab is on show


def _jobs_panel() -> JobsPanel:
    gr.Markdown("### Prediction jobs\nA \"Retrieve predictions\" that reaches the backend's PREDICT_DEADLINE_S "
                "answers in time and hands the tasks it did not reach to a background job, which writes their "
                f"predictions to Label Studio. This list refreshes every {jobs_view.REFRESH_S:g} s while it is open.")
    with gr.Row():
        project = gr.Textbox(label="Project (optional)", placeholder="3", elem_id="jobs-project", scale=3)
        refresh = gr.Button("Refresh", elem_id="jobs-refresh", scale=1)
    status = gr.Markdown(elem_id="jobs-status")
    message = gr.Markdown(elem_id="jobs-message")
    listing = gr.HTML(elem_id="jobs-list", js_on_load=jobs_view.CANCEL_JS, css_template=jobs_view.CSS)
    return JobsPanel(project, refresh, status, message, listing, gr.Timer(jobs_view.REFRESH_S, active=False))


def _clicked_job(event: gr.EventData) -> str | None:
    """The job id a Cancel button sent (``trigger('click', {job})``); None for a click elsewhere."""
    try:
        job = getattr(event, "job", None)
    except TypeError:  # a click that carried no data
        return None
    return str(job) if job else None


def _thresholds(settings: UISettings, prefix: str) -> tuple[gr.Slider, gr.Slider]:
    box = gr.Slider(0.0, 1.0, value=settings.box_threshold, step=0.01, label="Box confidence threshold",
                    info="Higher finds fewer, surer objects; lower finds more (and weaker) ones",
                    elem_id=f"{prefix}-box")
    text = gr.Slider(0.0, 1.0, value=settings.text_threshold, step=0.01, label="Word match threshold",
                     info="Higher keeps only prompt words a box matches strongly (fewer labels)",
                     elem_id=f"{prefix}-text")
    return box, text


# -- inputs the page checks itself -----------------------------------------------------------------------------
def uploaded_rgb(upload: Mapping[str, Any] | None) -> np.ndarray:
    """The Input image (Gradio's upload record: the run events skip Gradio's own decoding, whose
    failure is a bare "Error") decoded as the backend decodes it.

    Raises:
        views.InputError: no image, or a file that isn't one (the message names the file and why).
    """
    if not upload:
        return views.check_image(None)
    path = Path(str(upload.get("path") or ""))
    name = str(upload.get("orig_name") or path.name)
    try:
        return load_rgb(path.read_bytes())
    except (OSError, ImageError) as exc:
        reason = str(exc).removeprefix("image bytes: ")
        raise views.InputError(f"{name} can't be used as an image: {reason}. "
                               "Upload a PNG, JPEG or WebP photo.") from None


_BROWSER_FORMATS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".avif", ".apng"}


# -- examples: scikit-image photos written once to a cache folder -------------------------------------------------
EXAMPLES = (("chelsea", "cat"), ("astronaut", "person . flag"), ("coffee", "cup . spoon"), ("rocket", "rocket"))


def example_photos(folder: Path | None = None) -> list[list[str]]:
    """[[photo path, prompt], ...] for gr.Examples; the photos are written on first use."""
    import skimage.data

    folder = folder or Path(tempfile.gettempdir()) / "explain_ui_examples"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, prompt in EXAMPLES:
        path = folder / f"{name}.png"
        if not path.is_file():
            partial = path.with_suffix(".part.png")
            Image.fromarray(getattr(skimage.data, name)()).save(partial)
            partial.replace(path)  # whole files only: two pages starting at once don't read half a photo
        rows.append([str(path), prompt])
    return rows


def _same_masks(shown: views.Segmentation | None, result: views.Segmentation) -> bool:
    if shown is None or len(shown.segments) != len(result.segments) or shown.rgb.shape != result.rgb.shape:
        return False
    return all(a.label == b.label and np.array_equal(a.mask, b.mask) for a, b in
               zip(shown.segments, result.segments, strict=True))


_SEGMENT_STEPS = ("detecting and segmenting on the backend", "explaining the masks (attention maps)")
_LOAD_STEPS = ("fetching the task, its image and its stored prediction", "explaining the masks (attention maps)")


def _step_html(step: int, what: str) -> str:
    return f'<p class="step" aria-live="polite">Step {step} of 2: {html.escape(what)}&hellip;</p>'


def redraw(show_labels: bool, result: views.Segmentation | None) -> Any:
    """The labels toggle: redraw what is on show (no backend call)."""
    return views.picture_html(result.overlay(show_labels), _alt(result)) if result is not None else gr.skip()


Updates = Iterator[dict[Component, Any]]


def build_demo(client: BackendClient | None = None, settings: UISettings | None = None) -> gr.Blocks:
    """The whole page. ``client`` talks to the backend (default: from BACKEND_URL / BASIC_AUTH_*)."""
    client = client or BackendClient.from_env()
    settings = settings or UISettings()

    # No usage analytics: an annotation tool on an internal network should not phone home. Gradio 6 reads
    # theme and css from launch(); given here they hold for every launcher (main, tests) alike.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The parameters have been moved", category=UserWarning)
        demo = gr.Blocks(title=TITLE, analytics_enabled=False, theme=THEME, css=CSS)
    with demo:
        gr.Markdown(f"## {TITLE}\nGrounding DINO finds what the prompt names, SAM cuts it out, and the "
                    "Explanation panel shows where SAM's attention went and why each label was chosen.")
        with gr.Tabs(selected="image") as tabs:
            # -- an uploaded image --
            with gr.Tab("Image", id="image") as image_tab:
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        gr.Markdown("### Input")
                        image_error = _error_line("image-input-error")
                        image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                                         elem_id="image-input")
                        prompt = gr.Textbox(label="Text prompt", placeholder="cat . dog", elem_id="image-prompt")
                        box, text = _thresholds(settings, "image")
                        labels = gr.Checkbox(True, label="Print the prompt/label text on the output",
                                             elem_id="image-labels")
                        run = gr.Button("Run segmentation and explain", variant="primary", elem_id="image-run")
                        gr.Examples(example_photos(), [image, prompt], label="Examples (scikit-image photos)",
                                    example_labels=[f"{name}: {p}" for name, p in EXAMPLES])
                    panels = _output_and_explanation("image", image_error, (run,))

            # -- a Label Studio task --
            with gr.Tab("Label Studio task", id="task") as task_tab:
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        gr.Markdown("### Input")
                        task_error = _error_line("task-input-error")
                        task_id = gr.Textbox(label="Task ID", placeholder="12", elem_id="task-id")
                        project = gr.Textbox(label="Project (optional)", placeholder="3", elem_id="task-project")
                        load = gr.Button("Load task and explain", elem_id="task-load")
                        task_prompt = gr.Textbox(label="Text prompt (empty: the project's labels or prompt)",
                                                 elem_id="task-prompt")
                        use_project = gr.Checkbox(True, label="Use the project's thresholds (ignore the sliders)",
                                                  elem_id="task-use-project")
                        task_box, task_text = _thresholds(settings, "task")
                        task_labels = gr.Checkbox(True, label="Print the prompt/label text on the output",
                                                  elem_id="task-labels")
                        task_run = gr.Button("Run segmentation and explain", variant="primary", elem_id="task-run")
                    task_panels = _output_and_explanation("task", task_error, (load, task_run))

            # -- background prediction jobs --
            with gr.Tab("Jobs", id="jobs") as jobs_tab:
                jobs = _jobs_panel()

        def runs(panels: Panels, steps: tuple[str, str], segment: Callable[[], views.Segmentation],
                 explain: Callable[[], tuple[views.Segmentation, views.ExplanationView]],
                 show: bool, box_t: float | None) -> Updates:
            """Segment, show the masks, explain them, show the explanation, naming each step on the
            progress line: each step's failure goes to its panel's error line and ends the run; the
            buttons are off meanwhile."""
            started = time.monotonic()
            yield {**panels.no_explanation(), panels.progress: _step_html(1, steps[0])}
            done = panels.busy(False)
            try:
                result = segment()
                shown = panels.segmentation(result, show, box_t)
            except views.InputError as exc:
                yield {**done, panels.progress: "", panels.input_error: _error_html(str(exc))}
                return
            except Exception as exc:
                yield {**done, **panels.nothing_shown(), panels.input_error: "",
                       panels.output_error: _error_html(_failure(exc, "segment"))}
                return
            yield {panels.input_error: "", **shown, panels.progress: _step_html(2, steps[1])}
            try:
                explained, view = explain()
                shown = {} if _same_masks(result, explained) else panels.segmentation(explained, show, box_t)
                shown |= panels.explanation(view)
            except Exception as exc:
                yield {**done, panels.progress: "", panels.explain_error: _error_html(_failure(exc, "explain"))}
                return
            yield {**done, **shown, panels.progress: f"<p>Done in {time.monotonic() - started:.1f} s.</p>"}

        def started(trigger: Callable[..., Any], panels: Panels) -> Any:
            """The buttons off before the run is queued (a click during the run does nothing), and on a
            phone the Output panel scrolled into view."""
            scroll = _SCROLL_JS.replace("{id}", panels.progress.elem_id or "")
            return trigger(lambda: panels.busy(True), None, list(panels.buttons), queue=False,
                           show_progress="hidden", js=scroll)

        # -- events: uploaded image --
        def on_run(upload, text_prompt, box_t, text_t, show) -> Updates:
            state: dict[str, np.ndarray] = {}

            def segment() -> views.Segmentation:
                state["rgb"] = uploaded_rgb(upload)
                return views.segment_image(client, state["rgb"], text_prompt, box_t, text_t)

            def explain() -> tuple[views.Segmentation, views.ExplanationView]:
                return views.explain_image(client, state["rgb"], text_prompt, box_t, text_t)

            yield from runs(panels, _SEGMENT_STEPS, segment, explain, show, box_t)

        def on_upload(upload) -> dict[Component, Any]:
            try:
                rgb = uploaded_rgb(upload)
            except views.InputError as exc:  # the broken preview goes; the reason stays
                return {image: None, image_error: _error_html(str(exc))}
            suffix = Path(str(upload.get("orig_name") or upload.get("path") or "")).suffix.lower()
            # A TIFF (or another format browsers don't draw) is shown as what the backend will see.
            return {image_error: "", **({} if suffix in _BROWSER_FORMATS else {image: rgb})}

        image_inputs = [image, prompt, box, text, labels]
        run_events = [started(trigger, panels).then(on_run, image_inputs, panels.outputs(), preprocess=False,
                                                    show_progress="minimal", show_progress_on=[panels.progress])
                      for trigger in (run.click, prompt.submit)]
        image.upload(on_upload, [image], [image, image_error], preprocess=False, show_progress="hidden")
        for changed in (image.change, prompt.change, box.change, text.change):
            changed(lambda: {**panels.nothing_shown("Inputs changed: press Run to segment and explain them."),
                             **panels.busy(False)},
                    None, panels.outputs(), show_progress="hidden", cancels=run_events, queue=False)
        labels.change(redraw, [labels, panels.state], [panels.overlay], show_progress="hidden")

        # -- events: Label Studio task --
        def on_load_task(tid, proj, text_prompt, use, box_t, text_t, show) -> Updates:
            loaded: dict[str, views.TaskView] = {}

            def segment() -> views.Segmentation:
                loaded["task"] = views.load_task(client, tid, proj)
                return loaded["task"].stored

            def explain() -> tuple[views.Segmentation, views.ExplanationView]:
                return views.explain_task(client, tid, proj, text_prompt, box_t, text_t, use, loaded["task"].rgb)

            yield from runs(task_panels, _LOAD_STEPS, segment, explain, show, None if use else box_t)

        def on_run_task(tid, proj, text_prompt, use, box_t, text_t, show, shown) -> Updates:
            def segment() -> views.Segmentation:
                return views.segment_task(client, tid, proj, text_prompt, box_t, text_t, use,
                                          views.task_image_on_show(shown, tid, proj))

            def explain() -> tuple[views.Segmentation, views.ExplanationView]:
                return views.explain_task(client, tid, proj, text_prompt, box_t, text_t, use,
                                          views.task_image_on_show(shown, tid, proj))

            yield from runs(task_panels, _SEGMENT_STEPS, segment, explain, show, None if use else box_t)

        task_form = [task_id, project, task_prompt, use_project, task_box, task_text, task_labels]
        # The steps are written on the progress line; Gradio adds only its timer there ("minimal").
        task_progress: dict[str, Any] = {"show_progress": "minimal", "show_progress_on": [task_panels.progress]}
        task_events = [started(trigger, task_panels).then(on_load_task, task_form, task_panels.outputs(),
                                                          **task_progress)
                       for trigger in (load.click, task_id.submit)]
        task_events.append(started(task_run.click, task_panels).then(
            on_run_task, [*task_form, task_panels.state], task_panels.outputs(), **task_progress))
        # .input, not .change: the deep link fills the task fields itself and must not clear what it loads.
        for edited in (task_id, project, task_prompt):
            edited.input(lambda: {**task_panels.nothing_shown("Inputs changed: press Load or Run."),
                                  **task_panels.busy(False)},
                         None, task_panels.outputs(), show_progress="hidden", cancels=task_events, queue=False)
        for moved in (use_project, task_box, task_text):
            moved.input(lambda: {**task_panels.nothing_shown("Settings changed: press Run to segment and explain."),
                                 **task_panels.busy(False)},
                        None, task_panels.outputs(), show_progress="hidden", cancels=task_events, queue=False)
        task_labels.change(redraw, [task_labels, task_panels.state], [task_panels.overlay], show_progress="hidden")

        # -- deep link: /?task=ID&project=P opens the task tab, loads the task and explains it --
        # Two steps: switching tabs re-renders the tab's components, which would lose the end of a
        # slow event that also fills them (they'd spin forever).
        @shown_errors
        def open_link(request: gr.Request):
            query = dict(request.query_params) if request is not None else {}
            try:
                link = views.deep_link(query)
            except views.InputError:  # ?task=abc: shown as typed; loading it says what is wrong, in the panel
                return [gr.Tabs(selected="task"), str(query.get("task")), str(query.get("project") or "")]
            if link is None:
                return [gr.skip()] * 3
            return [gr.Tabs(selected="task"), str(link[0]), link[1]]

        def explain_link(tid, proj, text_prompt, use, box_t, text_t, show) -> Updates:
            if not str(tid or "").strip():  # no ?task=: nothing to load
                yield {task_panels.progress: gr.skip()}
                return
            yield from on_load_task(tid, proj, text_prompt, use, box_t, text_t, show)

        # -- events: jobs; the timer runs only while the Jobs tab is on show --
        def on_jobs(proj):
            view = jobs_view.jobs_view(client, proj)
            return view.html, view.status

        @shown_errors
        def on_cancel(proj, event: gr.EventData):
            job_id = _clicked_job(event)
            if job_id is None:
                return [gr.skip()] * 3
            return [jobs_view.cancel_job(client, job_id), *on_jobs(proj)]

        jobs_outputs = [jobs.listing, jobs.status]
        jobs.refresh.click(on_jobs, [jobs.project], jobs_outputs)
        jobs.project.submit(on_jobs, [jobs.project], jobs_outputs)
        jobs.timer.tick(on_jobs, [jobs.project], jobs_outputs, show_progress="hidden")
        jobs.listing.click(on_cancel, [jobs.project], [jobs.message, *jobs_outputs])
        jobs_tab.select(lambda proj: [gr.Timer(active=True), *on_jobs(proj)], [jobs.project],
                        [jobs.timer, *jobs_outputs])
        for other in (image_tab, task_tab):
            other.select(lambda: gr.Timer(active=False), None, [jobs.timer])

        demo.load(open_link, None, [tabs, task_id, project], show_progress="hidden").success(
            explain_link, task_form, task_panels.outputs(), **task_progress)
    return demo


def main() -> None:
    logging.basicConfig(level=os.getenv("LOG_LEVEL", "INFO").upper(),
                        format="[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s")
    try:
        settings, client = UISettings.from_env(), BackendClient.from_env()
    except ValueError as exc:  # a bad setting: one line that names it, not a traceback
        raise SystemExit(f"explain_ui: {exc}") from None
    logger.info("explain UI on http://%s:%d, backend %s", settings.host, settings.port, client.base_url)
    build_demo(client, settings).queue().launch(server_name=settings.host, server_port=settings.port,
                                                 auth=settings.auth)
