"""One total time budget for an image fetch (IMAGE_FETCH_TIMEOUT), enforced on its sockets.

Socket timeouts bound each read, not their sum: a server trickling one byte a second keeps every read
short and the fetch endless (the audit saw 50 s against a 30 s setting). ``Deadline`` registers each
socket opened while it is watched, through requests' adapter (``DeadlineAdapter``), and shuts them
down when the budget runs out, which ends whatever connect, header or body read is blocked on them.
"""

from __future__ import annotations

import contextvars
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .fetch_guard import FetchTimeoutError

_active_deadline: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("fetch_deadline",
                                                                                      default=None)


class Deadline:
    """A fetch's total time budget, enforced on its sockets.

    Socket timeouts bound each read, not the sum: a server sending one byte a second never trips
    them. So every socket opened while ``watching()`` is registered here, and when the budget runs
    out a timer shuts them down, which ends whatever read is blocked on them.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._expires = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []  # dups: shutdown reaches the socket even once TLS wraps it
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def remaining(self) -> float:
        left = self._expires - time.monotonic()
        if left <= 0 or self.expired:
            raise self.error()
        return left

    def error(self) -> FetchTimeoutError:
        return FetchTimeoutError(f"the image fetch took longer than IMAGE_FETCH_TIMEOUT={self.seconds:g} s "
                                 "(connect, redirects and download together)")

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            if self.expired:
                _shutdown(sock)
            else:
                self._sockets.append(sock.dup())

    @contextmanager
    def watching(self) -> Iterator[None]:
        token = _active_deadline.set(self)
        try:
            yield
        finally:
            _active_deadline.reset(token)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


def _shutdown(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _TracksSockets:
    """Registers each new connection's socket with the deadline being watched (see Deadline)."""

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        deadline = _active_deadline.get()
        if deadline is not None:
            deadline.track(sock)
        return sock


class _TrackedHTTPConnection(_TracksSockets, HTTPConnection):
    pass


class _TrackedHTTPSConnection(_TracksSockets, HTTPSConnection):
    pass


class _TrackedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _TrackedHTTPConnection


class _TrackedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPSConnection


_TRACKED_POOLS = {"http": _TrackedHTTPPool, "https": _TrackedHTTPSPool}


class DeadlineAdapter(HTTPAdapter):
    """requests' adapter with connections whose sockets a Deadline can cut."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _TRACKED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS pools have connection classes of their own
            manager.pool_classes_by_scheme = _TRACKED_POOLS
        return manager


__all__ = ["Deadline", "DeadlineAdapter"]
