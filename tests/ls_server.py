"""A real Label Studio 1.23.2 (from `.venv-ls`) for end-to-end tests, plus REST helpers.

    with LabelStudioServer() as ls:
        pid = create_project(ls, LABEL_CONFIG)
        task_ids = import_files(ls, pid, [Path("cat.png")])
        connect_ml_backend(ls, pid, "http://127.0.0.1:9090")
        retrieve_predictions(ls, pid)
        tasks = list_tasks(ls, pid)  # each with "predictions"

The server runs from a fresh temp dir (SQLite, own media dir), on a free port of 127.0.0.1, with a
superuser whose legacy API token is `ls.token`. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import atexit
import mimetypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
# LS_VENV overrides, as in scripts/install_label_studio.sh.
DEFAULT_VENV = Path(os.environ.get("LS_VENV") or REPO_ROOT / ".venv-ls")
LS_VERSION = "1.23.2"

# Inherited variables LS would read (it looks up LABEL_STUDIO_X, HEARTEX_X, then bare X); dropping
# them keeps the server hermetic. PYTHONPATH etc. would leak the test venv into .venv-ls.
_DROP_ENV_PREFIXES = ("LABEL_STUDIO_", "HEARTEX_", "DJANGO_")
_DROP_ENV_NAMES = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DATABASE_NAME", "HOST", "PORT",
                   "USERNAME", "PASSWORD", "USER_TOKEN", "REDIS_LOCATION", "DEBUG", "LOG_LEVEL"}


class LabelStudioError(RuntimeError):
    """Label Studio failed to start or answered an API call with an error."""


def label_studio_installed(venv: Path = DEFAULT_VENV) -> bool:
    """True if `venv` has a `label-studio` executable."""
    return (venv / "bin" / "label-studio").exists()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LabelStudioServer:
    """Starts/stops a real Label Studio; exposes `url`, `token`, `client` (label_studio_sdk)."""

    def __init__(
        self,
        venv: Path = DEFAULT_VENV,
        *,
        startup_timeout: float = 300.0,
        extra_env: dict[str, str] | None = None,
        keep_dir: bool = False,
    ) -> None:
        self.venv = Path(venv)
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.keep_dir = keep_dir or os.environ.get("LS_KEEP_DIR") == "1"
        self.username = "e2e@example.com"
        self.password = secrets.token_urlsafe(16)
        self.token = secrets.token_hex(20)  # 40 chars: the max length of a DRF token key
        self.port = 0
        self.url = ""
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None
        self.used_db_template = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {self.token}"
        # Proxies from the environment must not see traffic meant for 127.0.0.1.
        self.session.trust_env = False

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> LabelStudioServer:
        """Launch `label-studio start` and block until it serves the API with our token."""
        exe = self.venv / "bin" / "label-studio"
        if not exe.exists():
            raise LabelStudioError(f"{exe} not found; run scripts/install_label_studio.sh")
        self.workdir = Path(tempfile.mkdtemp(prefix="ls-e2e-"))
        data_dir = self.workdir / "data"
        data_dir.mkdir()
        self.log_path = self.workdir / "label-studio.log"
        # A pre-migrated empty DB (made by the install script) skips ~80 s of migrations.
        template = self.venv / "ls-db-template" / "label_studio.sqlite3"
        self.used_db_template = template.is_file()
        if self.used_db_template:
            shutil.copyfile(template, data_dir / "label_studio.sqlite3")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

        env = {k: v for k, v in os.environ.items()
               if not k.startswith(_DROP_ENV_PREFIXES) and k not in _DROP_ENV_NAMES}
        env.update({
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_DATABASE_NAME": str(data_dir / "label_studio.sqlite3"),
            # HOST is what LS sends an ML backend as `hostname` to fetch /data/upload/... from.
            "LABEL_STUDIO_HOST": self.url,
            "LABEL_STUDIO_PORT": str(self.port),
            # Credentials via env, not argv, so the token never shows up in `ps`.
            "LABEL_STUDIO_USERNAME": self.username,
            "LABEL_STUDIO_PASSWORD": self.password,
            "LABEL_STUDIO_USER_TOKEN": self.token,
            # Makes the org created with the first user accept legacy "Token <key>" auth.
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            # Allow ML backends on 127.0.0.1.
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "false",
            # label_studio settings default to a real Sentry DSN; tests send nothing off-box.
            "LABEL_STUDIO_SENTRY_DSN": "",
            "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        cmd = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1",
               "--port", str(self.port), "--data-dir", str(data_dir),
               "--database", str(data_dir / "label_studio.sqlite3"), "--enable-legacy-api-token"]
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)  # own process group to kill
        atexit.register(self.stop)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.keep_dir = True  # leave the log (and DB) for a post-mortem
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        last = "no answer yet"
        while time.monotonic() - t0 < self.startup_timeout:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise LabelStudioError(
                    f"label-studio exited with code {self._proc.returncode} during startup\n"
                    f"{self.log_tail()}")
            if self.log_path is not None and " is in use." in self.log_path.read_text(errors="replace"):
                # LS silently moves to another port; ours was taken between probe and bind.
                raise LabelStudioError(f"port {self.port} was taken before LS bound it\n"
                                       f"{self.log_tail()}")
            try:
                r = self.session.get(f"{self.url}/api/current-user/whoami", timeout=5)
                if r.status_code == 200 and r.json().get("email") == self.username:
                    return
                last = f"whoami -> HTTP {r.status_code}"
            except requests.RequestException as e:
                last = type(e).__name__
            time.sleep(1.0)
        raise LabelStudioError(
            f"Label Studio at {self.url} not ready after {self.startup_timeout:.0f}s ({last})\n"
            f"{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the whole process group (TERM, then KILL) and remove the temp dir."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
            except ProcessLookupError:
                pass
        if proc is not None:
            try:  # stragglers (runserver children) in the same group
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.workdir is not None and not self.keep_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- access ----------------------------------------------------------------------------------
    def log_tail(self, lines: int = 60) -> str:
        """Last lines of LS's stdout/stderr, token redacted."""
        if self.log_path is None or not self.log_path.exists():
            return "(no Label Studio log)"
        text = self.log_path.read_text(errors="replace").replace(self.token, "<token>")
        return f"--- tail of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    @property
    def client(self) -> Any:
        """A `label_studio_sdk.LabelStudio` client logged in with the legacy token."""
        if self._client is None:
            from label_studio_sdk import LabelStudio
            self._client = LabelStudio(base_url=self.url, api_key=self.token)
        return self._client

    def api(self, method: str, path: str, *, expect: Iterable[int] = (200, 201),
            timeout: float = 120.0, **kwargs: Any) -> requests.Response:
        """Authenticated request to `url + path`; raises LabelStudioError on other statuses."""
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        r = self.session.request(method, self.url + path, timeout=timeout, **kwargs)
        if r.status_code not in tuple(expect):
            raise LabelStudioError(f"{method} {path} -> HTTP {r.status_code}: {r.text[:2000]}\n"
                                   f"{self.log_tail(30)}")
        return r


# -- helpers the e2e tests use -------------------------------------------------------------------
def create_project(ls: LabelStudioServer, label_config: str, title: str = "e2e") -> int:
    """POST /api/projects/ -> project id."""
    r = ls.api("POST", "/api/projects/", json={"title": title, "label_config": label_config})
    return int(r.json()["id"])


def import_files(ls: LabelStudioServer, project_id: int, paths: Iterable[Path]) -> list[int]:
    """Upload files (multipart POST /api/projects/{id}/import); returns the new task ids.

    Each image becomes one task whose data value is `/data/upload/{project}/{uuid}-{name}`.
    """
    paths = [Path(p) for p in paths]
    handles = [p.open("rb") for p in paths]
    try:
        files = [(p.name, (p.name, h, mimetypes.guess_type(p.name)[0] or "application/octet-stream"))
                 for p, h in zip(paths, handles, strict=True)]
        r = ls.api("POST", f"/api/projects/{project_id}/import?return_task_ids=true", files=files)
    finally:
        for h in handles:
            h.close()
    body = r.json()
    if body.get("task_count") != len(paths):
        raise LabelStudioError(f"import created {body.get('task_count')} tasks, expected {len(paths)}")
    return [int(i) for i in body["task_ids"]]


def connect_ml_backend(
    ls: LabelStudioServer,
    project_id: int,
    url: str,
    *,
    title: str = "backend",
    is_interactive: bool = False,
    basic_auth: tuple[str, str] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """POST /api/ml/: LS calls the backend's /health and /setup before answering 201."""
    payload: dict[str, Any] = {"project": project_id, "url": url, "title": title,
                               "is_interactive": is_interactive}
    if basic_auth is not None:
        payload.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0],
                       basic_auth_pass=basic_auth[1])
    if timeout is not None:
        payload["timeout"] = timeout
    return dict(ls.api("POST", "/api/ml/", json=payload, timeout=300).json())


def retrieve_predictions(ls: LabelStudioServer, project_id: int,
                         task_ids: list[int] | None = None) -> dict[str, Any]:
    """Run the Data Manager action "Retrieve Predictions" (synchronous in LS Community).

    POST /api/dm/actions/?id=retrieve_tasks_predictions&project={id} with `selectedItems`.
    LS skips tasks that already have a prediction with the model version the backend's /setup
    reports. The answer ("Retrieved N predictions") counts selected tasks, not predictions made:
    backend errors only reach LS's log, so check `list_tasks`/`list_predictions` afterwards.
    """
    selected: dict[str, Any] = ({"all": True, "excluded": []} if task_ids is None
                                else {"all": False, "included": list(task_ids)})
    r = ls.api("POST", f"/api/dm/actions/?id=retrieve_tasks_predictions&project={project_id}",
               json={"selectedItems": selected}, timeout=600)
    return dict(r.json())


def predict_interactive(ls: LabelStudioServer, ml_backend_id: int, task_id: int,
                        context: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST /api/ml/{id}/interactive-annotating (what the labeling UI calls for interactive ML).

    Answers 200 either way: {"data": <first result of the backend>} or {"errors": [...]}.
    The backend must have been connected with `is_interactive=True`.
    """
    r = ls.api("POST", f"/api/ml/{ml_backend_id}/interactive-annotating",
               json={"task": task_id, "context": context}, timeout=600)
    return dict(r.json())


def list_tasks(ls: LabelStudioServer, project_id: int) -> list[dict[str, Any]]:
    """All tasks of a project with annotations and predictions (GET /api/tasks/?fields=all)."""
    tasks: list[dict[str, Any]] = []
    page = 1
    while True:
        r = ls.api("GET", "/api/tasks/", expect=(200, 404),
                   params={"project": project_id, "fields": "all", "page": page, "page_size": 100})
        if r.status_code == 404:  # DRF's answer for a page past the end
            break
        body = r.json()
        batch = body["tasks"] if isinstance(body, dict) else body
        tasks.extend(batch)
        if not batch or len(tasks) >= int(body.get("total", len(tasks))):
            break
        page += 1
    return tasks


def personal_access_token(ls: LabelStudioServer) -> str:
    """The superuser's personal access token (a JWT refresh token; LS allows one per user, so it is
    created on first use and kept on ``ls``)."""
    token = getattr(ls, "_personal_access_token", None)
    if token is None:
        token = str(ls.api("POST", "/api/token/").json()["token"])
        ls._personal_access_token = token  # type: ignore[attr-defined]
    return token


def list_predictions(ls: LabelStudioServer, project_id: int) -> list[dict[str, Any]]:
    """GET /api/predictions/?project={id}."""
    return list(ls.api("GET", "/api/predictions/", params={"project": project_id}).json())


def fetch_upload(ls: LabelStudioServer, data_url: str) -> bytes:
    """Download an uploaded file by its task URL (`/data/upload/...`) with the token."""
    if not data_url.startswith("/data/upload/"):
        raise ValueError(f"not an upload URL: {data_url!r}")
    return ls.api("GET", data_url).content
