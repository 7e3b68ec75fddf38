"""gunicorn's gthread worker, except that a request reaches a thread only once it has fully arrived.

gunicorn 23's gthread worker hands a connection to a pool thread as soon as it has a byte to read, and
that thread then blocks until the client has sent the whole request: eight clients sending a byte a
second (or a body that never ends) held all eight threads, and /health timed out for Label Studio. This
worker reads requests in its event loop instead, like a buffering proxy (nginx) would:

  * headers and body (Content-Length or chunked) are read without blocking, in the main loop;
  * a request that hasn't fully arrived within REQUEST_READ_TIMEOUT seconds (default 60) gets 408;
  * ``Expect: 100-continue`` is answered here, so the body is buffered too;
  * complete requests for the control routes (/health, /, /metrics, /setup) run on their own small
    pool (CONTROL_THREADS, default 2): they never queue behind /predict batches on the THREADS pool;
  * a request body larger than the app accepts (MAX_IMAGE_BYTES x 4/3 + 1 MiB) is passed on at once,
    for the app to answer 413; at most REQUEST_BUFFER_TOTAL bytes (default 512 MiB) are buffered
    across all connections, beyond which a new partial request gets 503.

In docker-compose, nginx in front does the same for the network side (docker/nginx.conf).
"""

from __future__ import annotations

import errno
import os
import re
import selectors
import time
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

CONTROL_PATHS = frozenset({"/", "/health", "/metrics", "/setup"})
_HEADER_END = b"\r\n\r\n"
_MAX_HEADER_BYTES = 64 * 1024  # gunicorn's own limits (request line 4094, 100 fields of 8190) are lower
_REQUEST_LINE = re.compile(rb"^[A-Z]+ +([^ ?#\r\n]*)")


def listen_host(env: Mapping[str, str]) -> str:
    """Where the backend listens by default: HOST, else 0.0.0.0 only when basic auth is on. Without it,
    anyone who can reach the port could run the models and have the backend fetch with its Label
    Studio key, so it listens on loopback only (gunicorn.conf.py, ``python -m backend._wsgi``)."""
    if env.get("HOST"):
        return env["HOST"]
    return "0.0.0.0" if env.get("BASIC_AUTH_USER") and env.get("BASIC_AUTH_PASS") else "127.0.0.1"


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name) or ""
    try:
        value = float(raw) if raw else default
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {raw!r}")
    return value


@dataclass
class PendingRequest:
    """Bytes of one request read so far, and whether they make a whole request."""

    deadline: float  # time.monotonic() by which the request must have arrived
    data: bytearray = field(default_factory=bytearray)
    header_end: int = -1  # index just past the blank line, once seen
    body_length: int | None = None  # Content-Length; None for chunked or no body
    chunked: bool = False
    continue_sent: bool = False
    passed_early: bool = False  # complete before its body arrived (too big or malformed): close after it

    def headers(self) -> dict[bytes, bytes]:
        lines = bytes(self.data[: self.header_end]).split(b"\r\n")[1:]
        return {name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)
                if name}

    def path(self) -> str:
        match = _REQUEST_LINE.match(bytes(self.data[:8192]))
        return match.group(1).decode("latin-1") if match else ""

    def feed(self, chunk: bytes, max_body: int) -> tuple[bool, bool]:
        """Add ``chunk``; returns (complete, wants_continue): complete when the headers and the whole
        body are here (or when they are malformed or too big: gunicorn's parser answers those)."""
        self.data += chunk
        if self.header_end < 0:
            end = self.data.find(_HEADER_END)
            if end < 0:
                self.passed_early = len(self.data) > _MAX_HEADER_BYTES
                return self.passed_early, False
            self.header_end = end + len(_HEADER_END)
            headers = self.headers()
            self.chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
            length = headers.get(b"content-length")
            if length is not None and not self.chunked:
                if not length.isdigit():
                    self.passed_early = True
                    return True, False  # malformed: the parser says 400
                self.body_length = int(length)
                if self.body_length > max_body:
                    self.passed_early = True
                    return True, False  # the app answers 413 without reading it
            wants = headers.get(b"expect", b"").lower() == b"100-continue" and (self.chunked or bool(self.body_length))
            if wants and not self.continue_sent:
                self.continue_sent = True
                return self._complete(max_body), True
        return self._complete(max_body), False

    def _complete(self, max_body: int) -> bool:
        body = len(self.data) - self.header_end
        if self.chunked:
            if body > max_body:
                self.passed_early = True
                return True
            return _chunked_done(self.data, self.header_end)
        return body >= (self.body_length or 0)


def _chunked_done(data: bytearray, start: int) -> bool:
    """Whether a chunked body starting at ``data[start]`` has its last chunk and trailer."""
    pos = start
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return False
        size_text = bytes(data[pos:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return True  # malformed: let the parser answer 400
        if size == 0:  # the last chunk, then optional trailer fields, then a blank line
            return data.find(_HEADER_END, line_end) >= 0
        pos = line_end + 2 + size + 2
        if pos > len(data):
            return False


class BufferingThreadWorker(ThreadWorker):
    """gthread with requests read in the event loop and a separate pool for the control routes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = _env_number("REQUEST_READ_TIMEOUT", 60.0)
        self.buffer_total = int(_env_number("REQUEST_BUFFER_TOTAL", 512 * 1024 * 1024))
        self.control_threads = int(_env_number("CONTROL_THREADS", 2))
        self.control_pool: futures.ThreadPoolExecutor | None = None
        self._pending: dict[TConn, PendingRequest] = {}
        self._buffered = 0
        self.max_body = 0

    def init_process(self) -> None:
        from .fetch import FetchSettings

        # The app's own request limit (ServerSettings.max_request_bytes), without building the app here.
        self.max_body = FetchSettings.from_env().max_bytes * 4 // 3 + (1 << 20)
        self.control_pool = futures.ThreadPoolExecutor(max_workers=self.control_threads,
                                                       thread_name_prefix="control")
        super().init_process()

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.control_pool is not None:
                self.control_pool.shutdown(wait=False)

    def handle_quit(self, sig: Any, frame: Any) -> None:
        if self.control_pool is not None:
            self.control_pool.shutdown(wait=False)
        super().handle_quit(sig, frame)

    # -- reading requests in the event loop ------------------------------------------------------------
    def accept(self, server: Any, listener: Any) -> None:
        # gthread's accept, plus a deadline from the moment of connecting: a client that connects and
        # never sends a byte is closed after REQUEST_READ_TIMEOUT too.
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        conn = TConn(self.cfg, sock, client, server)
        self.nr_conns += 1
        if not self.cfg.is_ssl:
            self._pending[conn] = PendingRequest(time.monotonic() + self.read_timeout)
        with self._lock:
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        if self.cfg.is_ssl:  # TLS bytes can't be read before the handshake: gthread's way
            super().on_client_socket_readable(conn, client)
            return
        pending = self._pending.get(conn)
        if pending is None:
            if conn.initialized:  # a kept-alive connection: its next request is ours to time now
                with self._lock:
                    try:
                        self._keep.remove(conn)
                    except ValueError:
                        return  # just closed by murder_keepalived
            pending = self._pending[conn] = PendingRequest(time.monotonic() + self.read_timeout)
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn, client)
            return
        if self._buffered + len(chunk) > self.buffer_total:
            self._drop(conn, client, b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                                     b"Content-Length: 0\r\n\r\n")
            return
        self._buffered += len(chunk)
        complete, wants_continue = pending.feed(chunk, self.max_body)
        if wants_continue:
            self._send_quietly(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        if complete:
            with self._lock:
                self.poller.unregister(client)
            self._forget(conn)
            self._dispatch(conn, bytes(pending.data), pending.path(), close_after=pending.passed_early)

    def _dispatch(self, conn: TConn, data: bytes, path: str, close_after: bool = False) -> None:
        # A request passed on before its body arrived is answered and closed: keeping the connection
        # would have a thread read (and discard) the rest of that body at the client's pace.
        conn.close_after = close_after
        conn.init()  # blocking socket, and the parser (kept across a kept-alive connection's requests)
        conn.parser.unreader.unread(data)  # the parser reads what we buffered before the socket
        pool = self.control_pool if path in CONTROL_PATHS and self.control_pool is not None else self.tpool
        future = pool.submit(self.handle, conn)
        self._wrap_future(future, conn)

    def handle(self, conn: TConn) -> tuple[bool, TConn]:
        keepalive, conn = super().handle(conn)
        return (keepalive and not getattr(conn, "close_after", False)), conn

    def enqueue_req(self, conn: TConn) -> None:  # not reached: every request goes through _dispatch
        self._dispatch(conn, b"", "")

    def _forget(self, conn: TConn) -> None:
        pending = self._pending.pop(conn, None)
        if pending is not None:
            self._buffered -= len(pending.data)

    def _send_quietly(self, conn: TConn, data: bytes) -> None:
        try:
            conn.sock.send(data)  # non-blocking; a client that doesn't read loses the courtesy
        except OSError:
            pass

    def _drop(self, conn: TConn, client: Any, reply: bytes = b"") -> None:
        self._forget(conn)
        with self._lock:
            try:
                self.poller.unregister(client)
            except (KeyError, ValueError, OSError):
                pass
        if reply:
            self._send_quietly(conn, reply)
        self.nr_conns -= 1
        conn.close()

    def murder_keepalived(self) -> None:
        super().murder_keepalived()
        now = time.monotonic()
        late = [conn for conn, pending in self._pending.items() if pending.deadline <= now]
        for conn in late:
            self.log.warning("closing %s: the request did not arrive within REQUEST_READ_TIMEOUT=%gs",
                             conn.client, self.read_timeout)
            self._drop(conn, conn.sock, b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                                        b"Content-Length: 0\r\n\r\n")

