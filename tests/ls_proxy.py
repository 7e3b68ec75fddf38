"""A switchable HTTP proxy in front of the test Label Studio: what a job sees when Label Studio restarts
(connections dropped) or sits behind a reverse proxy with a body limit (nginx ``client_max_body_size``
answers 413 before Label Studio reads the request). Everything else is forwarded to the real server."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


class LabelStudioProxy:
    """``url`` forwards to ``target``; ``down = True`` drops every connection unanswered (Label Studio
    restarting); ``max_body`` answers 413 to larger request bodies; ``requests_seen`` counts bodies by size."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.down = False
        self.max_body: int | None = None
        self.bodies: list[int] = []  # sizes of the POST bodies forwarded or refused
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.down:
                    self.close_connection = True
                    self.connection.close()
                    return
                if body:
                    proxy.bodies.append(len(body))
                if proxy.max_body is not None and len(body) > proxy.max_body:
                    page = b"<html><head><title>413 Request Entity Too Large</title></head></html>"
                    self.send_response(413)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP | {"host"}}
                answer = requests.request(self.command, proxy.target + self.path, data=body or None,
                                          headers=headers, timeout=60, allow_redirects=False)
                self.send_response(answer.status_code)
                for name, value in answer.headers.items():
                    if name.lower() not in _HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward  # noqa: N815 - http.server's names

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LabelStudioProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
