"""The explain UI's logic (explain_ui.views + client) against the real backend app.

The backend is ``backend._wsgi.create_app`` with the tiny random-weight engine, served by werkzeug
on a free port; the UI's functions reach it over HTTP exactly as the page does. Expected masks come
from the same engine called in this process. The task test drives a real Label Studio.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from backend.heatmaps import at_working_size, render_explanation
from backend.images import working_size
from explain_ui import views
from explain_ui.app import UISettings, build_demo, shown_errors
from explain_ui.client import BackendClient, BackendError
from tests.ui_servers import ThreadedBackend, free_port

PROMPT = "cat . rocket"
# Thresholds the tiny random models find boxes at; the cap keeps SAM cheap on CPU.
BOX, TEXT = 0.2, 0.2


@pytest.fixture(scope="module")
def quick_engine(engine):
    from backend.engine import Engine

    return Engine(engine.config.replace(max_detections=2), detector=engine.detector, segmenter=engine.segmenter)


@pytest.fixture(scope="module")
def backend(quick_engine):
    with ThreadedBackend(quick_engine) as server:
        yield server


@pytest.fixture
def client(backend) -> BackendClient:
    return BackendClient(backend.url)


def test_segment_fills_image_and_gallery(client, quick_engine, chelsea):
    result = views.segment_image(client, chelsea, PROMPT, BOX, TEXT)
    expected = quick_engine.segment(chelsea, ["cat", "rocket"], BOX, TEXT)
    assert len(expected) >= 1, "the tiny engine finds boxes at these thresholds"
    assert [s.label for s in result.segments] == [s.label for s in expected]
    for got, want in zip(result.segments, expected, strict=True):
        assert np.array_equal(got.mask, want.mask)
        assert got.score == pytest.approx(want.score, abs=1e-6)

    overlay = result.overlay(show_labels=True)
    assert overlay.shape == chelsea.shape and overlay.dtype == np.uint8
    inside = expected[0].mask
    assert not np.array_equal(overlay[inside], chelsea[inside]), "masks are drawn in colour"
    assert not np.array_equal(overlay, result.overlay(show_labels=False)), "the labels toggle changes the drawing"

    gallery = result.mask_gallery()
    assert len(gallery) == len(expected)
    preview = at_working_size(chelsea, views.MASK_PREVIEW_SIDE)  # cut-outs are previews: 384 px at most
    assert preview.shape[:2] == working_size(chelsea.shape[:2], views.MASK_PREVIEW_SIDE) != chelsea.shape[:2]
    for (image, caption), segment in zip(gallery, result.segments, strict=True):
        inside = segment.resized(*preview.shape[:2]).mask
        assert image.shape == preview.shape and inside.any()
        assert np.array_equal(image[inside], preview[inside]) and not np.array_equal(image[~inside], preview[~inside])
        assert segment.label in caption and f"{segment.score:.2f}" in caption
    assert "cat" in result.summary and str(len(expected)) in result.summary


def test_explain_fills_galleries_with_maps_in_the_image_aspect(client, quick_engine, chelsea):
    views.segment_image(client, chelsea, PROMPT, BOX, TEXT)  # a prediction first: explain is then cached
    result, view = views.explain_image(client, chelsea, PROMPT, BOX, TEXT)
    global_blocks = quick_engine.config.sam_arch["encoder_global_attn_indexes"]
    assert len(view.encoder_heatmaps) == len(view.encoder_overlays) == len(global_blocks)
    assert "last layer" in view.encoder_heatmaps[-1][1]
    n = len(result.segments)
    assert n >= 1
    assert len(view.decoder_maps) == 2 * n  # overlay + heatmap per mask
    body = client.explain(chelsea, PROMPT, BOX, TEXT)  # the raw JSON (cached): what the page had to show
    assert len(view.mask_looks) == sum(len(s["maps"]["token_look"]) for s in body["segments"] if s["maps"]) >= 1
    for image, _ in view.encoder_heatmaps + view.encoder_overlays + view.decoder_maps + view.mask_looks:
        # Sent at a working size (the page scales them to the display): the image's shape, never larger.
        assert image.shape == (*working_size(chelsea.shape[:2], max(image.shape[:2])), 3) and image.dtype == np.uint8
        assert max(image.shape) <= max(chelsea.shape)
        assert image.std() > 0, "a map is not a flat colour"
    heat, over = view.encoder_heatmaps[0][0], view.encoder_overlays[0][0]
    assert not np.array_equal(heat, over), "overlays blend the heatmap with the photo"
    # The page draws what the backend's own drawing of its explanation shows: the token grids crossed
    # the wire as 8-bit PNGs, so colours differ by a few levels at most, and nothing moved.
    direct = render_explanation(quick_engine.explain(chelsea, ["cat", "rocket"], BOX, TEXT), chelsea)
    pairs = [(heat, direct.encoder[0][1].heatmap), (view.encoder_overlays[-1][0], direct.encoder[-1][1].overlay),
             (view.decoder_maps[0][0], direct.masks[0].decoder.overlay),
             (view.mask_looks[0][0], direct.masks[0].token_look[0][1].overlay)]
    for drawn, reference in pairs:
        difference = np.abs(drawn.astype(int) - reference.astype(int))
        assert drawn.shape == reference.shape and difference.mean() < 1.5 and difference.max() <= 24
    assert view.encoder_reason is None
    assert "cache" in view.status.lower() and "no model ran" in view.status
    for segment in result.segments:
        assert segment.label in view.grounding_html
    assert view.grounding_html.count('class="grounding-mask"') == n
    assert "linear-gradient" in view.legend_html and "Decoder map" in view.legend_html


def test_explain_without_encoder_maps_says_why(tiny_cache, engine, chelsea):
    """MobileSAM's image encoder has no global attention: the page says so and still shows decoder maps."""
    from backend.config import EngineConfig
    from backend.engine import Engine

    mobile = Engine(EngineConfig.from_file(tiny_cache / "engine-mobilesam.json").replace(max_detections=1),
                    detector=engine.detector)
    small = chelsea[::2, ::2].copy()
    with ThreadedBackend(mobile) as server:
        _, view = views.explain_image(BackendClient(server.url), small, "cat", 0.0, 0.0)
    assert view.encoder_heatmaps == [] and view.encoder_overlays == []
    assert view.encoder_reason and "TinyViT" in view.encoder_reason
    assert "unavailable" in view.status and view.encoder_reason in view.status
    assert len(view.decoder_maps) == 2 and view.decoder_maps[0][0].shape == small.shape


# -- bad inputs -------------------------------------------------------------------------------------------------
def test_bad_inputs_say_what_is_wrong(client, chelsea):
    with pytest.raises(views.InputError, match="Upload an image"):
        views.segment_image(client, None, PROMPT, BOX, TEXT)
    with pytest.raises(views.InputError, match="Upload an image"):
        views.explain_image(client, None, PROMPT, BOX, TEXT)
    with pytest.raises(views.InputError, match="image can't be used.*no pixels"):
        views.segment_image(client, np.zeros((0, 5, 3), np.uint8), PROMPT, BOX, TEXT)
    assert views.check_image(chelsea[..., 0]).shape == chelsea.shape  # grayscale uploads become RGB
    for prompt in ("", "   ", " . ", None):
        with pytest.raises(views.InputError, match="Type a text prompt"):
            views.segment_image(client, chelsea, prompt, BOX, TEXT)
    for task in ("", "abc", "1.5", "-3", None):
        with pytest.raises(views.InputError, match="(?i)task ID"):
            views.load_task(client, task, "")
    # The backend's own message comes through (a threshold outside 0..1).
    with pytest.raises(BackendError, match="box_threshold") as info:
        views.segment_image(client, chelsea[:64, :64], PROMPT, 1.5, TEXT)
    assert info.value.status == 400
    # No Label Studio is configured for this backend: its task routes say so.
    with pytest.raises(BackendError, match="LABEL_STUDIO_URL"):
        views.load_task(client, 7, "")


def test_an_answer_in_old_names_is_refused_naming_the_field(client, chelsea):
    """A backend of another version (the old ``prompt_phrases`` / ``iou`` names) is a BackendError that
    names the missing field, not a KeyError in a view: the client parses every answer."""
    import http.server
    import json
    import threading

    small = chelsea[:64, :96]
    answer = client._json("POST", "/api/explain", image=small, json={"prompt": PROMPT, "box_threshold": BOX,
                                                                       "text_threshold": TEXT})
    answer["prompt_phrases"] = answer.pop("prompt")

    class OldBackend(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OldBackend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        old = BackendClient(f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(BackendError, match=r"POST /api/explain .*answer has no 'prompt'.*same version"):
            views.explain_image(old, small, PROMPT, BOX, TEXT)
        answer["prompt"] = answer.pop("prompt_phrases")
        for segment in answer["segments"]:
            segment["iou"] = segment.pop("predicted_iou")
        answer["segments"] = answer["segments"] or [{}]
        with pytest.raises(BackendError, match=r"answer\.segments\[0\] has no '(predicted_iou|label)'"):
            views.explain_image(old, small, PROMPT, BOX, TEXT)
    finally:
        server.shutdown()
        server.server_close()


def test_maps_that_do_not_fit_the_photo_are_a_backend_error(client, chelsea):
    small = chelsea[:64, :96]
    body = client.explain(small, PROMPT, BOX, TEXT)
    body["token_grid"]["img_size"] = 1000  # a 64-token grid can't tile it
    with pytest.raises(BackendError, match="maps that don't fit this image"):
        views._explained(body, small, views._no_progress)


def test_uploads_are_lossless_bmp_and_png_past_the_raw_limit(chelsea):
    """The page sends the very pixels it holds (a cache hit needs them), as BMP (no encoding time) up to
    RAW_UPLOAD_BYTES, then as PNG so the body stays under the backend's MAX_IMAGE_BYTES."""
    from backend.images import load_rgb
    from explain_ui.client import RAW_UPLOAD_BYTES, upload_file

    _, data, kind = upload_file(chelsea)
    assert kind == "image/bmp" and np.array_equal(load_rgb(data), chelsea)
    big = np.zeros((3000, 3000, 3), np.uint8)
    big[::7, ::3] = (255, 128, 1)
    assert big.nbytes > RAW_UPLOAD_BYTES
    _, data, kind = upload_file(big)
    assert kind == "image/png" and len(data) < RAW_UPLOAD_BYTES and np.array_equal(load_rgb(data), big)


def test_backend_down_is_a_clear_message(chelsea):
    down = BackendClient(f"http://127.0.0.1:{free_port()}", connect_timeout=2)
    with pytest.raises(BackendError, match="can't reach the backend .*BACKEND_URL"):
        views.segment_image(down, chelsea, PROMPT, BOX, TEXT)


def test_errors_reach_the_page_as_gr_error_without_a_trace(client, chelsea):
    with pytest.raises(gr.Error) as info:
        shown_errors(views.segment_image)(client, chelsea, "", BOX, TEXT)
    assert "Type a text prompt" in info.value.message and "Traceback" not in info.value.message
    down = BackendClient(f"http://127.0.0.1:{free_port()}", connect_timeout=2)
    with pytest.raises(gr.Error, match="can't reach the backend"):
        shown_errors(views.explain_image)(down, chelsea, PROMPT, BOX, TEXT)


def test_settings_and_deep_link():
    settings = UISettings.from_env({"EXPLAIN_UI_AUTH": "ann:s3cret", "EXPLAIN_UI_PORT": "7999",
                                    "BOX_THRESHOLD": "0.4"})
    assert (settings.auth, settings.port, settings.host, settings.box_threshold) == (("ann", "s3cret"), 7999,
                                                                                       "0.0.0.0", 0.4)
    with pytest.raises(ValueError, match="EXPLAIN_UI_AUTH"):
        UISettings.from_env({"EXPLAIN_UI_AUTH": "no-colon"})
    client = BackendClient.from_env({"BACKEND_URL": "http://h:1/", "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"})
    assert (client.base_url, client.auth) == ("http://h:1", ("u", "p"))
    for bad, name in (({"BACKEND_URL": "h:1"}, "BACKEND_URL"), ({"EXPLAIN_UI_TIMEOUT": "soon"}, "EXPLAIN_UI_TIMEOUT")):
        with pytest.raises(ValueError, match=name):
            BackendClient.from_env(bad)
    assert views.deep_link({"task": "12", "project": "3"}) == views.DeepLink(12, "3")
    assert views.deep_link({"task": "12"}) == views.DeepLink(12, "")
    assert views.deep_link({}) is None
    with pytest.raises(views.InputError):
        views.deep_link({"task": "x"})
    build_demo(client, settings)  # the layout builds with these settings


# -- a Label Studio task ------------------------------------------------------------------------------------------
BRUSH_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
                '<Label value="cat"/><Label value="rocket"/></BrushLabels></View>')


def test_task_tab_against_real_label_studio(label_studio, quick_engine, chelsea, tmp_path: Path):
    """A task in a real Label Studio: its image and stored prediction load, segment and explain work,
    and explaining the predicted task is served from the backend's cache."""
    from backend.ls_api import Credentials
    from backend.ls_model import ModelSettings
    from tests.ls_server import create_project, import_files

    photo = tmp_path / "chelsea.png"
    Image.fromarray(chelsea[::2, ::2]).save(photo)
    project = create_project(label_studio, BRUSH_CONFIG, title="explain ui")
    (task_id,) = import_files(label_studio, project, [photo])
    settings = ModelSettings(credentials=Credentials(label_studio.url, label_studio.token))
    with ThreadedBackend(quick_engine, model=settings) as server:
        client = BackendClient(server.url)
        empty = views.load_task(client, task_id, str(project))
        assert empty.rgb.shape == chelsea[::2, ::2].shape and empty.stored.segments == []
        assert "No stored prediction" in empty.info

        # The backend's own prediction for the task, stored in Label Studio as a prediction.
        body = client.segment_task(task_id, str(project), None, BOX, TEXT)
        assert body["segments"], "the tiny engine finds boxes at these thresholds"
        label_studio.api("POST", "/api/predictions/", json={"task": task_id, **body["prediction"]})

        loaded = views.load_task(client, task_id, str(project))
        stored = [s for s in body["segments"] if s["area"] > 0]  # empty masks make no brush result
        assert [s.label for s in loaded.stored.segments] == [s["label"] for s in stored]
        for segment, item in zip(loaded.stored.segments, stored, strict=True):
            assert np.array_equal(segment.mask, views.segments_from_json([item], loaded.rgb)[0].mask)
        assert "1 stored prediction" in loaded.info
        assert loaded.stored.overlay().shape == loaded.rgb.shape

        result, view = views.explain_task(client, task_id, str(project), None, BOX, TEXT,
                                          use_project_thresholds=False, rgb=loaded.rgb)
        assert "no model ran" in view.status, "the task was segmented with this prompt: explain is cached"
        assert [s.label for s in result.segments] == [s["label"] for s in body["segments"]]
        assert view.encoder_heatmaps and view.encoder_heatmaps[0][0].shape == loaded.rgb.shape
        assert result.task == (task_id, str(project))
        assert views.task_image_on_show(result, str(task_id), str(project)) is loaded.rgb
        assert views.task_image_on_show(result, task_id + 1, str(project)) is None

    with pytest.raises(BackendError):
        views.load_task(client, task_id, str(project))  # that backend is gone now
