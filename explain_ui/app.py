"""The explain page: its tabs and event wiring (panels in ``explain_ui.panels``, logic in ``explain_ui.views``).

    python -m explain_ui        # BACKEND_URL, EXPLAIN_UI_HOST / EXPLAIN_UI_PORT, EXPLAIN_UI_AUTH

Two tabs with the same three panels (Input, Output, Explanation): an uploaded image, or a Label
Studio task (``/?task=ID&project=P`` opens that task and explains it on load; ``&region=R``, as in
the backend's "Why this mask" links, shows that region's explanation first); and a Jobs tab with the
backend's background prediction jobs as progress bars that refresh themselves while it is on show.

What is on show always belongs together: Run segments and then explains at once (a cache hit on the
backend), and any change of the inputs clears the Output and Explanation panels (never those of a run
started after the change was sent: ``explain_ui.run_order``). Each panel has one lasting error line,
cleared by the next success, instead of pop-ups; one progress line per tab names the stage. Pictures
are HTML grids (alt text, whole captions, as many columns as fit).
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import gradio as gr
import numpy as np
from gradio.components import Component

from backend.config import EngineConfig

from . import jobs_view, region_link, views
from .client import BackendClient, BackendError
from .panels import (
    BROWSER_FORMATS,
    CSS,
    EXAMPLES,
    LOAD_STEPS,
    SCROLL_JS,
    SEGMENT_STEPS,
    THEME,
    UPLOAD_GUARD_JS,
    Panels,
    error_html,
    error_line,
    example_photos,
    masks_html,
    output_and_explanation,
    redraw,
    same_masks,
    step_html,
    uploaded_rgb,
)
from .run_order import RunOrder, changed_js, started_js

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
        order = RunOrder()  # the newest run each page started on each tab
        # The count of runs a tab's page had started, sent by the run and change events (their js fills it).
        run_count = gr.Number(visible=False, precision=0)
        gr.Markdown(f"## {TITLE}\nGrounding DINO finds what the prompt names, SAM cuts it out, and the "
                    "Explanation panel shows where SAM's attention went and why each label was chosen.")
        with gr.Tabs(selected="image") as tabs:
            # -- an uploaded image --
            with gr.Tab("Image", id="image") as image_tab:
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        gr.Markdown("### Input")
                        image_error = error_line("image-input-error", UPLOAD_GUARD_JS)
                        image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                                         elem_id="image-input")
                        prompt = gr.Textbox(label="Text prompt", placeholder="cat . dog", elem_id="image-prompt")
                        box, text = _thresholds(settings, "image")
                        labels = gr.Checkbox(True, label="Print the prompt/label text on the output",
                                             elem_id="image-labels")
                        run = gr.Button("Run segmentation and explain", variant="primary", elem_id="image-run")
                        gr.Examples(example_photos(), [image, prompt], label="Examples (scikit-image photos)",
                                    example_labels=[f"{name}: {p}" for name, p in EXAMPLES])
                    panels = output_and_explanation("image", image_error, (run,))

            # -- a Label Studio task --
            with gr.Tab("Label Studio task", id="task") as task_tab:
                # A "Why this mask" link's region: its explanation first, above the panels.
                region = gr.HTML(elem_id="task-region", visible=False)
                link_region = gr.State(None)  # the link's ?region=, for the deep link's second step
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        gr.Markdown("### Input")
                        task_error = error_line("task-input-error")
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
                    task_panels = output_and_explanation("task", task_error, (load, task_run))

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
            # Every step turns the buttons off again: a change sent just before Run that the server
            # answered before it heard of the run (so run_order could not leave it out) but that
            # reached the page late would have turned them on.
            busy = panels.busy(True)
            yield {**busy, **panels.no_explanation(), panels.progress: step_html(1, steps[0])}
            done = panels.busy(False)
            try:
                result = segment()
                shown = panels.segmentation(result, show, box_t)
            except views.InputError as exc:
                yield {**done, panels.progress: "", panels.input_error: error_html(str(exc))}
                return
            except Exception as exc:
                yield {**done, **panels.nothing_shown(), panels.input_error: "",
                       panels.output_error: error_html(_failure(exc, "segment"))}
                return
            yield {**busy, panels.input_error: "", **shown, panels.progress: step_html(2, steps[1])}
            try:
                explained, view = explain()
                shown = {} if same_masks(result, explained) else panels.segmentation(explained, show, box_t)
                shown |= panels.explanation(view)
            except Exception as exc:
                yield {**done, panels.progress: "", panels.explain_error: error_html(_failure(exc, "explain"))}
                return
            yield {**done, **shown, panels.progress: f"<p>Done in {time.monotonic() - started:.1f} s.</p>"}

        def started(trigger: Callable[..., Any], panels: Panels, tab: str) -> Any:
            """The buttons off before the run is queued (a click during the run does nothing), on a
            phone the Output panel scrolled into view, and the run's number noted (``run_order``)."""
            scroll = SCROLL_JS.replace("{id}", panels.progress.elem_id or "")

            def start(run: float | None, request: gr.Request) -> dict[Component, Any]:
                order.started(request.session_hash, tab, run)
                return panels.busy(True)

            return trigger(start, [run_count], list(panels.buttons), queue=False, show_progress="hidden",
                           js=started_js(tab, scroll))

        def on_change(trigger: Callable[..., Any], panels: Panels, tab: str, note: str, runs: list[Any],
                      hidden: tuple[gr.HTML, ...] = ()) -> None:
            """An input's change: what is on show no longer matches the inputs, so it goes (with the tab's
            ``hidden`` blocks about it, e.g. a link's region), the buttons come on and the tab's ``runs`` in
            progress stop; unless a run started after the change was sent, whose progress, masks and busy
            buttons this older answer must leave alone (``run_order``)."""

            def clear(runs_before: float | None, request: gr.Request) -> Any:
                if order.overtaken(request.session_hash, tab, runs_before):
                    return gr.skip()
                return {**panels.nothing_shown(note), **panels.busy(False),
                        **{block: gr.HTML(visible=False) for block in hidden}}

            # The cancel is a listener of its own, before the clear: the page sends one trigger's listeners
            # in turn, each after the one before was answered, so a cancel after the clear (``cancels=`` on
            # it) would wait for the clear's answer and, were that late, stop a run started after the change.
            trigger(None, None, None, cancels=runs, queue=False, show_progress="hidden")
            trigger(clear, [run_count], [*panels.outputs(), *hidden], show_progress="hidden", queue=False,
                    js=changed_js(tab))

        # -- events: uploaded image --
        def on_run(upload, text_prompt, box_t, text_t, show) -> Updates:
            state: dict[str, np.ndarray] = {}

            def segment() -> views.Segmentation:
                state["rgb"] = uploaded_rgb(upload)
                return views.segment_image(client, state["rgb"], text_prompt, box_t, text_t)

            def explain() -> tuple[views.Segmentation, views.ExplanationView]:
                return views.explain_image(client, state["rgb"], text_prompt, box_t, text_t)

            yield from runs(panels, SEGMENT_STEPS, segment, explain, show, box_t)

        def on_upload(upload) -> dict[Component, Any]:
            try:
                rgb = uploaded_rgb(upload)
            except views.InputError as exc:  # the broken preview goes; the reason stays
                return {image: None, image_error: error_html(str(exc))}
            suffix = Path(str(upload.get("orig_name") or upload.get("path") or "")).suffix.lower()
            # A TIFF (or another format browsers don't draw) is shown as what the backend will see.
            return {image_error: "", **({} if suffix in BROWSER_FORMATS else {image: rgb})}

        image_inputs = [image, prompt, box, text, labels]
        run_events = [started(trigger, panels, "image").then(
            on_run, image_inputs, panels.outputs(), preprocess=False, show_progress="minimal",
            show_progress_on=[panels.progress]) for trigger in (run.click, prompt.submit)]
        image.upload(on_upload, [image], [image, image_error], preprocess=False, show_progress="hidden")
        for changed in (image.change, prompt.change, box.change, text.change):
            on_change(changed, panels, "image", "Press Run to segment and explain.", run_events)
        labels.change(redraw, [labels, panels.state], [panels.overlay], show_progress="hidden")

        # -- events: Label Studio task --
        def on_load_task(tid, proj, text_prompt, use, box_t, text_t, show) -> Updates:
            loaded: dict[str, views.TaskView] = {}

            def segment() -> views.Segmentation:
                loaded["task"] = views.load_task(client, tid, proj)
                return loaded["task"].stored

            def explain() -> tuple[views.Segmentation, views.ExplanationView]:
                return views.explain_task(client, tid, proj, text_prompt, box_t, text_t, use, loaded["task"].rgb)

            yield from runs(task_panels, LOAD_STEPS, segment, explain, show, None if use else box_t)

        def on_run_task(tid, proj, text_prompt, use, box_t, text_t, show, shown) -> Updates:
            def segment() -> views.Segmentation:
                return views.segment_task(client, tid, proj, text_prompt, box_t, text_t, use,
                                          views.task_image_on_show(shown, tid, proj))

            def explain() -> tuple[views.Segmentation, views.ExplanationView]:
                return views.explain_task(client, tid, proj, text_prompt, box_t, text_t, use,
                                          views.task_image_on_show(shown, tid, proj))

            yield from runs(task_panels, SEGMENT_STEPS, segment, explain, show, None if use else box_t)

        # -- deep link: /?task=ID&project=P opens the task tab, loads the task and explains it --
        # Two steps: switching tabs re-renders the tab's components, which would lose the end of a
        # slow event that also fills them (they'd spin forever).
        @shown_errors
        def open_link(request: gr.Request):
            query = dict(request.query_params) if request is not None else {}
            try:
                link = views.deep_link(query)
            except views.InputError:  # ?task=abc: shown as typed; loading it says what is wrong, in the panel
                return [gr.Tabs(selected="task"), str(query.get("task")), str(query.get("project") or ""), None]
            if link is None:
                return [gr.skip()] * 4
            return [gr.Tabs(selected="task"), str(link.task_id), link.project, link.region]

        def explain_link(tid, proj, region_value, text_prompt, use, box_t, text_t, show) -> Updates:
            """The deep link's second step: load and explain the task as "Load task and explain" does,
            then show the link's region first (its block above the panels, its mask marked)."""
            if not str(tid or "").strip():  # no ?task=: nothing to load
                yield {task_panels.progress: gr.skip()}
                return
            loaded: dict[str, Any] = {}

            def segment() -> views.Segmentation:
                loaded["task"] = views.load_task(client, tid, proj)
                return loaded["task"].stored

            def explain() -> tuple[views.Segmentation, views.ExplanationView]:
                loaded["explained"] = views.explain_task(client, tid, proj, text_prompt, box_t, text_t, use,
                                                         loaded["task"].rgb)
                return loaded["explained"]

            yield from runs(task_panels, LOAD_STEPS, segment, explain, show, None if use else box_t)
            if "task" not in loaded:  # the task itself failed to load: its error line says why
                return
            task: views.TaskView = loaded["task"]
            # Without an explanation (it failed: the Explanation panel says why) the stored masks stay on show.
            shown, explanation = loaded.get("explained", (task.stored, None))
            focus = region_link.region_first(region_value, shown, task.predictions)
            block = region_link.region_html(focus, shown, explanation)
            update: dict[Component, Any] = {region: gr.HTML(block, visible=bool(block))}
            if focus is not None and focus.index is not None:
                update[task_panels.masks] = masks_html(shown, selected=focus.index)
            yield update

        task_form = [task_id, project, task_prompt, use_project, task_box, task_text, task_labels]
        # The steps are written on the progress line; Gradio adds only its timer there ("minimal").
        task_progress: dict[str, Any] = {"show_progress": "minimal", "show_progress_on": [task_panels.progress]}
        task_events = [started(trigger, task_panels, "task").then(on_load_task, task_form, task_panels.outputs(),
                                                                  **task_progress)
                       for trigger in (load.click, task_id.submit)]
        task_events.append(started(task_run.click, task_panels, "task").then(
            on_run_task, [*task_form, task_panels.state], task_panels.outputs(), **task_progress))
        # The deep link's run is one of them: an edit while it runs stops it, as it stops Load's and Run's
        # (registered before the edits' cancels, which take the runs there are when they are made).
        link_run = demo.load(open_link, None, [tabs, task_id, project, link_region], show_progress="hidden").success(
            explain_link, [task_id, project, link_region, *task_form[2:]], [*task_panels.outputs(), region],
            **task_progress)
        link_run.success(None, None, None, js=region_link.SCROLL_JS)
        task_events.append(link_run)
        # .input, not .change: the deep link fills the task fields itself and must not clear what it loads.
        task_notes = (((task_id, project, task_prompt), "Inputs changed: press Load or Run."),
                      ((use_project, task_box, task_text), "Settings changed: press Run to segment and explain."))
        for edits, note in task_notes:
            for edited in edits:
                # The link's region block was about the masks on show: it goes with them.
                on_change(edited.input, task_panels, "task", note, task_events, hidden=(region,))
        task_labels.change(redraw, [task_labels, task_panels.state], [task_panels.overlay], show_progress="hidden")
        for new_masks in (load.click, task_id.submit, task_run.click):
            # The link's region block was about the masks the link opened.
            new_masks(lambda: gr.HTML(visible=False), None, [region], queue=False, show_progress="hidden")

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
