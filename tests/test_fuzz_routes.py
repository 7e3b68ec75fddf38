"""A bounded fuzz of the JSON routes: valid bodies with random parts replaced, removed or added
(random JSON of random shapes), and random whole bodies. Whatever arrives, the server answers JSON:
a 2xx, or a 4xx with ``{"error": "<cause>"}`` and an ASCII reason phrase; never a 500.

The leaves are drawn from a curated set (odd types, out-of-range numbers, unknown and non-ASCII
words, broken images and URLs) rather than arbitrary text, and every image is one of two, whose
features the engine caches: a valid body costs one text-encoder pass, the fuzz stays in seconds.
Raise FUZZ_EXAMPLES for a longer run; examples are derandomised so CI sees the same ones, unless
FUZZ_RANDOM=1 (new examples each run).
"""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from backend._wsgi import ServerSettings, create_app
from backend.fetch import FetchSettings
from backend.ls_api import Credentials
from backend.ls_model import ModelSettings
from tests.test_fetch import LEGACY_TOKEN, FakeLabelStudio, data_url

BRUSH = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
         '<Label value="cat"/><Label value="dog" predicted_values="puppy"/></BrushLabels>'
         '<TextArea name="prompt" toName="image"/><Number name="box_threshold" toName="image"/></View>')
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def tiny_png(width: int = 12, height: int = 9) -> bytes:
    import skimage.data

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).resize((width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = data_url(tiny_png())
STRINGS = ["", " ", "cat", "zebra", "猫", " . ", ",;", "\x00", "x" * 300, "-1", "true",
           "data:image/png;base64,!!!", "data:,", "data:image/png;base64,", "aGVsbG8=", IMAGE,
           data_url(b"\x89PNG\r\n\x1a\n truncated"), data_url(tiny_png(1, 700)),
           "http://127.0.0.1:1/x.png", "/data/upload/1/missing.png", "s3://bucket/x.png",
           "<View/>", "<View><Image", BRUSH, "1.1700000000", "ANNOTATION_CREATED", "PROJECT_DELETED", "textarea"]
NUMBERS = [0.3, 1, -1, 2, -0.5, 1e300, -1e300, 2 ** 70, -(2 ** 63), 7, 0]
KEYS = ["prompt", "box_threshold", "text_threshold", "image", "data", "id", "project", "result", "value",
        "text", "from_name", "to_name", "type", "context", "tasks", "annotation", "annotations", "number",
        "alpha", "show_labels", "extra_params", "label_config", "schema", "", "猫"]
LEAVES = st.none() | st.booleans() | st.sampled_from(NUMBERS) | st.sampled_from(STRINGS)
VALUES = st.recursive(LEAVES, lambda children: st.lists(children, max_size=3)
                      | st.dictionaries(st.sampled_from(KEYS), children, max_size=3), max_leaves=8)


def textarea(text: Any) -> dict[str, Any]:
    return {"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": [text]}}


BASES: dict[str, dict[str, Any]] = {
    "/setup": {"project": "1.1700000000", "schema": BRUSH, "hostname": "http://127.0.0.1:1",
               "access_token": "t0ken", "extra_params": {"prompt": "cat", "box_threshold": 1}},
    "/predict": {"tasks": [{"id": 1, "data": {"image": IMAGE}}], "project": "1.1700000000", "label_config": BRUSH,
                 "params": {"context": {"result": [textarea("cat")]}}},
    "/webhook": {"action": "ANNOTATION_CREATED", "project": {"id": 1},
                 "annotation": {"project": 1, "result": [textarea("cat")]}},
    "/api/segment": {"image": IMAGE, "prompt": "cat", "box_threshold": 1, "text_threshold": 1},
    "/api/explain": {"image": IMAGE, "prompt": ["cat"], "alpha": 0.5, "show_labels": True},
    "/api/tasks/1/segment": {"prompt": "cat", "box_threshold": 1},
    "/api/tasks/1/explain": {"prompt": "cat", "alpha": 0.7, "show_labels": False},
}


@pytest.fixture(scope="module")
def fuzz_engine(engine):
    """The session engine's models with caches of their own; at most one detection, and none at the
    default thresholds (1.0), so SAM decodes only when a body asks for lower ones."""
    from backend.engine import Engine

    config = engine.config.replace(max_detections=1, box_threshold=1.0, text_threshold=1.0)
    return Engine(config, detector=engine.detector, segmenter=engine.segmenter)


@pytest.fixture(scope="module")
def label_studio() -> Iterator[FakeLabelStudio]:
    with FakeLabelStudio() as ls:
        ls.files["/data/upload/1/x.png"] = tiny_png()
        ls.tasks[1] = {"id": 1, "project": 1, "data": {"image": "/data/upload/1/x.png"}, "predictions": []}
        ls.projects[1] = {"id": 1, "label_config": BRUSH}
        yield ls


@pytest.fixture(scope="module")
def new_client(fuzz_engine, label_studio):
    """A fresh app per example (what one /setup remembers must not steer the next example)."""
    model = ModelSettings(credentials=Credentials(label_studio.url, LEGACY_TOKEN),
                          fetch=FetchSettings(max_bytes=1 << 20, timeout=5))

    def new() -> Any:
        return create_app(engine=fuzz_engine, settings=ServerSettings(model=model, load_on_start=False)).test_client()

    # Warm the caches with the valid bodies (the models run here, once each, not inside the fuzz).
    for route, body in BASES.items():
        response = new().post(route, json=body)
        assert response.status_code == 200, (route, response.get_json())
    return new


def paths(tree: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every node's path below the root: dict keys and list indices."""
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, child in children:
        yield prefix + (key,)
        yield from paths(child, prefix + (key,))


def mutate(body: Any, data: st.DataObject) -> Any:
    """``body`` with 1-3 random nodes replaced by random JSON, removed, or given a random new key."""
    body = copy.deepcopy(body)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from([(), *paths(body)]), label="path")
        action = data.draw(st.sampled_from(["replace", "remove", "add"]), label="action")
        if path == ():  # the whole body
            body = data.draw(VALUES, label="body") if action == "replace" else body
            continue
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        if action == "replace":
            parent[path[-1]] = data.draw(VALUES, label="value")
        elif action == "remove":
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][data.draw(st.sampled_from(KEYS), label="key")] = data.draw(VALUES, label="value")
        elif isinstance(parent[path[-1]], list):
            parent[path[-1]].append(data.draw(VALUES, label="value"))
    return body


def assert_json_answer(response: Any, route: str, body: Any) -> None:
    status = response.status_code
    payload = response.get_json(silent=True)
    assert status < 500, (route, body, status, payload)
    assert isinstance(payload, dict), (route, body, status, response.data[:300])
    if status >= 400:
        assert isinstance(payload.get("error"), str) and payload["error"], (route, body, payload)
        reason = response.status.split(" ", 1)[1]
        assert reason.isascii() and reason.isprintable(), reason


@pytest.mark.parametrize("route", list(BASES))
@FUZZ
@given(data=st.data())
def test_mutated_bodies_never_get_a_500(new_client, route, data):
    body = mutate(BASES[route], data)
    response = new_client().post(route, data=json.dumps(body), content_type="application/json")
    assert_json_answer(response, route, body)


@pytest.mark.parametrize("route", list(BASES))
@FUZZ
@given(body=VALUES)
def test_random_bodies_get_a_4xx_with_an_error(new_client, route, body):
    response = new_client().post(route, data=json.dumps(body), content_type="application/json")
    assert_json_answer(response, route, body)
    if not isinstance(body, dict):
        assert response.status_code == 400 and "JSON object" in response.get_json()["error"]


QUERY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@pytest.mark.parametrize("method, route", [("get", "/api/tasks/1"), ("get", "/api/tasks/1/image"),
                                           ("post", "/api/tasks/1/segment"), ("post", "/api/tasks/1/explain")])
@FUZZ
@given(project=LEAVES.map(str) | QUERY_TEXT)
def test_task_routes_take_any_project_query(new_client, method, route, project):
    response = getattr(new_client(), method)(route, query_string={"project": project})
    if route.endswith("/image") and response.status_code == 200:
        assert response.mimetype == "image/png"
        return
    assert_json_answer(response, route, project)


@pytest.mark.parametrize("route", ["/api/segment", "/api/explain"])
@FUZZ
@given(fields=st.dictionaries(st.sampled_from(KEYS), st.sampled_from(STRINGS) | LEAVES.map(json.dumps), max_size=4),
       upload=st.sampled_from([None, tiny_png(), b"", b"\x89PNG\r\n\x1a\n", b"GIF89a"]))
def test_multipart_forms_never_get_a_500(new_client, route, fields, upload):
    form: dict[str, Any] = dict(fields)
    if upload is not None:
        form["image"] = (io.BytesIO(upload), "upload.png")
    if not form:
        form["x"] = ""
    response = new_client().post(route, data=form, content_type="multipart/form-data")
    assert_json_answer(response, route, {**fields, "upload": upload})
