"""Issue 10 item 3: a /setup's hostname and access_token belong to the project that sent them.

Two real loopback stand-ins for Label Studio (tests/test_fetch.py's FakeLabelStudio, which records every
request): project 1 calls /setup with hostname A; requests for project 2 (and for no project) must never
reach A, with or without LABEL_STUDIO_URL, and a /setup token is only sent for its own project.
"""

from __future__ import annotations

import pytest

from backend._wsgi import ServerSettings, create_app
from backend.fetch import FetchSettings
from backend.ls_api import Credentials
from backend.ls_model import ModelSettings
from tests.test_fetch import LEGACY_TOKEN, FakeLabelStudio, png_bytes

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
          '<Label value="cat"/></BrushLabels></View>')
FETCH = FetchSettings(max_bytes=1 << 20, timeout=5)


@pytest.fixture(scope="module")
def quick_engine(engine):
    from backend.engine import Engine

    return Engine(engine.config.replace(max_detections=1), detector=engine.detector, segmenter=engine.segmenter)


@pytest.fixture
def host_a():
    with FakeLabelStudio() as ls:
        yield ls


@pytest.fixture
def host_b():
    with FakeLabelStudio() as ls:
        yield ls


def client_with(engine, credentials: Credentials | None = None):
    settings = ServerSettings(load_on_start=False, model=ModelSettings(credentials=credentials, fetch=FETCH))
    return create_app(engine=engine, settings=settings).test_client()


def setup(client, project: str, hostname: str, token: str = LEGACY_TOKEN) -> None:
    body = {"project": project, "schema": CONFIG, "hostname": hostname, "access_token": token}
    response = client.post("/setup", json=body)
    assert response.status_code == 200, response.get_json()


def predict_upload(client, project: str, task_id: int, path: str) -> dict:
    body = {"tasks": [{"id": task_id, "data": {"image": path}}], "project": project, "label_config": CONFIG}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_setup_hostname_is_not_used_for_other_projects(quick_engine, host_a):
    """No LABEL_STUDIO_URL: project 1's /setup hostname must not become project 2's Label Studio."""
    host_a.files["/data/upload/2/x.png"] = png_bytes()
    host_a.tasks[7] = {"id": 7, "project": 2, "data": {"image": "/data/upload/2/x.png"}}
    client = client_with(quick_engine)
    setup(client, "1.1700000000", host_a.url)

    body = predict_upload(client, "2.1700000000", 20, "/data/upload/2/x.png")
    (error,) = body["errors"]
    assert "LABEL_STUDIO_URL" in error["error"] and "Label Studio project" in error["error"], error
    # The explain UI's task routes: for another project, or for none, A is not asked either.
    for query in ("?project=2", ""):
        response = client.get(f"/api/tasks/7{query}")
        assert response.status_code == 502 and "LABEL_STUDIO_URL" in response.get_json()["error"]
    assert host_a.requests == []

    # Project 1 itself does use its own connection.
    body = predict_upload(client, "1.1700000000", 10, "/data/upload/2/x.png")
    assert "errors" not in body, body
    assert host_a.requests and all(auth == f"Token {LEGACY_TOKEN}" for _, _, auth in host_a.requests)


def test_setup_token_with_label_studio_url_is_used_only_for_its_project(quick_engine, host_a, host_b):
    """LABEL_STUDIO_URL=B without a key: project 1's /setup token goes to B for project 1 only; its
    hostname A is never contacted (our URL for Label Studio wins), and project 2 gets no key."""
    host_b.files["/data/upload/1/x.png"] = png_bytes(seed=1)
    client = client_with(quick_engine, Credentials(host_b.url, ""))
    setup(client, "1.1700000000", host_a.url)

    body = predict_upload(client, "2.1700000000", 20, "/data/upload/1/x.png")
    assert body["errors"] and "LABEL_STUDIO_API_KEY" in body["errors"][0]["error"], body
    assert all(auth is None for _, _, auth in host_b.requests), host_b.requests
    asked_for_2 = len(host_b.requests)

    body = predict_upload(client, "1.1700000000", 10, "/data/upload/1/x.png")
    assert "errors" not in body, body
    assert [auth for _, _, auth in host_b.requests[asked_for_2:]] == [f"Token {LEGACY_TOKEN}"]
    assert host_a.requests == []


@pytest.mark.parametrize(("env", "host"), [
    ({}, "127.0.0.1"),
    ({"BASIC_AUTH_USER": "u"}, "127.0.0.1"),  # half-configured auth is no auth
    ({"BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"}, "0.0.0.0"),
    ({"HOST": "0.0.0.0"}, "0.0.0.0"),  # opened up explicitly
    ({"HOST": "10.1.2.3", "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"}, "10.1.2.3"),
])
def test_gunicorn_listens_on_loopback_unless_auth_or_host_is_set(monkeypatch, env, host):
    import runpy
    from pathlib import Path

    for name in ("HOST", "BIND", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    conf = runpy.run_path(str(Path(__file__).resolve().parents[1] / "gunicorn.conf.py"))
    assert conf["bind"] == f"{host}:9090"


def test_run_script_listens_on_loopback_unless_auth_or_host_is_set():
    """scripts/run.sh's rule, read from the script: the same three cases as gunicorn.conf.py."""
    import subprocess
    from pathlib import Path

    script = (Path(__file__).resolve().parents[1] / "scripts" / "run.sh").read_text()
    start = script.index('if [[ -z "${HOST:-}" ]]; then')
    block = script[start:script.index("\nfi\n", start) + 4]
    for env, host in (({}, "127.0.0.1"), ({"BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"}, "0.0.0.0"),
                      ({"HOST": "0.0.0.0"}, "0.0.0.0")):
        run = subprocess.run(["bash", "-c", block + 'echo "HOST=$HOST"'], check=False,
                             env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=10)
        assert run.stdout.strip() == f"HOST={host}", run
        assert ("HOST=0.0.0.0" in run.stderr) == (host == "127.0.0.1"), run.stderr
