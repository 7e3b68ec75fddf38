"""docker-compose.yml and docker/: validated by docker-compose 1.29 (no Docker engine needed), and
checked to hold what the README's Docker section promises."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def _required() -> bool:
    return os.environ.get("REQUIRE_DOCKER_COMPOSE", "") not in ("", "0")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the file's YAML anchors and merge keys


def docker_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Docker\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Docker' section"
    return match.group(1)


def test_validate_compose_script() -> None:
    installable = os.geteuid() == 0 and shutil.which("apt-get") is not None
    if shutil.which("docker-compose") is None and not installable:
        message = "docker-compose is missing and can't be installed here (needs root + apt-get)"
        if _required():
            pytest.fail(f"REQUIRE_DOCKER_COMPOSE is set but {message}", pytrace=False)
        pytest.skip(message)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "validate_compose.sh")], capture_output=True, text=True,
                         timeout=600)
    if run.returncode == 127 and not _required():  # apt-get couldn't install it (no registry access)
        pytest.skip(run.stderr.strip())
    assert run.returncode == 0, run.stdout + run.stderr
    assert "is valid" in run.stdout


def test_services_volumes_and_env(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"label-studio", "backend", "explain-ui", "backend-gpu"} <= set(services)
    assert set(compose["volumes"]) >= {"model_cache", "label_studio_data", "backend_data"}

    ls = services["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    assert ls["environment"]["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert ls["environment"]["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    # The admin's token is the key the backend uses: one variable feeds both.
    assert "LABEL_STUDIO_API_KEY" in ls["environment"]["LABEL_STUDIO_USER_TOKEN"]
    assert ls["environment"]["ML_TIMEOUT_PREDICT"] == "${ML_TIMEOUT_PREDICT:-100}"

    for name, dockerfile in (("backend", "docker/Dockerfile"), ("backend-gpu", "docker/Dockerfile.cuda")):
        svc = services[name]
        env = svc["environment"]
        assert svc["build"] == {"context": ".", "dockerfile": dockerfile}
        assert (ROOT / dockerfile).is_file()
        # No port of its own on the host: that is backend-proxy's (nginx buffering whole requests).
        assert env["PORT"] == "9090" and env["HOST"] == "0.0.0.0" and svc["expose"] == ["9090"]
        assert "ports" not in svc
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert "LABEL_STUDIO_API_KEY" in env["LABEL_STUDIO_API_KEY"]
        assert {"BASIC_AUTH_USER", "BASIC_AUTH_PASS"} <= set(env)
        assert "model_cache:/app/model_cache" in svc["volumes"]
        # The job store outlives the container, and both backends share it.
        assert env["DATA_DIR"] == "/app/data" and "backend_data:/app/data" in svc["volumes"]
        assert env["PREDICT_DEADLINE_S"] == "${PREDICT_DEADLINE_S:-80}"
        assert svc["command"] == ["backend"]
        assert svc["healthcheck"]["test"][-1] == "/app/docker/healthcheck.py"
    assert services["backend"].get("profiles") is None  # the CPU backend starts by default
    gpu = services["backend-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]

    proxy = services["backend-proxy"]
    assert proxy["image"].startswith("nginx:") and proxy["ports"] == ["${BACKEND_PORT:-9090}:9090"]
    assert proxy["environment"]["BACKEND_UPSTREAM"] == "${BACKEND_UPSTREAM:-backend:9090}"
    (mount,) = proxy["volumes"]
    template, target = mount.split(":")[:2]
    assert (ROOT / template).is_file() and target.startswith("/etc/nginx/templates/")
    conf = (ROOT / template).read_text()
    for directive in ("proxy_request_buffering on", "client_body_timeout", "client_header_timeout",
                      "client_max_body_size", "${BACKEND_UPSTREAM}"):
        assert directive in conf, directive

    ui = services["explain-ui"]
    assert ui["command"] == ["explain-ui"] and ui["image"] == services["backend"]["image"]
    assert "http://backend:9090" in ui["environment"]["BACKEND_URL"]
    assert {"BASIC_AUTH_USER", "BASIC_AUTH_PASS"} <= set(ui["environment"])


def test_replicas_profile_shares_postgres_behind_the_proxy(compose: dict[str, Any]) -> None:
    """Profile "replicas": two backends on one PostgreSQL job store, reached through backend-proxy."""
    services = compose["services"]
    postgres = services["postgres"]
    assert postgres["profiles"] == ["replicas"] and postgres["image"].startswith("postgres:")
    db = postgres["environment"]
    replicas = [services[f"backend-replica-{i}"] for i in (1, 2)]
    for svc in replicas:
        env = svc["environment"]
        assert svc["profiles"] == ["replicas"] and svc["command"] == ["backend"] and "ports" not in svc
        assert env["JOBS_DB"].startswith(f"postgresql+psycopg://{db['POSTGRES_USER']}:")
        assert env["JOBS_DB"].endswith(f"@postgres:5432/{db['POSTGRES_DB']}")
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        # One name for both: nginx resolves it per request (resolver + a variable proxy_pass) and
        # takes turns between the addresses Docker's DNS answers.
        assert svc["networks"]["default"]["aliases"] == ["backend-replicas"]
        assert env["BASIC_AUTH_PASS"] == services["backend"]["environment"]["BASIC_AUTH_PASS"]
    conf = (ROOT / "docker" / "nginx.conf.template").read_text()
    assert re.search(r"^\s*resolver 127\.0\.0\.11", conf, re.M) and "set $backend http://${BACKEND_UPSTREAM}" in conf
    assert "backend-replicas:9090" in docker_section()


def test_readme_env_exists(compose: dict[str, Any]) -> None:
    """Every variable the README's Docker table documents is read by the compose file, and every
    secret the compose file requires is in docker/env.example."""
    section = docker_section()
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = {name for line in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1])}
    assert len(documented) >= 15, documented
    text = COMPOSE.read_text()
    interpolated = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert documented - interpolated == set(), "README documents variables the compose file never reads"
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert required == {"LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_PASS"}
    example = (ROOT / "docker" / "env.example").read_text()
    assert all(re.search(rf"^{name}=", example, re.M) for name in required)
    for promised in ("model_cache", "http://backend:9090", "LABEL_STUDIO_URL=http://label-studio:8080",
                     "LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false", "docker/Dockerfile.cuda", "--profile gpu",
                     "backend_data", "PREDICT_DEADLINE_S"):
        assert promised in section, promised


def test_dockerfiles_install_the_lock(tmp_path: Path) -> None:
    """The CPU image's grep filters, run on requirements.lock: torch + torchvision from the CPU index,
    everything else from the lock except CUDA-only packages."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    keep, drop = re.findall(r"grep -v?E '([^']+)' /tmp/requirements.lock", dockerfile)[:2]
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    torch = [line for line in lock if re.search(keep, line)]
    rest = [line for line in lock if not re.search(drop, line)]
    assert sorted(t.split("==")[0] for t in torch) == ["torch", "torchvision"]
    assert not [line for line in rest if re.match(r"(nvidia-|cuda-|triton|torch==|torchvision==)", line)]
    cuda_only = [line for line in lock if re.match(r"(nvidia-|cuda-|triton==)", line)]
    assert cuda_only and sorted(rest + torch + cuda_only) == sorted(lock)  # nothing else is dropped
    for path in ("docker/entrypoint.sh", "docker/healthcheck.py", "docker/Dockerfile.cuda", "gunicorn.conf.py",
                 "model_cache/manifest.json"):
        assert (ROOT / path).is_file(), path
    assert os.access(ROOT / "docker" / "entrypoint.sh", os.X_OK)
    assert subprocess.run(["sh", "-n", str(ROOT / "docker" / "entrypoint.sh")]).returncode == 0
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "python -m backend.weights download" in entrypoint
    assert "gunicorn -c gunicorn.conf.py backend._wsgi:app" in entrypoint and "python -m explain_ui" in entrypoint
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".venv", "model_cache/*", "!model_cache/manifest.json", ".env"} <= set(ignored)


# -- the container health check, against a stand-in /health ---------------------------------------------------
@pytest.fixture()
def health_server() -> Iterator[dict[str, Any]]:
    state: dict[str, Any] = {"status": "loading", "auth": "Basic " + base64.b64encode(b"u:p").decode()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            ok = self.path == "/health" and self.headers.get("Authorization") == state["auth"]
            body = json.dumps({"status": state["status"]} if ok else {"error": "auth"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["port"] = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    server.shutdown()
    server.server_close()


def test_healthcheck_script(health_server: dict[str, Any]) -> None:
    def check(**env: str) -> int:
        full = {"PATH": os.environ.get("PATH", ""), "PORT": str(health_server["port"]), "NO_PROXY": "*", **env}
        return subprocess.run(["python3", str(ROOT / "docker" / "healthcheck.py")], env=full, capture_output=True,
                              timeout=30).returncode

    assert check(BASIC_AUTH_USER="u", BASIC_AUTH_PASS="p") == 1  # loading
    health_server["status"] = "UP"
    assert check(BASIC_AUTH_USER="u", BASIC_AUTH_PASS="p") == 0
    assert check(BASIC_AUTH_USER="u", BASIC_AUTH_PASS="wrong") == 1
    assert check(PORT="1") == 1  # nothing listening


def test_ray_profile_runs_a_head_and_workers_from_the_backend_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["profiles"] == worker["profiles"] == ["ray"]
    assert head["image"] == worker["image"] == services["backend"]["image"]
    assert head["command"][:3] == ["ray", "start", "--head"] and "--block" in head["command"]
    assert worker["command"] == ["ray", "start", "--address=ray-head:6379", "--block"]
    for node in (head, worker):  # the engine loads from the shared cache; no Label Studio key on the nodes
        assert "model_cache:/app/model_cache" in node["volumes"]
        assert node["environment"]["RAY_USAGE_STATS_ENABLED"] == "0"
        assert not any("API_KEY" in k for k in node["environment"])
    assert "ray" not in (services["backend"].get("profiles") or [])  # the default stays one process
    assert "RAY_ADDRESS" not in services["backend"]["environment"]


def test_ray_profile_backend_runs_its_jobs_on_the_head(compose: dict[str, Any]) -> None:
    services = compose["services"]
    backend, plain = services["backend-ray"], services["backend"]
    assert backend["profiles"] == ["ray"] and backend["image"] == plain["image"]
    assert backend["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    # Same engine as the nodes (their actors refuse a job whose model_version differs), same job store.
    for name, value in services["ray-head"]["environment"].items():
        if name not in ("RAY_USAGE_STATS_ENABLED",):
            assert backend["environment"][name] == value, name
    assert {k: v for k, v in backend["environment"].items() if k not in ("RAY_ADDRESS", "RAY_USAGE_STATS_ENABLED")} \
        == plain["environment"]
    assert backend["volumes"] == plain["volumes"]
    # The driver joins the cluster as a node without CPUs, then serves as the plain backend does.
    script = backend["command"][-1]
    assert "ray start --address=ray-head:6379 --num-cpus=0" in script and script.endswith("entrypoint.sh backend")
