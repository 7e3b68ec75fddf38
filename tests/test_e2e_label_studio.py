"""End to end: a real Label Studio 1.23.2 drives our backend running under real gunicorn.

Nothing is mocked: Label Studio (tests/ls_server.py) stores uploads, calls /health, /setup and
/predict with basic auth, and keeps the predictions we read back; the backend runs the tiny
random-weight models (real architectures, tests/tiny_models.py) and fetches each image from Label
Studio with the API key. The expected masks come from the same tiny engine run in this process.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.gunicorn_backend import GunicornBackend
from tests.ls_server import (
    LabelStudioServer,
    connect_ml_backend,
    create_project,
    import_files,
    list_predictions,
    list_tasks,
    personal_access_token,
    predict_interactive,
    retrieve_predictions,
)

# Labels are multi-word phrases: Grounding DINO gets them as the prompt, and they must come back as
# the labels of the masks. Rectangles are made from the same detections.
LABELS = ("tabby cat", "coffee cup", "astronaut helmet")
BATCH_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="mask" toName="image">' + "".join(f'<Label value="{x}"/>' for x in LABELS)
    + '</BrushLabels><RectangleLabels name="box" toName="image">'
    + "".join(f'<Label value="{x}"/>' for x in LABELS) + "</RectangleLabels></View>"
)
INTERACTIVE_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="mask" toName="image">' + "".join(f'<Label value="{x}"/>' for x in LABELS)
    + '</BrushLabels><TextArea name="prompt" toName="image" editable="true"/></View>'
)
# Thresholds and a detection cap for the tiny random models: they find boxes, and SAM stays cheap.
ENGINE_ENV = {"BOX_THRESHOLD": "0.2", "TEXT_THRESHOLD": "0.2", "MAX_DETECTIONS": "3"}
AUTH = ("ml-e2e", secrets.token_urlsafe(12))

# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three scikit-image photos of different sizes, as PNG and JPEG uploads."""
    import skimage.data

    d = tmp_path_factory.mktemp("e2e-photos")
    out = []
    for name, suffix in (("chelsea", ".png"), ("astronaut", ".jpg"), ("coffee", ".png")):
        path = d / f"{name}{suffix}"
        Image.fromarray(getattr(skimage.data, name)()).save(path, **({"quality": 90} if suffix == ".jpg" else {}))
        out.append(path)
    return out


@pytest.fixture(scope="module")
def backend(label_studio: LabelStudioServer, tiny_cache: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornBackend]:
    # A personal access token (LS 1.23's default kind; legacy tokens are off in new organizations):
    # the backend trades it for short-lived access tokens to download the uploads.
    env = {"ENGINE_CONFIG": str(tiny_cache / "engine.json"), **ENGINE_ENV,
           "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": personal_access_token(label_studio),
           "BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1], "LOG_LEVEL": "INFO"}
    server = GunicornBackend(env, tmp_path_factory.mktemp("gunicorn") / "gunicorn.log", auth=AUTH).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference_engine(engine: Any, tiny_cache: Path) -> Any:
    """The engine the backend runs (same config and env), sharing the session engine's models."""
    from backend.config import EngineConfig
    from backend.engine import Engine

    config = EngineConfig.from_env({"ENGINE_CONFIG": str(tiny_cache / "engine.json"), **ENGINE_ENV})
    return Engine(config, detector=engine.detector, segmenter=engine.segmenter)


# -- helpers ------------------------------------------------------------------------------------------------
def decode_brush(result: dict[str, Any]) -> np.ndarray:
    """label-studio-sdk's brush decoder: RLE -> bool mask at the result's original size."""
    from label_studio_sdk.converter.brush import decode_rle

    h, w = result["original_height"], result["original_width"]
    flat = decode_rle(result["value"]["rle"])
    assert flat.size == h * w * 4, f"RLE decodes to {flat.size} values, not {h}x{w}x4"
    return flat.reshape(h, w, 4)[:, :, 3] > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def textarea_context(text: str) -> dict[str, Any]:
    return {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                        "value": {"text": [text]}}]}


# -- the tests ------------------------------------------------------------------------------------------------
def test_backend_serves_health_with_auth(backend: GunicornBackend) -> None:
    up = backend.session.get(f"{backend.url}/health", auth=AUTH, timeout=10)
    assert up.status_code == 200 and up.json()["status"] == "UP", up.text
    assert up.json()["model_version"].startswith("grounded-sam-vit_b-swint_ogc-")
    anon = backend.session.get(f"{backend.url}/health", timeout=10)
    assert anon.status_code == 401 and "WWW-Authenticate" in anon.headers


def test_retrieve_predictions_stores_labelled_masks(label_studio: LabelStudioServer, backend: GunicornBackend,
                                                    photos: list[Path], reference_engine: Any) -> None:
    from backend.engine import model_version

    ls = label_studio
    pid = create_project(ls, BATCH_CONFIG, title="e2e-batch")
    task_ids = import_files(ls, pid, photos)
    # One task whose upload doesn't exist: nothing is stored for it (a later retrieve retries it), the
    # others are unaffected.
    missing = ls.api("POST", f"/api/projects/{pid}/import?return_task_ids=true",
                     json=[{"image": f"/data/upload/{pid}/no-such-file.png"}]).json()["task_ids"][0]
    ml = connect_ml_backend(ls, pid, backend.url, title="grounded-sam", basic_auth=AUTH)
    assert ml["state"] == "CO", ml
    version = model_version(reference_engine.config)

    retrieve_predictions(ls, pid)
    tasks = {t["id"]: t for t in list_tasks(ls, pid)}
    assert sorted(tasks) == sorted([*task_ids, missing])
    for tid in task_ids:
        assert len(tasks[tid]["predictions"]) == 1, (tid, tasks[tid]["predictions"], backend.log_tail())
        assert tasks[tid]["predictions"][0]["model_version"] == version
    assert tasks[missing]["predictions"] == []
    assert f"task {missing}: no prediction" in backend.log()  # logged, named, and the batch went on

    # The cause fixed (the task now points at a real upload), the next retrieve predicts it, and only it.
    fixed = tasks[task_ids[0]]["data"]["image"]
    ls.api("PATCH", f"/api/tasks/{missing}", json={"data": {"image": fixed}})
    retrieve_predictions(ls, pid)
    again = {t["id"]: t for t in list_tasks(ls, pid)}
    assert [p["model_version"] for p in again[missing]["predictions"]] == [version], backend.log_tail()
    assert all(len(again[tid]["predictions"]) == 1 for tid in task_ids)

    for tid, photo in zip(task_ids, photos, strict=True):
        pred = tasks[tid]["predictions"][0]
        with Image.open(photo) as im:
            width, height = im.size
        brushes = [r for r in pred["result"] if r["type"] == "brushlabels"]
        boxes = [r for r in pred["result"] if r["type"] == "rectanglelabels"]
        assert brushes, f"task {tid} ({photo.name}): no masks; {pred}"
        assert len(boxes) == len(brushes)  # one rectangle per mask, same detections
        for r in pred["result"]:
            assert (r["original_width"], r["original_height"]) == (width, height)
            (label,) = r["value"][r["type"]]
            assert label in LABELS
        # The stored masks are the engine's on the same upload (fetched by the backend from LS).
        expected = [s for s in reference_engine.segment(photo.read_bytes(), list(LABELS)) if s.mask.any()]
        assert len(expected) == len(brushes)
        for segment, result in zip(expected, brushes, strict=True):
            mask = decode_brush(result)
            assert mask.shape == (height, width)
            assert result["value"]["brushlabels"] == [segment.label]
            assert iou(mask, segment.mask) >= 0.99, (photo.name, segment.label)
        assert 0.0 < pred["score"] <= 1.0

    # Same model version: Label Studio asks for nothing new and stores no duplicates.
    before = len(list_predictions(ls, pid))
    retrieve_predictions(ls, pid)
    assert len(list_predictions(ls, pid)) == before == len(tasks)
    assert all(len(t["predictions"]) == 1 for t in list_tasks(ls, pid))


def test_interactive_textarea_prompt_sets_the_label(label_studio: LabelStudioServer, backend: GunicornBackend,
                                                    photos: list[Path]) -> None:
    ls = label_studio
    pid = create_project(ls, INTERACTIVE_CONFIG, title="e2e-interactive")
    (task_id,) = import_files(ls, pid, photos[:1])
    ml = connect_ml_backend(ls, pid, backend.url, title="grounded-sam-interactive", is_interactive=True,
                            basic_auth=AUTH)
    for prompt in ("coffee cup", "astronaut helmet"):
        answer = predict_interactive(ls, ml["id"], task_id, textarea_context(prompt))
        assert "errors" not in answer, (answer, backend.log_tail())
        result = answer["data"]["result"]
        assert result, f"no mask for {prompt!r}: {answer}"
        assert {tuple(r["value"]["brushlabels"]) for r in result} == {(prompt,)}
        assert all(r["type"] == "brushlabels" and decode_brush(r).any() for r in result)
    # A prompt that names none of the labels: Label Studio relays our 400 and its reason.
    answer = predict_interactive(ls, ml["id"], task_id, textarea_context("zebra"))
    assert "unknown labels" in " ".join(answer.get("errors", [])), answer


def test_wrong_basic_auth_is_refused_and_backend_keeps_serving(label_studio: LabelStudioServer,
                                                              backend: GunicornBackend) -> None:
    ls = label_studio
    pid = create_project(ls, BATCH_CONFIG, title="e2e-wrong-auth")
    refused_before = backend.log().count('"GET /health HTTP/1.1" 401')
    r = ls.api("POST", "/api/ml/", expect=(400,), json={
        "project": pid, "url": backend.url, "title": "wrong", "auth_method": "BASIC_AUTH",
        "basic_auth_user": AUTH[0], "basic_auth_pass": AUTH[1] + "-wrong"})
    assert "authentication parameters" in r.text, r.text  # LS's message for a 401 from /health
    assert ls.api("GET", "/api/ml/", params={"project": pid}).json() == []
    assert backend.log().count('"GET /health HTTP/1.1" 401') > refused_before  # LS's call was refused by us
    ok = backend.session.get(f"{backend.url}/health", auth=AUTH, timeout=10)
    assert ok.status_code == 200 and ok.json()["status"] == "UP"
    assert backend.proc is not None and backend.proc.poll() is None


def test_backend_log_has_no_secrets(label_studio: LabelStudioServer, backend: GunicornBackend) -> None:
    log = backend.log()
    assert "/predict" in log and "/setup" in log  # the log is the one the requests went to
    assert label_studio.token not in log and personal_access_token(label_studio) not in log
    assert "eyJ" not in log  # no JWT at all: neither the PAT nor the access tokens it was traded for
    assert AUTH[1] not in log


def test_wrong_api_key_empties_only_the_tasks_that_need_it(label_studio: LabelStudioServer, photos: list[Path],
                                                           engine: Any) -> None:
    """Our LABEL_STUDIO_API_KEY is wrong: the real Label Studio answers 401 for its upload, that task gets no
    prediction and an error naming the setting, a data-URL task in the same batch still gets masks."""
    import base64

    from backend._wsgi import ServerSettings, create_app
    from backend.engine import Engine
    from backend.ls_api import Credentials
    from backend.ls_model import ModelSettings

    ls = label_studio
    pid = create_project(ls, BATCH_CONFIG, title="e2e-wrong-key")
    import_files(ls, pid, photos[:1])
    (upload_task,) = list_tasks(ls, pid)
    inline_task = {"id": 10 ** 6, "data": {
        "image": "data:image/png;base64," + base64.b64encode(photos[2].read_bytes()).decode()}}
    wrong_key = "not-a-valid-key-" + secrets.token_hex(8)
    quick = Engine(engine.config.replace(max_detections=2, box_threshold=0.2, text_threshold=0.2),
                   detector=engine.detector, segmenter=engine.segmenter)
    client = create_app(engine=quick, settings=ServerSettings(load_on_start=False, model=ModelSettings(
        credentials=Credentials(ls.url, wrong_key)))).test_client()

    response = client.post("/predict", json={"tasks": [upload_task, inline_task], "project": str(pid),
                                             "label_config": BATCH_CONFIG})
    body = response.get_json()
    assert response.status_code == 200, body
    assert "result" not in body["results"][0] and body["results"][1]["result"], body
    (error,) = body["errors"]
    assert "rejected LABEL_STUDIO_API_KEY (HTTP 401)" in error["error"], error
    assert wrong_key not in response.get_data(as_text=True)
    assert client.get("/health").get_json()["status"] == "UP"
