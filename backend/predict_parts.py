"""The pieces of a /predict that need neither the models nor Label Studio: its outcome, the entries of
tasks it did not predict, the process's prediction counters, and ``read_ahead`` (fetching the next
tasks' images while the models work on the current one)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from .prompts import PromptPlan

_Item = TypeVar("_Item")
_Loaded = TypeVar("_Loaded")


@dataclass
class PredictOutcome:
    results: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    plan: PromptPlan
    # The background job that predicts the tasks this call did not reach before PREDICT_DEADLINE_S
    # (or that an earlier job already holds), and how many of this call's tasks it holds.
    job_id: str | None = None
    queued: int = 0

    @property
    def dropped_phrases(self) -> list[str]:
        """Phrases of the prompt that match no label and were not detected (see ``check_prompt_labels``)."""
        return list(self.plan.dropped)


def queued_entry(job_id: str, version: str) -> dict[str, Any]:
    """The /predict entry of a task handed to a background job: no ``result``, so Label Studio stores
    nothing now; the job writes the prediction (same version) through Label Studio's API."""
    return {"model_version": version, "job": job_id}


def failed_entry(message: str, version: str) -> dict[str, Any]:
    """The /predict entry of a task that failed: no ``result``, so Label Studio stores nothing (it skips
    entries without one, keeping the others' positions) and the next "Retrieve predictions" asks again;
    ``error`` says why to whoever reads the response (Label Studio ignores keys it doesn't know)."""
    return {"error": message, "model_version": version}


class PredictionStats:
    """Tasks predicted since the process started, for /metrics and /health; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self._ok = 0
        self._empty = 0
        self._failed: dict[str, int] = {}

    def record_ok(self, regions: int) -> None:
        with self._lock:
            self._ok += 1
            self._empty += regions == 0

    def record_failure(self, exc: BaseException) -> None:
        with self._lock:
            reason = type(exc).__name__
            self._failed[reason] = self._failed.get(reason, 0) + 1

    @property
    def failed_tasks(self) -> int:
        with self._lock:
            return sum(self._failed.values())

    def snapshot(self) -> dict[str, Any]:
        """``{"since": <unix time>, "tasks_predicted": n, "tasks_empty": n, "tasks_failed": n,
        "failed_by_reason": {"FetchError": n, ...}}``; empty predictions are counted as predicted."""
        with self._lock:
            return {"since": round(self.started, 3), "tasks_predicted": self._ok, "tasks_empty": self._empty,
                    "tasks_failed": sum(self._failed.values()), "failed_by_reason": dict(sorted(self._failed.items()))}


def read_ahead(items: Sequence[_Item], load: Callable[[_Item], _Loaded],
               ahead: int) -> Generator[Future[_Loaded], None, None]:
    """``load(item)`` of every item as a Future, in order, with up to ``ahead`` loads running on
    threads ahead of the consumer: downloads overlap the model's work, and at most ``ahead + 1``
    loaded items are held at once. A load's exception is raised by its Future's ``result()``."""
    if ahead < 1 or len(items) < 2:
        for item in items:
            done: Future[_Loaded] = Future()
            try:
                done.set_result(load(item))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, as a pool would
                done.set_exception(exc)
            yield done
        return
    pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="prefetch")
    try:
        pending = deque(pool.submit(load, item) for item in items[: ahead + 1])
        for item in items[ahead + 1:]:
            yield pending.popleft()
            pending.append(pool.submit(load, item))
        while pending:
            yield pending.popleft()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
