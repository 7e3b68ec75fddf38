"""Bad input gets a 4xx naming the problem, never a 500 or a silently wrong answer (issue 10, items 9
and 12): deeply nested JSON, extreme image shapes, oversized chunked bodies (on real servers), and
error reasons as Label Studio shows them.
"""

from __future__ import annotations

import base64
import http.client
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import requests
import torch
from flask import Flask
from PIL import Image
from werkzeug.serving import make_server

from backend._wsgi import REASON_MAX_CHARS, ServerSettings, _reason, create_app
from backend.fetch import FetchSettings
from backend.heatmaps import WORKING_SIDE
from backend.images import working_size
from backend.json_input import MAX_JSON_DEPTH
from backend.ls_model import ModelSettings
from tests.test_fetch import data_url, free_port

ROOT = Path(__file__).resolve().parent.parent
BRUSH = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
         '<Label value="cat"/><Label value="dog"/></BrushLabels>'
         '<TextArea name="prompt" toName="image"/></View>')
JSON_ROUTES = ["/predict", "/setup", "/webhook", "/api/segment", "/api/explain", "/api/tasks/1/segment",
               "/api/tasks/1/explain"]


@pytest.fixture(scope="module")
def quick_engine(engine):
    """The session engine's models with at most 2 detections (SAM costs ~0.3 s a box on CPU)."""
    from backend.engine import Engine

    return Engine(engine.config.replace(max_detections=2), detector=engine.detector, segmenter=engine.segmenter)


def make_app(engine: Any, max_image_bytes: int = 1 << 20) -> Flask:
    settings = ServerSettings(load_on_start=False, model=ModelSettings(fetch=FetchSettings(max_bytes=max_image_bytes)))
    return create_app(engine=engine, settings=settings)


@pytest.fixture
def client(quick_engine):
    return make_app(quick_engine).test_client()


@pytest.fixture
def served() -> Iterator[Any]:
    """``served(app)`` -> the base URL of ``app`` on a real threaded werkzeug server on loopback."""
    servers = []

    def serve(app: Flask) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def png(width: int, height: int) -> bytes:
    """A real photo (scikit-image's cat) squeezed to width x height."""
    import skimage.data

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).resize((width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def nested(depth: int) -> str:
    """A JSON object whose "tasks" value nests ``depth`` arrays (the body nests depth + 1 levels)."""
    return '{"tasks": ' + "[" * depth + "]" * depth + ', "prompt": "cat"}'


def assert_error(response: Any, status: int, *words: str) -> str:
    body = response.get_json()
    assert response.status_code == status, (response.status_code, body)
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    for word in words:
        assert word in body["error"], body["error"]
    return body["error"]


# -- JSON nesting ------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", JSON_ROUTES)
def test_deeply_nested_json_is_a_400_naming_the_depth(client, route):
    for depth in (100_000, MAX_JSON_DEPTH):  # past the interpreter's limit; just past ours
        response = client.post(route, data=nested(depth), content_type="application/json")
        message = assert_error(response, 400, "too deeply", str(MAX_JSON_DEPTH))
        assert message.startswith("request body nests")
        assert "request body nests" in response.status  # the cause reaches Label Studio's message
    assert client.get("/health").get_json()["status"] == "UP"


def test_nesting_up_to_the_limit_is_parsed(client):
    # Depth MAX_JSON_DEPTH - 1 in "tasks" is MAX_JSON_DEPTH levels in all: parsed, then refused for
    # what it is (a task that is a list), not for its depth.
    response = client.post("/predict", data=nested(MAX_JSON_DEPTH - 1), content_type="application/json")
    assert_error(response, 400, "tasks[0] must be a task object")


def test_deep_extra_params_string_at_setup_is_a_400(client):
    deep = "[" * 100_000 + "]" * 100_000
    response = client.post("/setup", json={"schema": BRUSH, "extra_params": deep})
    assert_error(response, 400, "extra_params", "too deeply")
    response = client.post("/setup", json={"schema": BRUSH, "extra_params": '{"box_threshold": NaN}'})
    assert_error(response, 400, "extra_params", "NaN")


@pytest.mark.parametrize("body, words", [
    ('{"tasks": [], "x": NaN}', ("not valid JSON", "NaN")),
    ('{"tasks": [], "x": -Infinity}', ("not valid JSON", "Infinity")),
    ('{"tasks": [], "x": ' + "9" * 5000 + "}", ("not valid JSON", "digits")),
    (b'{"tasks": ["\xff"]}', ("not valid JSON",)),
], ids=["nan", "infinity", "5000-digit-int", "bad-utf8"])
def test_json_that_python_half_accepts_is_a_400(client, body, words):
    for route in ("/predict", "/api/segment"):
        assert_error(client.post(route, data=body, content_type="application/json"), 400, *words)


def test_train_survives_any_body(client):
    for body in (nested(100_000), "{nope", "", '{"project": [1]}'):
        response = client.post("/train", data=body, content_type="application/json")
        assert response.status_code == 200 and response.get_json()["status"] == "ok"


# -- image shapes ------------------------------------------------------------------------------------
EXTREME_SIZES = [(4000, 1), (1, 4000), (1, 1), (3, 3000)]  # each runs the models (~1 s, 10 s on a busy CI)


@pytest.mark.parametrize("width, height", [(4000, 1), (1, 4000), (1, 1), (2, 3000), (3000, 2), (1334, 1),
                                           (1, 533), (534, 1), (7, 6000), (8000, 8), (1, 64_000)])
def test_model_inputs_keep_every_side_at_least_one_pixel(quick_engine, width, height):
    # The resizes alone, for many shapes (the routes below run the models for a few).
    from backend.config import EngineConfig
    from backend.detector import GroundingDinoDetector

    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    dino = quick_engine.detector.preprocess(rgb)
    assert dino.shape[0] == 3 and min(dino.shape[1:]) >= 1
    assert max(dino.shape[1:]) <= max(quick_engine.detector.max_size, max(width, height))
    # The real models' sizes (the tiny ones are smaller): the same guarantee.
    production = SimpleNamespace(image_size=EngineConfig.dino_image_size, max_size=EngineConfig.dino_max_size)
    assert min(GroundingDinoDetector.preprocess(production, rgb).shape[1:]) >= 1
    sam, (h, w) = quick_engine.segmenter.preprocess(rgb)
    size = quick_engine.segmenter.img_size
    assert sam.shape == (1, 3, size, size) and 1 <= h <= size and 1 <= w <= size
    boxes = quick_engine.segmenter.transform.apply_boxes_torch(
        torch.tensor([[0.0, 0.0, width, height]]), (height, width))
    assert boxes.tolist() == [[0.0, 0.0, float(w), float(h)]]  # boxes land on the same resized image


@pytest.mark.parametrize("width, height", EXTREME_SIZES)
def test_extreme_aspect_ratios_segment(client, width, height):
    image = png(width, height)
    response = client.post("/api/segment", json={"image": base64.b64encode(image).decode(), "prompt": "cat, dog",
                                                  "box_threshold": 0, "text_threshold": 0})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["width"], body["height"]) == (width, height)
    mask_height, mask_width = working_size((height, width), WORKING_SIDE)  # sent no bigger than that
    assert (body["mask_width"], body["mask_height"]) == (mask_width, mask_height)
    assert body["segments"]  # at these thresholds the models find something in any image
    for segment in body["segments"]:
        mask = Image.open(io.BytesIO(base64.b64decode(segment["mask_png"])))
        assert mask.size == (mask_width, mask_height) and 0 <= segment["area"] <= width * height
        if mask.size == (width, height):
            assert np.asarray(mask).sum() == segment["area"]
        x0, y0, x1, y1 = segment["box"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height


@pytest.mark.parametrize("width, height", [(4000, 1), (1, 4000)])
def test_extreme_aspect_ratios_predict_and_explain(client, width, height):
    image = png(width, height)
    task = {"id": 1, "data": {"image": data_url(image)}}
    response = client.post("/predict", json={"tasks": [task], "label_config": BRUSH, "project": "1.1"})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert "errors" not in body, body["errors"]
    regions = body["results"][0]["result"]
    assert regions
    assert {(r["original_width"], r["original_height"]) for r in regions} == {(width, height)}
    explained = client.post("/api/explain", json={"image": data_url(image), "prompt": "cat"})
    assert explained.status_code == 200, explained.get_json()
    shown = explained.get_json()
    assert (shown["width"], shown["height"]) == (width, height)
    size = (shown["mask_width"], shown["mask_height"])
    assert min(size) >= 1 and (size[0] > size[1]) == (width > height)  # the working size keeps the shape
    for segment in shown["segments"]:
        assert Image.open(io.BytesIO(base64.b64decode(segment["mask_png"]))).size == size
    # The page draws the maps over the photo at its shape, however thin.
    from explain_ui import views

    rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    view = views.explanation_view(shown, rgb, views.segments_from_json(shown["segments"], rgb))
    for picture, _ in view.encoder_heatmaps + view.encoder_overlays + view.decoder_maps:
        assert min(picture.shape[:2]) >= 1 and (picture.shape[1] > picture.shape[0]) == (width > height)


# -- oversized chunked bodies, on real servers --------------------------------------------------------
def post_chunked(base_url: str, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    """POST ``body`` with Transfer-Encoding: chunked and no Content-Length; (status, response body)."""
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        pieces = (body[i:i + 65536] for i in range(0, len(body), 65536))
        connection.request("POST", path, body=pieces, headers={"Content-Type": content_type},
                           encode_chunked=True)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def oversized_bodies(limit: int) -> dict[str, tuple[bytes, str]]:
    padding = b"a" * (limit + 10)
    boundary = "xyzzy"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\ncat\r\n"
                 f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
                 "Content-Type: image/png\r\n\r\n").encode() + padding + f"\r\n--{boundary}--\r\n".encode()
    return {"json": (b'{"tasks": [], "x": "' + padding + b'"}', "application/json"),
            "multipart": (multipart, f"multipart/form-data; boundary={boundary}")}


@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook", "/api/segment", "/api/tasks/1/explain"])
def test_oversized_chunked_body_is_a_413(served, path):
    app = make_app(None, max_image_bytes=1000)  # no engine needed: the body is refused first
    limit = app.config["MAX_CONTENT_LENGTH"]
    base = served(app)
    for kind, (body, content_type) in oversized_bodies(limit).items():
        if kind == "multipart" and not path.startswith("/api/segment"):
            continue
        status, text = post_chunked(base, path, body, content_type)
        assert status == 413, (kind, status, text[:300])
        assert b"request body is too large" in text and f"{limit:,}".encode() in text
    # A chunked body that fits is read whole (here: valid JSON, then refused for its content).
    status, text = post_chunked(base, "/predict", b'{"tasks": "x", "pad": "' + b"a" * (limit - 40) + b'"}')
    assert status == 400 and b"'tasks' must be list" in text


def test_oversized_chunked_body_is_a_413_under_gunicorn(tmp_path):
    port = free_port()
    env = {**os.environ, "MAX_IMAGE_BYTES": "1000", "ENGINE_CONFIG": str(tmp_path / "missing.json"),
           "LOG_LEVEL": "WARNING", "BIND": f"127.0.0.1:{port}", "WORKERS": "1", "THREADS": "2"}
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "backend._wsgi:app"],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{base}/health", timeout=10)
                break
            except requests.RequestException:  # not listening yet, or still importing the app
                assert process.poll() is None and time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.2)
        limit = 1000 * 4 // 3 + (1 << 20)  # ServerSettings.max_request_bytes
        body, content_type = oversized_bodies(limit)["json"]
        status, text = post_chunked(base, "/predict", body, content_type)
        assert status == 413 and b"request body is too large" in text, (status, text[:300])
        status, text = post_chunked(base, "/predict", b'{"tasks": "x"}')
        assert status == 400 and b"'tasks' must be list" in text
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- error reasons as Label Studio shows them ---------------------------------------------------------
def label_studio_error(response: requests.Response) -> str:
    """What Label Studio 1.23.2 stores and shows for a failed ML request (ml/api_connector.py: str of
    requests' HTTPError from raise_for_status)."""
    try:
        response.raise_for_status()
    except requests.HTTPError as exc:
        return str(exc)
    raise AssertionError(f"expected an error, got {response.status_code}")


def test_non_ascii_labels_keep_their_meaning_in_the_reason(served, quick_engine):
    base = served(make_app(quick_engine))
    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                           "value": {"text": ["猫"]}}]}
    body = {"tasks": [{"id": 1, "data": {"image": data_url(png(8, 8))}}], "label_config": BRUSH,
            "project": "1.1", "params": {"context": context}}
    response = requests.post(f"{base}/predict", json=body, timeout=30)
    shown = label_studio_error(response)
    assert shown.startswith("400 Client Error: unknown labels")
    assert "\\u732b" in shown  # 猫, escaped: the reason phrase can only carry Latin-1
    assert "猫" in response.json()["error"]  # the body keeps the text as it was


def test_long_reasons_keep_the_cause_and_the_advice(served, quick_engine):
    labels = "".join(f'<Label value="label number {i}"/>' for i in range(300))
    config = BRUSH.replace('<Label value="cat"/>', labels)
    base = served(make_app(quick_engine))
    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                           "value": {"text": ["zebra"]}}]}
    body = {"tasks": [{"id": 1, "data": {"image": data_url(png(8, 8))}}], "label_config": config,
            "project": "1.1", "params": {"context": context}}
    response = requests.post(f"{base}/predict", json=body, timeout=30)
    full = response.json()["error"]
    assert len(full) > 5000 and "label number 299" in full  # the body has it all
    assert len(response.reason) <= REASON_MAX_CHARS
    assert response.reason.startswith("unknown labels: the prompt ['zebra']")
    assert response.reason.endswith(full.split()[-1])  # the end (what to do) survives the cut
    assert " ... " in response.reason


@pytest.mark.parametrize("message", [
    "猫" * 1000,
    "a" * 100_000,
    "first\r\nsecond\x00third\u2028fourth",
    "emoji \U0001f408 " + "x " * 500 + "the end",
    "",
], ids=["cjk", "one-long-word", "control-chars", "astral", "empty"])
def test_reason_is_one_bounded_latin1_line(message):
    reason = _reason(message)
    assert reason and reason.isascii() and reason.isprintable()
    assert len(reason) <= REASON_MAX_CHARS
    assert not reason.endswith("\\") and "\\u" not in reason[-5:]  # no escape cut in half
    if message.startswith("猫"):
        assert reason.startswith("\\u732b" * 10)


def test_long_words_are_shortened_so_the_cause_after_them_stays():
    url = "https://bucket.example.com/" + "p" * 500 + "?X-Amz-Signature=" + "f" * 64
    reason = _reason(f"can't fetch {url}: HTTP 403 Forbidden; check the storage's credentials")
    assert reason.startswith("can't fetch https://bucket.example.com/")
    assert "HTTP 403 Forbidden; check the storage's credentials" in reason and len(reason) < 200


# -- other 500s the fuzz found -------------------------------------------------------------------------
@pytest.fixture
def task_client(quick_engine):
    from backend.ls_api import Credentials
    from tests.test_fetch import LEGACY_TOKEN, FakeLabelStudio

    with FakeLabelStudio() as ls:
        ls.files["/data/upload/1/x.png"] = png(12, 9)
        ls.tasks[1] = {"id": 1, "data": {"image": "/data/upload/1/x.png"}}  # no project: ?project= decides
        ls.tasks[2] = {"id": 2, "project": "abc", "data": {"image": "/data/upload/1/x.png"}}
        ls.projects[1] = {"id": 1, "label_config": BRUSH}
        model = ModelSettings(credentials=Credentials(ls.url, LEGACY_TOKEN), fetch=FetchSettings(timeout=5))
        yield create_app(engine=quick_engine, settings=ServerSettings(model=model, load_on_start=False)).test_client()


@pytest.mark.parametrize("project", ["abc", "x.1", "\x00", "١", "-3", "1e3"])
def test_project_query_must_be_an_id(task_client, project):
    for method, route in [("get", "/api/tasks/1"), ("get", "/api/tasks/1/image"),
                          ("post", "/api/tasks/1/segment"), ("post", "/api/tasks/1/explain")]:
        response = getattr(task_client, method)(route, query_string={"project": project})
        assert_error(response, 400, "project must be an id like 3", repr(project))
    assert task_client.get("/api/tasks/1", query_string={"project": "1.1700000000"}).status_code == 200


def test_a_task_or_project_label_studio_does_not_have_is_a_404_naming_it(task_client):
    # The id typed on the explain page is wrong, not Label Studio failing (a 502 before).
    for method, route in [("get", "/api/tasks/99"), ("get", "/api/tasks/99/image"),
                          ("post", "/api/tasks/99/segment"), ("post", "/api/tasks/99/explain")]:
        assert_error(getattr(task_client, method)(route), 404, "has no task 99", "check the Task ID")
    # Task 1 has no project of its own: the one asked for is looked up, and isn't there.
    assert_error(task_client.post("/api/tasks/1/explain", query_string={"project": "7"}), 404, "has no project 7")


def test_task_with_a_malformed_project_is_label_studios_fault(task_client):
    assert_error(task_client.get("/api/tasks/2"), 502, "Label Studio sent task 2 with a malformed project", "'abc'")


@pytest.mark.parametrize("image", ["zebra", "data:image/png;base64,zebra", "data:nope"])
def test_undecodable_inline_image_is_a_422(client, image):
    # In JSON or as a multipart text field: backend.fetch's ImageDataError, not a 502 (nothing was fetched).
    for route in ("/api/segment", "/api/explain"):
        assert_error(client.post(route, json={"image": image, "prompt": "cat"}), 422, "data")
        response = client.post(route, data={"image": image, "prompt": "cat"}, content_type="multipart/form-data")
        assert_error(response, 422, "data")


def test_multipart_text_image_field_is_decoded_like_json(client):
    form = {"image": data_url(png(12, 9)), "prompt": "cat"}
    response = client.post("/api/segment", data=form, content_type="multipart/form-data")
    assert response.status_code == 200 and (response.get_json()["width"], response.get_json()["height"]) == (12, 9)
