"""The explain page's pieces of HTML: pictures with alt text and whole captions, figure grids, score bars
and the heatmaps' colour legend. Plain functions of images and the backend's JSON, so they are
tested without a browser; views.py and region_link.py build the panels from them."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image


def score_bar(name: str, score: float, strongest: bool) -> str:
    width = max(0.0, min(1.0, float(score))) * 100
    colour = "#c2410c" if strongest else "#3b6ea5"  # both >= 4.5:1 on white, as the text beside them
    # The word wraps rather than being cut: a long prompt word is still read whole.
    return (f'<div class="bar" style="display:flex;align-items:center;gap:6px;margin:2px 0">'
            f'<span style="flex:0 1 9em;min-width:0;overflow-wrap:anywhere">{html.escape(name)}</span>'
            f'<span role="img" aria-label="{html.escape(name)} {float(score):.2f}" '
            f'style="flex:1 1 4em;background:#e5e7eb;height:12px;border-radius:3px">'
            f'<span style="display:block;width:{width:.1f}%;height:100%;background:{colour};border-radius:3px">'
            f'</span></span>'
            f'<span style="flex:0 0 3em;text-align:right">{float(score):.2f}</span></div>')


def grounding_html(masks: Sequence[Mapping[str, Any]]) -> str:
    """Per mask (the backend's ``segments``): Grounding DINO's score of every prompt token (bars), then
    the per-phrase scores."""
    if not masks:
        return "<p>No masks: nothing to ground.</p>"
    parts = []
    for j, mask in enumerate(masks):
        tokens = [(str(g["token"]), float(g["score"])) for g in mask.get("token_scores") or []]
        top = max((s for _, s in tokens), default=None)
        head = (f"#{j + 1} {html.escape(str(mask.get('label', '')))} · score "
                f"{float(mask.get('score', 0)):.2f} · IoU {float(mask.get('predicted_iou', 0)):.2f}")
        bars = "".join(score_bar(token, score, score == top) for token, score in tokens) or "<p>(no token scores)</p>"
        phrase_scores = (mask.get("phrase_scores") or {}).items()
        phrases = ", ".join(f"{html.escape(str(k))} {float(v):.2f}" for k, v in phrase_scores)
        parts.append(f'<div class="grounding-mask" style="margin-bottom:10px"><b>{head}</b>{bars}'
                     + (f"<small>phrase scores: {phrases}</small>" if phrases else "") + "</div>")
    return "".join(parts)


def _gradient(colormap: str) -> str:
    try:
        import matplotlib

        cmap = matplotlib.colormaps[colormap]
        stops = [cmap(x / 8) for x in range(9)]
        return ", ".join(f"rgb({r * 255:.0f},{g * 255:.0f},{b * 255:.0f})" for r, g, b, _ in stops)
    except (ImportError, KeyError):
        return "blue, red"


def legend_html(legend: Mapping[str, Any]) -> str:
    """The heatmaps' colour bar, its two ends in words, and the backend's notes on what each map means
    (shown beside the maps, so the colours are read where they are seen)."""
    if not legend:
        return ""
    colormap = str(legend.get("colormap") or "jet")
    notes = "".join(f"<li>{html.escape(str(n))}</li>" for n in legend.get("notes") or [])
    return (f'<div class="legend"><div role="img" aria-label="colour scale {html.escape(colormap)}: '
            f'{html.escape(str(legend.get("low", "low")))} to {html.escape(str(legend.get("high", "high")))}" '
            f'style="height:14px;border-radius:3px;background:linear-gradient(to right, {_gradient(colormap)})">'
            f'</div><div style="display:flex;justify-content:space-between;gap:1em">'
            f'<small>{html.escape(str(legend.get("low", "low")))}</small>'
            f'<small style="text-align:right">{html.escape(str(legend.get("high", "high")))}</small></div>'
            + (f'<details><summary>What each map shows</summary><ul>{notes}</ul></details>' if notes else "")
            + "</div>")




# -- pictures: every image with its alt text and its whole caption ------------------------------------------
def data_url(image: np.ndarray | bytes | str, max_side: int | None = None) -> str:
    """An image for an ``<img src>``: a numpy RGB array becomes a JPEG data URL (scaled down to
    ``max_side`` when given); PNG/JPEG bytes become a data URL; a string is taken as a URL already."""
    if isinstance(image, str):
        return image
    if isinstance(image, bytes):
        kind = "png" if image.startswith(b"\x89PNG") else "jpeg"
        return f"data:image/{kind};base64,{base64.b64encode(image).decode('ascii')}"
    picture = Image.fromarray(np.ascontiguousarray(image))
    if max_side is not None and max(picture.size) > max_side:
        picture.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=90)
    return f"data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def picture_html(image: np.ndarray | None, alt: str) -> str:
    """One image at the panel's width (never wider), with alt text; empty when there is none."""
    if image is None:
        return ""
    return f'<img class="picture" src="{data_url(image)}" alt="{html.escape(alt)}">'


def figure_grid_html(title: str, items: Sequence[tuple[Any, str]], kind: str, max_side: int | None = None,
                     selected: int | None = None) -> str:
    """A titled grid of images, each with its whole caption under it: as many columns as fit the
    panel (one on a narrow phone), so no image or caption is off screen or cut.

    Arguments:
        title: the grid's heading (what the maps are).
        items: (image, caption) pairs; images as ``data_url`` takes them.
        kind: what one image is, for its alt text ("Encoder heatmap" -> alt "Encoder heatmap: block 3 ...").
        max_side: scale images down to this many pixels on the long side (None: as given).
        selected: the index of the item to mark (a deep link's region): outlined, ``aria-current``.
    Returns:
        HTML, or "" when there are no items (the grid disappears).
    """
    if not items:
        return ""
    figures = "".join(
        ('<figure class="selected" aria-current="true">' if index == selected else "<figure>")
        + f'<img src="{data_url(image, max_side)}" alt="{html.escape(f"{kind}: {caption}")}">'
        f'<figcaption>{html.escape(caption)}</figcaption></figure>' for index, (image, caption) in enumerate(items))
    return f'<section class="figure-grid"><h4>{html.escape(title)}</h4><div class="figures">{figures}</div></section>'
