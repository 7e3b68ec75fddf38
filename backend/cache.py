"""The one bounded, thread-safe LRU cache of the backend, bounded in entries and in bytes.

Cached values differ in size by orders of magnitude (a project's few-KiB state, a 40 MiB image
embedding), so a count alone bounds nothing: ``nbytes`` measures what a value holds (arrays,
tensors, strings, dataclasses, containers) and the cache drops least recently used entries until
both bounds hold. A value larger than the whole byte budget is returned but never stored.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from typing import Generic, TypeVar

import numpy as np

V = TypeVar("V")


def nbytes(value: object) -> int:
    """Bytes held by ``value``, counted deeply: numpy arrays by their data, torch tensors by their
    storage (a storage shared by several tensors counts once; device memory counts the same),
    dataclasses, mappings, sequences and objects by their contents. Each object counts once."""
    seen: set[int] = set()
    storages: set[int] = set()
    total = 0
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, np.ndarray):
            total += item.nbytes
        elif hasattr(item, "untyped_storage"):  # a torch.Tensor, without importing torch here
            storage = item.untyped_storage()
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, (str, bytes, bytearray, int, float, complex, bool, type(None))):
            total += sys.getsizeof(item)
        elif isinstance(item, Mapping):
            total += sys.getsizeof(item)
            for key, child in item.items():
                stack.extend((key, child))
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += sys.getsizeof(item)
            stack.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            total += sys.getsizeof(item)
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            total += sys.getsizeof(item)
            stack.append(vars(item))
        else:
            total += sys.getsizeof(item)
    return total


class LruCache(Generic[V]):
    """A thread-safe LRU map holding at most ``capacity`` entries and ``max_bytes`` bytes (as
    measured by ``sizeof``, ``nbytes`` by default); None means no bound of that kind, 0 caches
    nothing. ``get_or_compute`` runs ``compute`` outside the lock, once per key at a time: threads
    asking for a key that is being computed wait for that result (two requests for the same image
    must not run its encoders twice)."""

    def __init__(self, capacity: int | None = None, max_bytes: int | None = None,
                 sizeof: Callable[[V], int] = nbytes) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._pending: dict[Hashable, Future] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            return self._touch(key)

    def put(self, key: Hashable, value: V) -> None:
        size = self._measure(value)
        with self._lock:
            self._store(key, value, size)

    def pop(self, key: Hashable) -> V | None:
        with self._lock:
            entry = self._items.pop(key, None)
            if entry is None:
                return None
            self._bytes -= entry[1]
            return entry[0]

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> V:
        with self._lock:
            value = self._touch(key)
            if value is not None:
                return value
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                pending = self._pending[key] = Future()
        if not owner:
            return pending.result()  # re-raises the computing thread's error
        try:
            value = compute()
            size = self._measure(value)
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            self._store(key, value, size)
            del self._pending[key]
        pending.set_result(value)
        return value

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored values (0 when only counting entries)."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _measure(self, value: V) -> int:
        # Measured outside the lock: walking a big value must not stall other threads' lookups.
        return self._sizeof(value) if self.max_bytes is not None else 0

    # Both helpers expect the caller to hold self._lock.
    def _touch(self, key: Hashable) -> V | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        self._items.move_to_end(key)
        return entry[0]

    def _store(self, key: Hashable, value: V, size: int) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if self.capacity is not None and self.capacity <= 0:
            return
        if self.max_bytes is not None and size > self.max_bytes:
            return  # would evict everything else and still not fit
        self._items[key] = (value, size)
        self._bytes += size
        while ((self.capacity is not None and len(self._items) > self.capacity)
               or (self.max_bytes is not None and self._bytes > self.max_bytes)):
            _, (_, dropped) = self._items.popitem(last=False)
            self._bytes -= dropped
