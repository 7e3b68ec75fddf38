"""The HTTP server (backend/_wsgi.py, backend/http_api.py) through Flask's test client, with the tiny
real engine: Label Studio's ML-backend protocol, bad input, auth, concurrency, logs, and the /api
JSON the explain UI reads.

Label Studio's media routes (``/data/upload/...``) come from tests/test_fetch.py's local HTTP server;
the backend against a real Label Studio is tests/test_e2e_label_studio.py's job.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import threading
import time

import numpy as np
import pytest
from label_studio_sdk.converter import brush
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend._wsgi import ServerSettings, create_app
from backend.api_schema import (
    ExplanationJson,
    SchemaError,
    SegmentationJson,
    TaskExplanationJson,
    TaskSegmentationJson,
    parse,
)
from backend.fetch import FetchSettings
from backend.heatmaps import normalize_map
from backend.label_config import parse_label_config
from backend.ls_api import Credentials
from backend.ls_model import ModelSettings
from tests.sam_encodes import counting_sam_encodes
from tests.test_fetch import LEGACY_TOKEN, FakeLabelStudio, data_url, free_port

CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="CAT"/>
    <Label value="Vehicle" predicted_values="car, truck"/>
  </BrushLabels>
  <RectangleLabels name="box" toName="image">
    <Label value="CAT"/>
    <Label value="Vehicle" predicted_values="car, truck"/>
  </RectangleLabels>
  <PolygonLabels name="outline" toName="image">
    <Label value="cat"/>
    <Label value="Vehicle" predicted_values="car, truck"/>
  </PolygonLabels>
  <TextArea name="prompt" toName="image"/>
  <TextArea name="more" toName="image"/>
  <Number name="box_threshold" toName="image"/>
</View>
"""
BRUSH_ONLY = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
              '<Label value="cat"/><Label value="dog"/></BrushLabels></View>')
LABEL_PROMPT = ["CAT", "car", "truck"]  # CONFIG's default prompt: BrushLabels names, Vehicle's aliases
MB = 1_000_000


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_engine(engine):
    """The session engine's models with at most 2 detections (SAM costs ~0.3 s a box on CPU)."""
    from backend.engine import Engine

    return Engine(engine.config.replace(max_detections=2), detector=engine.detector, segmenter=engine.segmenter)


def make_client(engine, **settings):
    settings.setdefault("load_on_start", False)
    return create_app(engine=engine, settings=ServerSettings(**settings)).test_client()


@pytest.fixture
def client(quick_engine):
    return make_client(quick_engine)


@pytest.fixture
def fake_ls():
    with FakeLabelStudio() as ls:
        yield ls


def photo(seed: int, width: int = 96, height: int = 64) -> bytes:
    """A small real photo crop (scikit-image's cat), different per seed, as PNG bytes."""
    import skimage.data

    cat = skimage.data.chelsea()
    y, x = (seed * 37) % (cat.shape[0] - height), (seed * 53) % (cat.shape[1] - width)
    buffer = io.BytesIO()
    Image.fromarray(cat[y:y + height, x:x + width]).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(side: int = 10_000) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")  # 100 Mpixel, a few kB
    return buffer.getvalue()


def rgb_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_brush(result: dict) -> np.ndarray:
    """label-studio-sdk's decoder: RLE -> HxW mask at the result's original size."""
    flat = brush.decode_rle(result["value"]["rle"])
    return flat.reshape(result["original_height"], result["original_width"], 4)[:, :, 3] > 0


def decode_png(b64: str) -> Image.Image:
    assert not b64.startswith("data:")
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def predict(client, tasks, config=CONFIG, project="3.1700000000", context=None, **kwargs):
    body = {"tasks": tasks, "project": project, "label_config": config, "params": {"context": context}}
    return client.post("/predict", json=body, **kwargs)


def textarea(*texts: str, name: str = "prompt") -> dict:
    return {"from_name": name, "to_name": "image", "type": "textarea", "value": {"text": list(texts)}}


def number(name: str, value: float) -> dict:
    return {"from_name": name, "to_name": "image", "type": "number", "value": {"number": value}}


def brush_regions(entry: dict) -> list[dict]:
    return [r for r in entry["result"] if r["type"] == "brushlabels"]


def assert_matches_engine(entry: dict, engine, image: bytes, prompt: list[str], box_threshold=None,
                          text_threshold=None, config: str = CONFIG) -> None:
    """The prediction is exactly what the engine finds for ``prompt``: same masks, same labels."""
    rgb = rgb_of(image)
    segments = [s for s in engine.segment(rgb, prompt, box_threshold, text_threshold) if s.mask.any()]
    target = parse_label_config(config).targets[0]
    brushes = brush_regions(entry)
    assert len(brushes) == len(segments)
    for result, segment in zip(brushes, segments, strict=True):
        assert result["value"]["format"] == "rle"
        assert (result["original_width"], result["original_height"]) == (rgb.shape[1], rgb.shape[0])
        assert np.array_equal(decode_brush(result), segment.mask)
        assert result["value"]["brushlabels"] == [target.labels_for(segment.label)["mask"]]
        assert result["score"] == pytest.approx(segment.score, abs=1e-4)


# -- health and setup -----------------------------------------------------------------------------------
def test_health_reports_loaded_models(client, quick_engine):
    for path in ("/health", "/"):
        body = client.get(path).get_json()
        assert body["status"] == "UP" and body["model_class"] == "GroundedSamModel"
        assert body["model_version"] == quick_engine.model_version
        assert "tiny_sam_vit_b.pth" in body["models"]["sam"]
        assert "grounding_dino" in body["models"]


def test_health_not_ready_names_missing_weights_and_server_keeps_serving(tmp_path, engine_config):
    app = create_app(settings=ServerSettings(engine_config=engine_config.replace(cache_dir=tmp_path)))
    client = app.test_client()
    deadline = time.time() + 60
    while (body := client.get("/health").get_json())["status"] == "loading" and time.time() < deadline:
        time.sleep(0.1)
    assert body["status"] == "not ready"
    assert "tiny_sam_vit_b.pth" in body["reason"] and body["problems"]
    # /setup answers from the config alone; /predict says why it can't.
    version = client.post("/setup", json={"project": "1.1", "schema": BRUSH_ONLY}).get_json()["model_version"]
    assert version == body["model_version"] and version.startswith("grounded-sam-")
    response = predict(client, [{"id": 1, "data": {"image": data_url(photo(0))}}], config=BRUSH_ONLY)
    assert response.status_code == 503 and "tiny_sam_vit_b.pth" in response.get_json()["error"]


def test_setup_version_is_a_stable_string_carried_by_every_prediction(client, quick_engine):
    setup = {"project": "3.1700000000", "schema": CONFIG, "hostname": "http://localhost:8080",
             "access_token": "", "extra_params": {}}
    versions = {client.post("/setup", json=setup).get_json()["model_version"] for _ in range(2)}
    assert len(versions) == 1
    version = versions.pop()
    assert isinstance(version, str) and version == quick_engine.model_version
    tasks = [{"id": 1, "data": {"image": data_url(photo(1))}}, {"id": 2, "data": {}}]
    body = predict(client, tasks).get_json()
    assert body["model_version"] == version
    assert [r["model_version"] for r in body["results"]] == [version, version]


# -- /predict ---------------------------------------------------------------------------------------------
def test_a_task_sent_twice_in_one_request_is_predicted_and_stored_once(client):
    first, other = data_url(photo(2)), data_url(photo(3))
    tasks = [{"id": 7, "data": {"image": first}}, {"id": 8, "data": {"image": other}},
             {"id": 7, "data": {"image": first}}]
    body = predict(client, tasks).get_json()
    results = body["results"]
    assert len(results) == 3 and "result" in results[0] and "result" in results[1]
    assert "result" not in results[2]  # Label Studio skips an entry without a result: one stored prediction
    assert [e["task"] for e in body["errors"]] == [7] and "more than once" in body["errors"][0]["error"]


@pytest.mark.parametrize("prefetch_tasks", [0, 2])  # one after the other, or images fetched ahead on threads
def test_batch_with_bad_tasks_answers_every_task_in_order(quick_engine, fake_ls, caplog, prefetch_tasks):
    good_upload, good_data = photo(2), photo(3)
    fake_ls.files["/data/upload/3/aa-good.png"] = good_upload
    client = make_client(quick_engine, model=ModelSettings(
        credentials=Credentials(fake_ls.url, LEGACY_TOKEN), prefetch_tasks=prefetch_tasks,
        fetch=FetchSettings(max_bytes=1 << 20, timeout=5, allowed_hosts=("127.0.0.1",))))
    tasks = [
        {"id": 10, "data": {"image": "/data/upload/3/aa-good.png"}},
        {"id": 11, "data": {"image": data_url(b"\x89PNG\r\n\x1a\n this is not a png")}},  # corrupt
        {"id": 12, "data": {"image": "data:image/png;base64,"}},  # zero bytes
        {"id": 13, "data": {"image": f"http://127.0.0.1:{free_port()}/gone.png"}},  # nobody listens
        {"id": 14, "data": {"image": data_url(bomb_png())}},  # 100 Mpixel decompression bomb
        {"id": 15, "data": {"image": data_url(good_data)}},
    ]
    with caplog.at_level(logging.WARNING, logger="backend"):
        response = predict(client, tasks)
    assert response.status_code == 200
    body = response.get_json()
    results = body["results"]
    assert len(results) == len(tasks)
    errors = {e["task"]: e["error"] for e in body["errors"]}
    for task, bad in zip(tasks[1:5], results[1:5], strict=True):  # nothing Label Studio would store: it asks again
        assert bad == {"error": errors[task["id"]], "model_version": quick_engine.model_version}
    assert set(errors) == {11, 12, 13, 14}
    assert "empty" in errors[12] and "pixels" in errors[14] and "can't reach" in errors[13]
    for task_id in errors:
        assert f"task {task_id}: no prediction" in caplog.text
    prompt = LABEL_PROMPT
    for entry, image in ((results[0], good_upload), (results[5], good_data)):
        assert brush_regions(entry), "tiny random models find something at the default thresholds"
        assert_matches_engine(entry, quick_engine, image, prompt)
        assert LabelInterface(CONFIG).validate_prediction(entry, return_errors=True) == []
    # Rectangles and polygons come from the same detections, with each control's own label.
    entry = results[5]
    segments = [s for s in quick_engine.segment(rgb_of(good_data), prompt) if s.mask.any()]
    boxes = [r for r in entry["result"] if r["type"] == "rectanglelabels"]
    assert len(boxes) == len(segments)
    height, width = rgb_of(good_data).shape[:2]
    for result, segment in zip(boxes, segments, strict=True):
        expected = {"CAT": "CAT", "car": "Vehicle", "truck": "Vehicle"}[segment.label]
        assert result["value"]["rectanglelabels"] == [expected]
        assert result["value"]["x"] == pytest.approx(segment.box[0] / width * 100, abs=1e-3)
        assert result["value"]["y"] == pytest.approx(segment.box[1] / height * 100, abs=1e-3)
    outlines = [r for r in entry["result"] if r["type"] == "polygonlabels"]
    assert outlines and {r["value"]["polygonlabels"][0] for r in outlines} <= {"cat", "Vehicle"}
    assert all(len(r["value"]["points"]) >= 3 for r in outlines)


def test_interactive_textareas_and_number_controls(client, quick_engine):
    image = photo(4)
    task = [{"id": 20, "data": {"image": data_url(image)}}]
    # Every TextArea result counts, not just the first; "Cats" and "TRUCK" match case-insensitively.
    context = {"result": [textarea("Cats"), textarea("TRUCK", name="more"), number("box_threshold", 0.05)]}
    response = predict(client, task, context=context)
    assert response.status_code == 200
    entry = response.get_json()["results"][0]
    assert brush_regions(entry)
    assert_matches_engine(entry, quick_engine, image, ["Cats", "TRUCK"], box_threshold=0.05)
    # The Number control sets the threshold: at 1.0 nothing passes (and that is still an entry).
    context["result"][2] = number("box_threshold", 1.0)
    entry = predict(client, task, context=context).get_json()["results"][0]
    assert entry["result"] == [] and entry["score"] == 0.0
    assert quick_engine.segment(rgb_of(image), ["Cats", "TRUCK"], 1.0) == []


def test_webhook_events_and_prompt_persisting_to_the_next_prediction(client, quick_engine):
    project = {"id": 8, "title": "p"}
    for action in ("START_TRAINING", "ANNOTATION_UPDATED", "PROJECT_UPDATED"):
        response = client.post("/webhook", json={"action": action, "project": project})
        assert response.status_code == 200 and response.get_json()["status"] == "ok"
    annotation = {"id": 1, "project": 8, "result": [textarea("truck")]}
    reply = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": project,
                                          "annotation": annotation}).get_json()
    assert reply["remembered_prompt"] == ["truck"]
    image = photo(5)
    entry = predict(client, [{"id": 30, "data": {"image": data_url(image)}}], project="8.1699999999").get_json()
    assert_matches_engine(entry["results"][0], quick_engine, image, ["truck"])
    # A prompt typed in interactive mode is remembered the same way.
    predict(client, [{"id": 31, "data": {"image": data_url(image)}}], project="9",
            context={"result": [textarea("car")]})
    entry = predict(client, [{"id": 32, "data": {"image": data_url(image)}}], project="9").get_json()
    assert_matches_engine(entry["results"][0], quick_engine, image, ["car"])
    assert client.post("/webhook", json={"project": project}).status_code == 400  # no action
    # A remembered prompt this config has no label for doesn't break batches: the labels are used.
    client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 10},
                                  "annotation": {"result": [textarea("zebra")]}})
    image = photo(3)
    entry = predict(client, [{"id": 33, "data": {"image": data_url(image)}}], project="10").get_json()
    assert_matches_engine(entry["results"][0], quick_engine, image, LABEL_PROMPT)


def test_explain_ui_link_on_every_region(quick_engine):
    client = make_client(quick_engine, model=ModelSettings(explain_ui_url="http://ui.example:7860"))
    entry = predict(client, [{"id": 70, "data": {"image": data_url(photo(3))}}], project="3.17").get_json()
    results = entry["results"][0]["result"]
    assert results
    for result in results:  # each region links to its own explanation, on a line of its own
        link = f"http://ui.example:7860/?task=70&project=3&region={result['id']}"
        assert result["meta"] == {"text": [f"Why this mask:\n{link}"]}
    assert LabelInterface(CONFIG).validate_prediction(entry["results"][0], return_errors=True) == []
    assert ModelSettings.from_env({"EXPLAIN_UI_URL": "http://ui:7860/"}).explain_link(5, None) == "http://ui:7860/?task=5"


@pytest.mark.parametrize("body, message", [
    ("{not json", "not valid JSON"),
    ("", "empty"),
    ("[1, 2]", "JSON object"),
    ({"label_config": CONFIG}, "'tasks' is required"),
    ({"tasks": "x", "label_config": CONFIG}, "'tasks' must be list"),
    ({"tasks": [1], "label_config": CONFIG}, "tasks[0] must be a task object"),
    ({"tasks": [{"id": 1, "data": {}}]}, "label_config is missing"),
    ({"tasks": [{"id": 1, "data": {}}], "label_config": "<View><Image name='i' value='$i'/></View>"},
     "no <BrushLabels>"),
    ({"tasks": [{"id": 1, "data": {}}], "label_config": "<View><Image"}, "not valid XML"),
    ({"tasks": [{"id": 1, "data": {}}], "label_config": CONFIG, "params": {"context": {"result": [textarea(" . ")]}}},
     "prompt is empty"),
    ({"tasks": [{"id": 1, "data": {}}], "label_config": CONFIG, "params": {"context": {"result": [textarea("zebra")]}}},
     "unknown labels"),
    ({"tasks": [{"id": 1, "data": {}}], "label_config": CONFIG,
      "params": {"context": {"result": [number("box_threshold", 3)]}}}, "box_threshold must be within [0, 1]"),
    ({"tasks": [{"id": 1, "data": {}}], "label_config": CONFIG, "params": "x"}, "'params' must be dict"),
])
def test_bad_requests_get_400_naming_the_problem(client, body, message):
    if isinstance(body, str):
        response = client.post("/predict", data=body, content_type="application/json")
    else:
        response = client.post("/predict", json=body)
    assert response.status_code == 400, response.get_json()
    assert message in response.get_json()["error"]
    assert message[:20] in response.status  # Label Studio shows the reason phrase, not the body
    assert client.get("/health").get_json()["status"] == "UP"


def test_setup_rejects_bad_configs_and_extra_params(client):
    assert "no <BrushLabels>" in client.post("/setup", json={"schema": "<View/>"}).get_json()["error"]
    response = client.post("/setup", json={"schema": CONFIG, "extra_params": "{nope"})
    assert response.status_code == 400 and "extra_params" in response.get_json()["error"]


# -- auth, concurrency, logs ------------------------------------------------------------------------------
def test_basic_auth_on_every_route(quick_engine, monkeypatch):
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    client = make_client(quick_engine, basic_auth=("labeler", "correct horse battery"))
    good = {"Authorization": "Basic " + base64.b64encode(b"labeler:correct horse battery").decode()}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"labeler:correct horse").decode()}
    for method, path in (("get", "/health"), ("post", "/setup"), ("post", "/predict"), ("post", "/webhook"),
                         ("post", "/api/segment")):
        for headers in ({}, wrong, {"Authorization": "Bearer correct horse battery"}):
            response = getattr(client, method)(path, headers=headers, json={})
            assert response.status_code == 401 and "WWW-Authenticate" in response.headers
    assert compared, "credentials are compared with hmac.compare_digest"
    assert client.get("/health", headers=good).status_code == 200
    assert client.post("/setup", headers=good, json={"schema": BRUSH_ONLY}).status_code == 200
    with pytest.raises(ValueError, match="BASIC_AUTH_PASS"):
        ServerSettings.from_env({"BASIC_AUTH_USER": "only-user"})


def test_concurrent_predictions_equal_sequential_ones(quick_engine):
    from backend.engine import Engine

    # No caches: every request runs both models, so the threads really share the encoders.
    engine = Engine(quick_engine.config.replace(embedding_cache_size=0, explanation_cache_size=0),
                    detector=quick_engine.detector, segmenter=quick_engine.segmenter)
    client = make_client(engine)
    images = [photo(10 + i) for i in range(4)]
    contexts = [None, {"result": [textarea("car")]}, None, {"result": [textarea("cat, truck")]}]

    def run(i: int) -> list[dict]:
        response = predict(client, [{"id": i, "data": {"image": data_url(images[i])}}], project=str(40 + i),
                           context=contexts[i])
        assert response.status_code == 200
        return [{k: v for k, v in r.items() if k != "id"} for r in response.get_json()["results"][0]["result"]]

    sequential = [run(i) for i in range(4)]
    concurrent: dict[int, list[dict]] = {}
    threads = [threading.Thread(target=lambda i=i: concurrent.__setitem__(i, run(i))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [concurrent.get(i) for i in range(4)] == sequential
    assert any(sequential)


def test_tokens_never_appear_in_logs_or_responses(quick_engine, fake_ls, caplog):
    fake_ls.files["/data/upload/5/x.png"] = photo(6)
    wrong_key = "f" * 40
    client = make_client(quick_engine, model=ModelSettings(
        credentials=Credentials(fake_ls.url, wrong_key), fetch=FetchSettings(max_bytes=1 << 20, timeout=5)))
    with caplog.at_level(logging.DEBUG):
        setup = {"project": "5.1", "schema": CONFIG, "hostname": fake_ls.url, "access_token": LEGACY_TOKEN}
        assert client.post("/setup", json=setup).status_code == 200
        logging.getLogger("backend.test").info("setup body %s", json.dumps(setup))
        # Our key is wrong: Label Studio answers 401 and the task gets an error naming the setting.
        response = predict(client, [{"id": 50, "data": {"image": "/data/upload/5/x.png"}},
                                    {"id": 51, "data": {"image": data_url(photo(7))}}], project="5.1")
    body = response.get_json()
    assert response.status_code == 200 and body["results"][1]["result"]
    assert "LABEL_STUDIO_API_KEY" in body["errors"][0]["error"]
    text = caplog.text + "".join(r.exc_text or "" for r in caplog.records) + response.get_data(as_text=True)
    assert "task 50: no prediction" in text
    assert LEGACY_TOKEN not in text and wrong_key not in text


# -- the explain UI's JSON API ----------------------------------------------------------------------------
def test_api_segment_json(client):
    image = photo(8)
    response = client.post("/api/segment", data={"image": (io.BytesIO(image), "x.png"), "prompt": "cat, car"},
                           content_type="multipart/form-data")
    assert response.status_code == 200, response.get_json()
    body = parse(response.get_json(), SegmentationJson)
    height, width = rgb_of(image).shape[:2]
    assert (body["width"], body["height"], body["prompt"]) == (width, height, ["cat", "car"])
    assert body["segments"]
    for segment in body["segments"]:
        assert segment["label"] in ("cat", "car")
        assert [t["token"] for t in segment["token_scores"]] == ["cat", "car"]
        mask = np.asarray(decode_png(segment["mask_png"]))  # a small image: masks at its own size
        assert mask.shape == (body["mask_height"], body["mask_width"]) == (height, width)
        assert mask.sum() == segment["area"] and "mask_rle" not in segment  # a view, not an annotation
    missing = client.post("/api/segment", json={"prompt": "cat"})
    assert missing.status_code == 400 and "'image' is required" in missing.get_json()["error"]
    garbage = client.post("/api/segment", json={"image": base64.b64encode(b"nope").decode(), "prompt": "cat"})
    assert garbage.status_code == 422


def test_api_explain_json_and_cache(client, quick_engine):
    encoder = quick_engine.segmenter.sam.image_encoder
    image = photo(9)
    request = {"image": data_url(image), "prompt": "cat . car", "box_threshold": 0.05, "text_threshold": 0.1}
    with counting_sam_encodes(quick_engine.segmenter) as calls:
        first = client.post("/api/explain", json=request)
        # Same image + prompt + thresholds again: from the cache, no encoder run, the same answer.
        again = client.post("/api/explain", json=request).get_json()
        explanation = quick_engine.explain(rgb_of(image), ["cat", "car"], 0.05, 0.1)  # the cached one too
    assert first.status_code == 200, first.get_json()
    body = parse(first.get_json(), ExplanationJson)
    assert body["cached"] is False and again["cached"] is True
    assert len(calls) == 1, f"the image is encoded once for the three calls, got {calls}"
    assert again["segments"] == body["segments"] and again["encoder"] == body["encoder"]
    height, width = rgb_of(image).shape[:2]
    assert (body["width"], body["height"], body["prompt"]) == (width, height, ["cat", "car"])
    assert (body["mask_width"], body["mask_height"]) == (width, height)  # small: masks at its own size
    assert body["model_version"] == quick_engine.model_version
    assert body["legend"]["colormap"] == "jet" and body["segments"]
    # The maps are SAM's token grids, once each; the token grid says how they lie over the photo.
    grid = body["token_grid"]
    assert (grid["input_height"], grid["input_width"], grid["img_size"]) == (*explanation.input_size, 1024)

    def token_map(png: str) -> np.ndarray:
        image = decode_png(png)
        assert image.mode == "L" and image.size == (64, 64)  # the tiny SAM's grid
        return np.asarray(image)

    encoder_part = body["encoder"]
    assert encoder_part["available"] is True and encoder_part["reason"] is None
    blocks = encoder_part["blocks"]
    global_blocks = [i for i, block in enumerate(encoder.blocks) if block.window_size == 0]
    assert [b["block"] for b in blocks] == global_blocks and global_blocks
    for block in blocks:
        sent = token_map(block["map_png"]).astype(float) / 255
        rows, cols = -(-grid["input_height"] // 16), -(-grid["input_width"] // 16)  # tokens that saw the photo
        want = normalize_map(explanation.encoder_received[block["block"]][:rows, :cols])
        assert np.abs(sent[:rows, :cols] - want).max() <= 1 / 255 + 1e-6
    for segment in body["segments"]:
        assert segment["maps"] is not None
        token_map(segment["maps"]["decoder_png"])
        assert [t["block"] for t in segment["maps"]["token_look"]] == [blocks[-1]["block"]]
        assert [t["token"] for t in segment["token_scores"]] == ["cat", "car"]
        assert set(segment["phrase_scores"]) == {"cat", "car"}
        assert "mask_rle" not in segment  # a view, not an annotation


def test_explain_answer_parses_and_a_renamed_or_missing_field_is_named(client):
    """The schema both sides import: a real answer parses; one with an old name or a field missing
    fails with a message naming the field, which the client turns into a BackendError."""
    request = {"image": data_url(photo(10)), "prompt": "cat", "box_threshold": 0.0, "text_threshold": 0.0}
    body = client.post("/api/explain", json=request).get_json()
    parse(body, ExplanationJson)
    renamed = json.loads(json.dumps(body))
    renamed["prompt_phrases"] = renamed.pop("prompt")
    with pytest.raises(SchemaError, match=r"answer has no 'prompt'"):
        parse(renamed, ExplanationJson)
    renamed = json.loads(json.dumps(body))
    renamed["segments"][0]["iou"] = renamed["segments"][0].pop("predicted_iou")
    with pytest.raises(SchemaError, match=r"answer\.segments\[0\] has no 'predicted_iou'"):
        parse(renamed, ExplanationJson)
    wrong = json.loads(json.dumps(body))
    wrong["segments"][0]["maps"] = {"decoder_png": "x"}
    with pytest.raises(SchemaError, match=r"answer\.segments\[0\]\.maps has no 'token_look'"):
        parse(wrong, ExplanationJson)
    wrong = json.loads(json.dumps(body))
    wrong["segments"][0]["phrase_scores"]["cat"] = "high"
    with pytest.raises(SchemaError, match=r"answer\.segments\[0\]\.phrase_scores\['cat'\] must be a number"):
        parse(wrong, ExplanationJson)
    segmented = client.post("/api/segment", json=request).get_json()
    parse(segmented, SegmentationJson)
    del segmented["mask_width"]
    with pytest.raises(SchemaError, match=r"answer has no 'mask_width'"):
        parse(segmented, SegmentationJson)


def test_explain_of_a_megapixel_photo_answers_under_1_5_mb(engine):
    """Issue 13: 17 MB of pictures for a 512 x 512 image made a cache hit take seconds. A 1-megapixel
    photo's explanation (as many masks as the engine finds, with all their maps) is under 1.5 MB."""
    import cv2
    import skimage.data

    rgb = cv2.resize(skimage.data.astronaut(), (1000, 1000), interpolation=cv2.INTER_CUBIC)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    client = make_client(engine)  # the session engine: up to max_detections (8) masks
    form = {"image": (io.BytesIO(buffer.getvalue()), "astronaut.png"), "prompt": "person . rocket . flag",
            "box_threshold": "0", "text_threshold": "0"}
    response = client.post("/api/explain", data=form, content_type="multipart/form-data")
    assert response.status_code == 200, response.get_json()
    body = parse(response.get_json(), ExplanationJson)
    assert len(body["segments"]) == engine.config.max_detections, "every mask the engine may find, with maps"
    assert all(s["maps"] for s in body["segments"]) and body["encoder"]["blocks"]
    assert len(response.data) < 1.5 * MB, f"{len(response.data) / MB:.2f} MB"


def test_task_explain_after_predict_runs_no_model(quick_engine, fake_ls):
    image = photo(11)
    fake_ls.files["/data/upload/6/t.png"] = image
    fake_ls.tasks[60] = {"id": 60, "project": 6, "data": {"image": "/data/upload/6/t.png"}, "predictions": []}
    fake_ls.projects[6] = {"id": 6, "label_config": CONFIG}
    client = make_client(quick_engine, model=ModelSettings(
        credentials=Credentials(fake_ls.url, LEGACY_TOKEN), fetch=FetchSettings(max_bytes=1 << 20, timeout=5)))
    entry = predict(client, [fake_ls.tasks[60]], project="6.17").get_json()["results"][0]
    assert brush_regions(entry)
    with counting_sam_encodes(quick_engine.segmenter) as calls:
        body = client.post("/api/tasks/60/explain").get_json()
    assert body["cached"] is True and calls == []
    assert (body["task"], body["project"], body["prompt_source"]) == (60, 6, "labels")
    parse(body, TaskExplanationJson)
    assert body["prompt"] == LABEL_PROMPT
    # The predicted masks, sent at the explanation's working size (this image is smaller: its own size).
    assert (body["mask_width"], body["mask_height"]) == (body["width"], body["height"])
    assert [np.asarray(decode_png(s["mask_png"])).tolist() for s in body["segments"] if s["area"]] == [
        decode_brush(r).tolist() for r in brush_regions(entry)]
    segmented = client.post("/api/tasks/60/segment", json={"prompt": "car"}).get_json()
    parse(segmented, TaskSegmentationJson)
    assert segmented["prompt_source"] == "context"
    assert segmented["prediction"]["model_version"] == entry["model_version"]
    assert client.post("/api/tasks/61/explain").status_code == 404  # Label Studio has no such task
    # After an interactive prediction, the task's explanation uses the prompt the project remembers.
    predict(client, [fake_ls.tasks[60]], project="6.17", context={"result": [textarea("truck")]})
    with counting_sam_encodes(quick_engine.segmenter) as calls:
        body = client.post("/api/tasks/60/explain?project=6").get_json()
    assert (body["cached"], body["prompt_source"], body["prompt"]) == (True, "project", ["truck"])
    assert calls == []


def test_explain_without_encoder_attention_says_why(tiny_cache):
    """MobileSAM's TinyViT has no global attention: no encoder maps, a reason, decoder maps still."""
    from backend.config import EngineConfig
    from backend.engine import Engine

    engine = Engine(EngineConfig.from_file(tiny_cache / "engine-mobilesam.json").replace(max_detections=1))
    image = photo(12)
    body = make_client(engine).post("/api/explain", json={"image": base64.b64encode(image).decode(),
                                                          "prompt": "cat", "box_threshold": 0.0,
                                                          "text_threshold": 0.0}).get_json()
    assert body["encoder"]["available"] is False and body["encoder"]["blocks"] == []
    assert "TinyViT" in body["encoder"]["reason"] and body["encoder"]["reason"] in " ".join(body["notes"])
    assert len(body["segments"]) == 1 and body["segments"][0]["maps"]["token_look"] == []
    assert decode_png(body["segments"][0]["maps"]["decoder_png"]).size == (64, 64)  # MobileSAM's token grid


# -- failures Label Studio can see (issue 10 item 8) ---------------------------------------------------------
def test_failed_task_is_not_stored_and_is_retried_once_its_image_is_fixed(quick_engine, fake_ls, caplog):
    """A task whose image can't be fetched gets an entry without ``result`` (Label Studio skips it, so
    nothing is stamped with the model version) carrying the error; a valid image with no detections gets
    an empty result (that is an answer); /health and /metrics count the failure; fixed, it succeeds."""
    client = make_client(quick_engine, model=ModelSettings(
        credentials=Credentials(fake_ls.url, LEGACY_TOKEN), fetch=FetchSettings(max_bytes=1 << 20, timeout=5)))
    version = quick_engine.model_version
    # box_threshold 1.0: the tiny models find nothing, so a fetched image gives an empty prediction.
    setup = {"project": "8.1", "schema": BRUSH_ONLY, "extra_params": {"box_threshold": 1.0}}
    assert client.post("/setup", json=setup).status_code == 200
    tasks = [{"id": 80, "data": {"image": data_url(photo(8))}},
             {"id": 81, "data": {"image": "/data/upload/8/later.png"}},
             {"id": 82, "data": {"image": data_url(photo(9))}}]
    before = client.get("/metrics").get_json()["predictions"]
    with caplog.at_level(logging.WARNING, logger="backend"):
        response = predict(client, tasks, config=BRUSH_ONLY, project="8.1")
    body = response.get_json()
    assert response.status_code == 200, body
    empty = {"result": [], "score": 0.0, "model_version": version}
    assert body["results"][0] == empty and body["results"][2] == empty
    failed = body["results"][1]
    assert "result" not in failed and "HTTP 404" in failed["error"], failed
    assert body["errors"] == [{"task": 81, "error": failed["error"]}]
    assert f"task 81: no prediction (Label Studio will ask again): {failed['error']}" in caplog.text
    health = client.get("/health").get_json()
    assert health["failed_tasks"] == 1
    metrics = client.get("/metrics").get_json()["predictions"]
    assert metrics["tasks_failed"] - before["tasks_failed"] == 1
    assert metrics["failed_by_reason"] == {"FetchError": 1}
    assert metrics["tasks_predicted"] - before["tasks_predicted"] == 2
    assert metrics["tasks_empty"] - before["tasks_empty"] == 2

    # The cause is fixed (the file is uploaded): the retry gets a prediction.
    fake_ls.files["/data/upload/8/later.png"] = photo(10)
    retry = predict(client, [tasks[1]], config=BRUSH_ONLY, project="8.1").get_json()
    assert retry["results"] == [empty] and "errors" not in retry
    assert client.get("/health").get_json()["failed_tasks"] == 1  # counted since start, not reset
