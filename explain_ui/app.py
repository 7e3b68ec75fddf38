"""The explain page's Gradio layout and event wiring (the logic lives in ``explain_ui.views``).

    python -m explain_ui        # BACKEND_URL, EXPLAIN_UI_HOST / EXPLAIN_UI_PORT, EXPLAIN_UI_AUTH

Two tabs with the same three panels (Input, Output, Explanation): an uploaded image, or a Label
Studio task (``/?task=ID&project=P`` opens that task and explains it on load; ``&region=R``, as in
the backend's "Why this mask" links, shows that region's explanation first); and a Jobs tab with the
backend's background prediction jobs as progress bars that refresh themselves while it is on show.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import gradio as gr
from gradio.components import Component

from backend.config import EngineConfig

from . import jobs_view, region_link, views
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


def shown_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Bad input and backend failures become a gr.Error with their message (never a stack trace)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (views.InputError, BackendError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:  # a bug of ours: logged here, summarised there
            logger.exception("explain UI: %s failed", fn.__name__)
            raise gr.Error(f"The explain UI failed ({type(exc).__name__}: {exc}); see its log.",
                           print_exception=False) from None

    return wrapper


# -- layout ----------------------------------------------------------------------------------------------
@dataclass
class Panels:
    """The Output and Explanation panels of one tab."""

    overlay: gr.Image
    masks: gr.Gallery
    summary: gr.Markdown
    explain: gr.Button
    status: gr.Markdown
    encoder_heatmaps: gr.Gallery
    encoder_overlays: gr.Gallery
    decoder_maps: gr.Gallery
    mask_looks: gr.Gallery
    grounding: gr.HTML
    legend: gr.HTML
    state: gr.State  # the Segmentation on show, redrawn when the labels toggle changes

    def segmentation_outputs(self) -> list[Component]:
        return [self.overlay, self.masks, self.summary, self.state]

    def explanation_outputs(self) -> list[Component]:
        return [self.status, self.encoder_heatmaps, self.encoder_overlays, self.decoder_maps, self.mask_looks,
                self.grounding, self.legend]


def _output_and_explanation(prefix: str) -> Panels:
    with gr.Column(scale=1):
        gr.Markdown("### Output")
        overlay = gr.Image(label="Segmented image", type="numpy", interactive=False, elem_id=f"{prefix}-output")
        masks = gr.Gallery(label="Masks", columns=4, height=220, elem_id=f"{prefix}-masks")
        summary = gr.Markdown(elem_id=f"{prefix}-summary")
    with gr.Column(scale=2):
        gr.Markdown("### Explanation")
        explain = gr.Button("Explain Segmentation", variant="secondary", elem_id=f"{prefix}-explain")
        status = gr.Markdown(elem_id=f"{prefix}-explain-status")
        with gr.Row():
            encoder_heatmaps = gr.Gallery(label="Encoder attention received: heatmaps (global blocks, last layer)",
                                          columns=4, height=220, elem_id=f"{prefix}-encoder-heatmaps")
            encoder_overlays = gr.Gallery(label="Encoder attention received: overlays", columns=4, height=220,
                                          elem_id=f"{prefix}-encoder-overlays")
        with gr.Row():
            decoder_maps = gr.Gallery(label="Mask decoder: where each mask's token looked", columns=4, height=220,
                                      elem_id=f"{prefix}-decoder-maps")
            mask_looks = gr.Gallery(label="Encoder: where each mask's own tokens look", columns=4, height=220,
                                    elem_id=f"{prefix}-mask-looks")
        with gr.Row():
            with gr.Column():
                gr.Markdown("**Why this label** (Grounding DINO's score of each prompt word, per mask)")
                grounding = gr.HTML(elem_id=f"{prefix}-grounding")
            with gr.Column():
                gr.Markdown("**Legend**")
                legend = gr.HTML(elem_id=f"{prefix}-legend")
    return Panels(overlay, masks, summary, explain, status, encoder_heatmaps, encoder_overlays, decoder_maps,
                  mask_looks, grounding, legend, gr.State())


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
    box = gr.Slider(0.0, 1.0, value=settings.box_threshold, step=0.01, label="Segmentation strength",
                    info="box threshold: lower finds more (and weaker) objects", elem_id=f"{prefix}-box")
    text = gr.Slider(0.0, 1.0, value=settings.text_threshold, step=0.01, label="Text strength",
                     info="text threshold: how strongly a box must match the prompt's words", elem_id=f"{prefix}-text")
    return box, text


# -- what the events return ----------------------------------------------------------------------------------
def segmentation_values(result: views.Segmentation, show_labels: bool) -> list[Any]:
    return [result.overlay(show_labels), result.mask_gallery(), result.summary, result]


def explanation_values(view: views.ExplanationView) -> list[Any]:
    if view.encoder_reason:
        gr.Warning(f"Encoder attention maps are unavailable: {view.encoder_reason}")
    return [view.status, view.encoder_heatmaps, view.encoder_overlays, view.decoder_maps, view.mask_looks,
            view.grounding_html, view.legend_html]


def redraw(show_labels: bool, result: views.Segmentation | None) -> Any:
    """The labels toggle: redraw what is on show (no backend call)."""
    return result.overlay(show_labels) if result is not None else gr.skip()


def build_demo(client: BackendClient | None = None, settings: UISettings | None = None) -> gr.Blocks:
    """The whole page. ``client`` talks to the backend (default: from BACKEND_URL / BASIC_AUTH_*)."""
    client = client or BackendClient.from_env()
    settings = settings or UISettings()

    # No usage analytics: an annotation tool on an internal network should not phone home.
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}\nGrounding DINO finds what the prompt names, SAM cuts it out; "
                    "**Explain Segmentation** shows where SAM's attention went and why each label was chosen.")
        with gr.Tabs(selected="image") as tabs:
            # -- an uploaded image --
            with gr.Tab("Image", id="image") as image_tab:
                with gr.Row():
                    with gr.Column(scale=1):
                        gr.Markdown("### Input")
                        image = gr.Image(label="Image", type="numpy", sources=["upload", "clipboard"],
                                         elem_id="image-input")
                        prompt = gr.Textbox(label="Text prompt", placeholder="cat . dog", elem_id="image-prompt")
                        box, text = _thresholds(settings, "image")
                        labels = gr.Checkbox(True, label="Print the prompt/label text on the output",
                                             elem_id="image-labels")
                        run = gr.Button("Run Segmentation", variant="primary", elem_id="image-run")
                    panels = _output_and_explanation("image")

            # -- a Label Studio task --
            with gr.Tab("Label Studio task", id="task") as task_tab:
                # A "Why this mask" link's region: its explanation first, above the panels.
                region = gr.HTML(elem_id="task-region", visible=False)
                link_region = gr.State(None)  # the link's ?region=, for the deep link's second step
                with gr.Row():
                    with gr.Column(scale=1):
                        gr.Markdown("### Input")
                        task_id = gr.Textbox(label="Task ID", placeholder="12", elem_id="task-id")
                        project = gr.Textbox(label="Project (optional)", placeholder="3", elem_id="task-project")
                        load = gr.Button("Load task", elem_id="task-load")
                        task_prompt = gr.Textbox(label="Text prompt (empty: the project's labels or prompt)",
                                                 elem_id="task-prompt")
                        use_project = gr.Checkbox(True, label="Use the project's thresholds (ignore the sliders)",
                                                  elem_id="task-use-project")
                        task_box, task_text = _thresholds(settings, "task")
                        task_labels = gr.Checkbox(True, label="Print the prompt/label text on the output",
                                                  elem_id="task-labels")
                        task_run = gr.Button("Run Segmentation", variant="primary", elem_id="task-run")
                    task_panels = _output_and_explanation("task")

            # -- background prediction jobs --
            with gr.Tab("Jobs", id="jobs") as jobs_tab:
                jobs = _jobs_panel()

        # -- events: uploaded image --
        @shown_errors
        def on_segment(img, text_prompt, box_t, text_t, show, progress=gr.Progress()):
            result = views.segment_image(client, img, text_prompt, box_t, text_t, progress)
            return segmentation_values(result, show)

        @shown_errors
        def on_explain(img, text_prompt, box_t, text_t, show, progress=gr.Progress()):
            result, view = views.explain_image(client, img, text_prompt, box_t, text_t, progress)
            return segmentation_values(result, show) + explanation_values(view)

        image_inputs = [image, prompt, box, text, labels]
        run.click(on_segment, image_inputs, panels.segmentation_outputs())
        prompt.submit(on_segment, image_inputs, panels.segmentation_outputs())
        panels.explain.click(on_explain, image_inputs,
                             panels.segmentation_outputs() + panels.explanation_outputs())
        labels.change(redraw, [labels, panels.state], [panels.overlay])

        # -- events: Label Studio task --
        def loaded_values(view: views.TaskView, show: bool) -> list[Any]:
            return segmentation_values(view.stored, show) + explanation_values(views.ExplanationView())

        @shown_errors
        def on_load_task(tid, proj, show, progress=gr.Progress()):
            return loaded_values(views.load_task(client, tid, proj, progress), show)

        @shown_errors
        def on_segment_task(tid, proj, text_prompt, use, box_t, text_t, show, state, progress=gr.Progress()):
            result = views.segment_task(client, tid, proj, text_prompt, box_t, text_t, use,
                                        views.task_image_on_show(state, tid, proj), progress)
            return segmentation_values(result, show)

        @shown_errors
        def on_explain_task(tid, proj, text_prompt, use, box_t, text_t, show, state, progress=gr.Progress()):
            result, view = views.explain_task(client, tid, proj, text_prompt, box_t, text_t, use,
                                              views.task_image_on_show(state, tid, proj), progress)
            return segmentation_values(result, show) + explanation_values(view)

        task_inputs = [task_id, project, task_prompt, use_project, task_box, task_text, task_labels,
                       task_panels.state]
        all_task_outputs = task_panels.segmentation_outputs() + task_panels.explanation_outputs()
        load.click(on_load_task, [task_id, project, task_labels], all_task_outputs)
        task_id.submit(on_load_task, [task_id, project, task_labels], all_task_outputs)
        task_run.click(on_segment_task, task_inputs, task_panels.segmentation_outputs())
        task_panels.explain.click(on_explain_task, task_inputs, all_task_outputs)
        task_labels.change(redraw, [task_labels, task_panels.state], [task_panels.overlay])
        for new_masks in (load.click, task_id.submit, task_run.click, task_panels.explain.click):
            new_masks(lambda: gr.HTML(visible=False), None, [region])  # it was about the masks of the link

        # -- deep link: /?task=ID&project=P opens the task tab, loads the task and explains it --
        # Two steps: switching tabs re-renders the tab's components, which would lose the end of a
        # slow event that also fills them (they'd spin forever).
        @shown_errors
        def open_link(request: gr.Request):
            link = views.deep_link(dict(request.query_params)) if request is not None else None
            if link is None:
                return [gr.skip()] * 4
            return [gr.Tabs(selected="task"), str(link.task_id), link.project, link.region]

        def focused(values: list[Any], focus: region_link.RegionFocus | None, shown: views.Segmentation,
                    explanation: views.ExplanationView | None) -> list[Any]:
            """The deep link's outputs with its region's block, and that mask selected in the gallery."""
            if focus is not None and focus.index is not None:
                masks = all_task_outputs.index(task_panels.masks)
                values[masks] = gr.Gallery(value=values[masks], selected_index=focus.index)
            block = region_link.region_html(focus, shown, explanation)
            return [*values, gr.HTML(block, visible=bool(block))]

        @shown_errors
        def explain_link(tid, proj, region_value, show, progress=gr.Progress()):
            if not str(tid or "").strip():
                return [gr.skip()] * (len(all_task_outputs) + 1)
            view = views.load_task(client, tid, proj, progress)
            try:
                result, explanation = views.explain_task(client, tid, proj, None, None, None, True, view.rgb,
                                                         progress)
            except BackendError as exc:  # keep the stored prediction on show, say why there is no explanation
                gr.Warning(f"Task {view.task_id} loaded, but explaining it failed: {exc}")
                focus = region_link.region_first(region_value, view.stored, view.predictions)
                return focused(loaded_values(view, show), focus, view.stored, None)
            focus = region_link.region_first(region_value, result, view.predictions)
            return focused(segmentation_values(result, show) + explanation_values(explanation), focus, result,
                           explanation)

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

        demo.load(open_link, None, [tabs, task_id, project, link_region]).success(
            explain_link, [task_id, project, link_region, task_labels], [*all_task_outputs, region]).success(
            None, None, None, js=region_link.SCROLL_JS)
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
