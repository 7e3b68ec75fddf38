"""The explain page's Output and Explanation panels: their layout, look (theme and CSS: contrast,
grids that fit any width) and what events write into them, plus the inputs the page checks itself
(uploads) and its scikit-image examples. ``explain_ui/app.py`` wires events to these.
"""

from __future__ import annotations

import html
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio.components import Component
from PIL import Image

from backend.images import ImageError, load_rgb, working_size

from . import html_parts, views

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
.figure-grid figure.selected { outline: 3px solid #c2410c; outline-offset: 2px; border-radius: 4px; }
.figure-grid img, img.picture { display: block; max-width: 100%; max-height: 70vh; width: auto; height: auto;
  border-radius: 4px; }
.figure-grid img { max-height: 40vh; }
.figure-grid figcaption { font-size: var(--text-sm); line-height: 1.3; white-space: normal;
  overflow-wrap: anywhere; margin-top: 2px; }
.panel-error p { color: #b91c1c; margin: 4px 0; }
.panel-error p, .output-column .prose { overflow-wrap: anywhere; }  /* long URLs and versions wrap */
.dark .panel-error p { color: #fca5a5; }
.progress-line { min-height: 2.2em; }
/* The progress line is the page's own: a run's failures go to its panel's error line. Gradio's bare
   "Error" badge there only says that a run was stopped as it ended (an input edited during it): no text,
   so none is shown. */
.progress-line [data-testid="status-tracker"] .error,
.progress-line [data-testid="status-tracker"] .clear-status { display: none; }
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
SCROLL_JS = ("() => { const line = document.getElementById('{id}'); if (!line) return;"
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
        overlay = html_parts.picture_html(result.overlay(show_labels), alt_text(result))
        return {self.output_error: "", self.overlay: overlay,
                self.masks: masks_html(result),
                self.summary: segmentation_summary(result, box_threshold), self.state: result}

    def explanation(self, view: views.ExplanationView) -> dict[Component, Any]:
        return {
            self.explain_error: "", self.status: view.status, self.legend: view.legend_html,
            self.encoder_heatmaps: html_parts.figure_grid_html(
                "Encoder: attention each place received", view.encoder_heatmaps,
                "Encoder attention heatmap"),
            self.encoder_overlays: html_parts.figure_grid_html(
                "Encoder: the same, over the image", view.encoder_overlays, "Encoder attention overlay"),
            self.decoder_maps: html_parts.figure_grid_html(
                "Decoder: where each mask's token looked", view.decoder_maps, "Mask decoder attention"),
            self.mask_looks: html_parts.figure_grid_html(
                "Encoder, last global block: where each mask's own tokens look", view.mask_looks,
                "Mask tokens' attention"),
            self.grounding: _WHY_LABEL + view.grounding_html if view.grounding_html else "",
        }


_WHY_LABEL = "<h4>Why this label</h4><p><small>Grounding DINO's score of each prompt word, per mask</small></p>"


def masks_html(result: views.Segmentation, selected: int | None = None) -> str:
    """The Output panel's grid of mask cut-outs (already previews: ``views.MASK_PREVIEW_SIDE``), with
    mask ``selected`` marked (a deep link's region)."""
    return html_parts.figure_grid_html("Masks", result.mask_gallery(), "Mask cut-out", selected=selected)


def segmentation_summary(result: views.Segmentation, box_threshold: float | None) -> str:
    """The Output panel's text: the masks found, or what to change when there are none (markdown).
    ``box_threshold`` is the one the run used (None: the project's own)."""
    return result.summary if result.segments else f"{views.no_masks_hint(box_threshold)}  \n{result.summary}"


def alt_text(result: views.Segmentation) -> str:
    masks = ", ".join(f"#{i} {s.label} {s.score:.2f}" for i, s in enumerate(result.segments, 1))
    return f"The image with {len(result.segments)} mask(s) drawn" + (f": {masks}" if masks else "")


def error_html(message: str) -> str:
    return f'<p role="alert">&#9888; {html.escape(message)}</p>' if message else ""


def error_line(elem_id: str, js_on_load: str | None = None) -> gr.HTML:
    return gr.HTML(elem_id=elem_id, elem_classes=["panel-error", "collapse-empty"], js_on_load=js_on_load)


# The Image input refuses a file whose type isn't image/* (a PDF, a text file, one of unknown type) in
# the page itself, before any upload, with a pop-up that fades ("Invalid file type only image/*
# allowed.", or nothing at all for a drop) and no event for the server to answer. So the Input panel's
# error line (this is its js_on_load: ``props`` is its own value) catches such a file first, picked or
# dropped, and says in its lasting line which file and why; the next good upload or run clears it as
# any error of the panel. Files of an image type go on to Gradio and are checked by ``uploaded_rgb``.
UPLOAD_GUARD_JS = """
const input = '#image-input';
window.explainRefuseUpload = message => { props.value = message; };
if (!window.explainUploadGuard) {
  window.explainUploadGuard = true;
  const escape = text => String(text).replace(/[&<>"']/g, c => `&#${c.charCodeAt(0)};`);
  const refuse = (event, files) => {
    const bad = [...(files || [])].find(file => !(file.type || '').startsWith('image/'));
    if (!bad) return;
    event.stopImmediatePropagation();
    event.preventDefault();
    if (event.target instanceof HTMLInputElement) event.target.value = '';
    const kind = bad.type ? `a ${escape(bad.type)} file` : 'a file of unknown type';
    window.explainRefuseUpload(`<p role="alert">&#9888; ${escape(bad.name)} can't be used as an image: it is `
      + `${kind}, not an image. Upload a PNG, JPEG or WebP photo.</p>`);
  };
  document.addEventListener('change', event => {
    if (event.target.matches && event.target.matches(`${input} input[type=file]`)) refuse(event, event.target.files);
  }, true);
  document.addEventListener('drop', event => {
    const dropped = event.dataTransfer && event.dataTransfer.files;
    if (event.target.closest && event.target.closest(input)) refuse(event, dropped);
  }, true);
}
"""


def _shown_html(elem_id: str) -> gr.HTML:
    """An HTML output that takes no room while empty (no click handler: these are pictures and text)."""
    return gr.HTML(elem_id=elem_id, elem_classes=["collapse-empty"], js_on_load=None)


def output_and_explanation(prefix: str, input_error: gr.HTML, buttons: tuple[gr.Button, ...]) -> Panels:
    with gr.Column(scale=1, min_width=300, elem_classes=["output-column"]):
        gr.Markdown("### Output")
        progress = gr.HTML(elem_id=f"{prefix}-progress", elem_classes=["progress-line"], js_on_load=None)
        output_error = error_line(f"{prefix}-output-error")
        overlay = _shown_html(f"{prefix}-output")
        masks = _shown_html(f"{prefix}-masks")
        summary = gr.Markdown(elem_id=f"{prefix}-summary")
    with gr.Column(scale=2, min_width=300):
        gr.Markdown("### Explanation")
        explain_error = error_line(f"{prefix}-explain-error")
        status = gr.Markdown(elem_id=f"{prefix}-explain-status")
        legend = _shown_html(f"{prefix}-legend")
        encoder_heatmaps = _shown_html(f"{prefix}-encoder-heatmaps")
        encoder_overlays = _shown_html(f"{prefix}-encoder-overlays")
        decoder_maps = _shown_html(f"{prefix}-decoder-maps")
        mask_looks = _shown_html(f"{prefix}-mask-looks")
        grounding = _shown_html(f"{prefix}-grounding")
    return Panels(input_error, progress, output_error, overlay, masks, summary, explain_error, status, legend,
                  encoder_heatmaps, encoder_overlays, decoder_maps, mask_looks, grounding, gr.State(), buttons)


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


BROWSER_FORMATS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".avif", ".apng"}


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


def same_masks(shown: views.Segmentation | None, result: views.Segmentation) -> bool:
    """Whether ``result`` would draw the Output picture ``shown`` drew: masks compared at the size it is
    drawn at (``views.OVERLAY_SIDE``), not made full size for a big photo."""
    if shown is None or len(shown.segments) != len(result.segments) or shown.rgb.shape != result.rgb.shape:
        return False
    size = working_size(shown.rgb.shape[:2], views.OVERLAY_SIDE)
    return all(a.label == b.label and np.array_equal(a.mask_source.resized(*size), b.mask_source.resized(*size))
               for a, b in zip(shown.segments, result.segments, strict=True))


SEGMENT_STEPS = ("detecting and segmenting on the backend", "explaining the masks (attention maps)")
LOAD_STEPS = ("fetching the task, its image and its stored prediction", "explaining the masks (attention maps)")


def step_html(step: int, what: str) -> str:
    return f'<p class="step" aria-live="polite">Step {step} of 2: {html.escape(what)}&hellip;</p>'


def redraw(show_labels: bool, result: views.Segmentation | None) -> Any:
    """The labels toggle: redraw what is on show (no backend call)."""
    return html_parts.picture_html(result.overlay(show_labels), alt_text(result)) if result is not None else gr.skip()
