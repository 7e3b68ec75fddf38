"""The real-Label-Studio harness itself: uploads round-trip, and the ML-backend helpers work.

The second test uses a minimal stand-in ML backend (stdlib HTTP server speaking the protocol in
/work/shared/reference/label-studio-1.23.2-ml-protocol.jsonl) so the helpers are proven before the
real backend exists; Label Studio itself is never mocked.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from tests.ls_server import (
    LS_VERSION,
    LabelStudioServer,
    connect_ml_backend,
    create_project,
    fetch_upload,
    import_files,
    list_predictions,
    list_tasks,
    predict_interactive,
    retrieve_predictions,
)

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="cat"/><Label value="dog"/></BrushLabels></View>'
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """chelsea as PNG, astronaut as JPEG (two formats, two sizes)."""
    import skimage.data

    d = tmp_path_factory.mktemp("photos")
    cat, astro = d / "chelsea.png", d / "astronaut.jpg"
    Image.fromarray(skimage.data.chelsea()).save(cat)
    Image.fromarray(skimage.data.astronaut()).save(astro, quality=90)
    return [cat, astro]


def test_upload_round_trip(label_studio: LabelStudioServer, photos: list[Path]) -> None:
    ls = label_studio
    assert ls.api("GET", "/api/version/").json()["release"] == LS_VERSION
    jwt = ls.api("GET", "/api/jwt/settings").json()
    assert jwt["legacy_api_tokens_enabled"] is True

    pid = create_project(ls, LABEL_CONFIG, title="harness-upload")
    assert ls.client.projects.get(id=pid).label_config == LABEL_CONFIG  # the SDK client works too
    task_ids = import_files(ls, pid, photos)
    assert len(task_ids) == 2

    tasks = {t["id"]: t for t in list_tasks(ls, pid)}
    assert sorted(tasks) == sorted(task_ids)
    for tid, photo in zip(task_ids, photos, strict=True):
        url = tasks[tid]["data"]["image"]
        assert url.startswith(f"/data/upload/{pid}/") and url.endswith(photo.name), url
        assert tasks[tid]["predictions"] == []
        # The ML backend fetches images exactly like this: LS host + URL + legacy token.
        assert fetch_upload(ls, url) == photo.read_bytes()

    anon = requests.get(ls.url + tasks[task_ids[0]]["data"]["image"], timeout=30,
                        allow_redirects=False)
    assert anon.status_code in (401, 403) or 300 <= anon.status_code < 400


# -- a stand-in ML backend ------------------------------------------------------------------------
class _FakeBackend:
    """/health, /setup, /predict with basic auth; fetches each image from LS like a real backend."""

    user, password, version = "mluser", "mlpass", "fake-0.1"

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.errors: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _send(self, code: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _authorized(self) -> bool:
                want = base64.b64encode(f"{outer.user}:{outer.password}".encode()).decode()
                return self.headers.get("Authorization") == f"Basic {want}"

            def do_GET(self) -> None:
                outer.requests.append(("GET " + self.path.split("?")[0], None))
                if not self._authorized():
                    return self._send(401, {"error": "auth"})
                self._send(200, {"status": "UP", "model_class": "Fake", "v2": False})

            def do_POST(self) -> None:
                path = self.path.split("?")[0]
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(("POST " + path, body))
                if not self._authorized():
                    return self._send(401, {"error": "auth"})
                if path == "/setup":
                    outer.setup = body
                    return self._send(200, {"model_version": outer.version})
                if path == "/predict":
                    try:
                        return self._send(200, {"results": [outer.predict(t) for t in body["tasks"]]})
                    except Exception as e:  # surfaces in the test, not only in LS's log
                        outer.errors.append(repr(e))
                        return self._send(500, {"error": repr(e)})
                self._send(404, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.setup: dict[str, Any] = {}

    def predict(self, task: dict[str, Any]) -> dict[str, Any]:
        from label_studio_sdk.converter.brush import mask2rle

        r = requests.get(self.setup["hostname"] + task["data"]["image"], timeout=30,
                         headers={"Authorization": f"Token {self.setup['access_token']}"})
        r.raise_for_status()
        w, h = Image.open(io.BytesIO(r.content)).size
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2, w // 4: w // 2] = 255
        return {"model_version": self.version, "score": 0.5, "result": [{
            "from_name": "tag", "to_name": "image", "type": "brushlabels",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["cat"]}}]}


@pytest.fixture()
def fake_backend() -> Iterator[_FakeBackend]:
    fb = _FakeBackend()
    t = threading.Thread(target=fb.server.serve_forever, daemon=True)
    t.start()
    yield fb
    fb.server.shutdown()
    fb.server.server_close()


def test_ml_backend_helpers(label_studio: LabelStudioServer, photos: list[Path],
                            fake_backend: _FakeBackend) -> None:
    from label_studio_sdk.converter.brush import decode_rle

    ls = label_studio
    pid = create_project(ls, LABEL_CONFIG, title="harness-ml")
    task_ids = import_files(ls, pid, photos)
    ml = connect_ml_backend(ls, pid, fake_backend.url, is_interactive=True,
                            basic_auth=(fake_backend.user, fake_backend.password))
    assert ml["project"] == pid and ml["is_interactive"] is True
    # LS told the backend where to fetch data from, with the project creator's legacy token.
    assert fake_backend.setup["hostname"] == ls.url
    same_token = fake_backend.setup["access_token"] == ls.token
    assert same_token, "LS sent the ML backend a different access_token"
    assert fake_backend.setup["schema"] == LABEL_CONFIG

    out = retrieve_predictions(ls, pid)
    assert out["processed_items"] == 2, out
    assert not fake_backend.errors, fake_backend.errors
    tasks = {t["id"]: t for t in list_tasks(ls, pid)}
    assert sorted(tasks) == sorted(task_ids)
    for tid, photo in zip(task_ids, photos, strict=True):
        preds = tasks[tid]["predictions"]
        assert len(preds) == 1, preds
        (res,) = preds[0]["result"]
        assert preds[0]["model_version"] == fake_backend.version
        w, h = Image.open(photo).size
        assert (res["original_width"], res["original_height"]) == (w, h)
        mask = decode_rle(res["value"]["rle"]).reshape(h, w, 4)[:, :, 3]
        assert mask.sum() == 255 * (h // 2 - h // 4) * (w // 2 - w // 4)
    assert len(list_predictions(ls, pid)) == 2

    # Same model version again: LS does not call /predict for tasks that already have one.
    n_predict = sum(1 for k, _ in fake_backend.requests if k == "POST /predict")
    retrieve_predictions(ls, pid)
    assert sum(1 for k, _ in fake_backend.requests if k == "POST /predict") == n_predict

    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                           "value": {"text": ["a cat"]}}]}
    inter = predict_interactive(ls, ml["id"], task_ids[0], context)
    assert "errors" not in inter, inter
    assert inter["data"]["result"][0]["type"] == "brushlabels"
    last_kind, last_body = fake_backend.requests[-1]
    assert last_kind == "POST /predict" and last_body["params"]["context"] == context
    assert [t["id"] for t in last_body["tasks"]] == [task_ids[0]]
