"""Servers the explain UI tests run against: the real backend Flask app in a thread (werkzeug), and
the Gradio page itself; both on free ports of 127.0.0.1."""

from __future__ import annotations

import threading
from typing import Any

from werkzeug.serving import make_server

from tests.ls_server import _free_port


class ThreadedBackend:
    """``backend._wsgi.create_app(engine=..., settings=...)`` served by werkzeug in a daemon thread."""

    def __init__(self, engine: Any, **settings: Any) -> None:
        from backend._wsgi import ServerSettings, create_app

        settings.setdefault("load_on_start", False)
        self.app = create_app(engine=engine, settings=ServerSettings(**settings))
        self.server = make_server("127.0.0.1", _free_port(), self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="backend", daemon=True)

    def __enter__(self) -> ThreadedBackend:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


def free_port() -> int:
    return _free_port()
