"""The backend as production runs it, for end-to-end tests: ``gunicorn -c gunicorn.conf.py
backend._wsgi:app`` on a free loopback port, in its own process group (``stop``/``kill`` take the arbiter
and its workers at once), restartable on the same port, its log in a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import requests

from tests.ls_server import REPO_ROOT, _free_port

# Variables of ours or Label Studio's that must not leak from the test environment into gunicorn.
DROP_PREFIXES = ("LABEL_STUDIO_", "BASIC_AUTH_", "GROUNDING_DINO_", "SAM_")
DROP_NAMES = frozenset({
    "PROMPT", "ENGINE_CONFIG", "MODEL_CACHE_DIR", "EXPLAIN_UI_URL", "ALLOWED_IMAGE_HOSTS", "BIND", "HOST", "PORT",
    "WORKERS", "THREADS", "PYTHONPATH", "TEXT_ENCODER", "DEVICE", "PRECISION", "NMS_IOU", "BOX_THRESHOLD",
    "TEXT_THRESHOLD", "MAX_DETECTIONS"})


class GunicornBackend:
    """Arguments:
        env: the backend's settings (added to the test environment, less what must not leak).
        log_path: where gunicorn writes (appended: a restart keeps the earlier log).
        auth: basic auth for the /health probe, when the backend requires it.
        drop: more environment names to leave out (e.g. the job store's, when ``env`` sets its own).
    """

    def __init__(self, env: dict[str, str], log_path: Path, auth: tuple[str, str] | None = None,
                 drop: Iterable[str] = ()) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.auth = auth
        dropped = DROP_NAMES | set(drop)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(DROP_PREFIXES) and k not in dropped}
        self.env.update({"WORKERS": "1", "THREADS": "4", "LOG_LEVEL": "INFO"}, **env)
        self.env.update(BIND=f"127.0.0.1:{self.port}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        PYTHONUNBUFFERED="1")
        self.proc: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.session.trust_env = False  # never send 127.0.0.1 traffic through a proxy

    def start(self, timeout: float = 180.0) -> GunicornBackend:
        """Start gunicorn and wait until /health says the models are UP."""
        gunicorn = Path(sys.executable).parent / "gunicorn"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(gunicorn), "-c", "gunicorn.conf.py", "backend._wsgi:app"],
                                         cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                body = self.session.get(f"{self.url}/health", auth=self.auth, timeout=5).json()
                if body.get("status") == "UP":
                    return self
                last = str(body)
            except (requests.RequestException, ValueError) as exc:
                last = type(exc).__name__
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"backend not UP after {timeout:.0f}s ({last})\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the process group (a graceful shutdown), SIGKILL if it doesn't end in 30 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL to the whole process group: no shutdown hook of ours runs."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def post(self, path: str, body: dict[str, Any], timeout: float = 120) -> requests.Response:
        return self.session.post(self.url + path, json=body, auth=self.auth, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])
