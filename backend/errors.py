"""Errors the Label Studio side raises, shared by the prompt planner, the model and the HTTP layer."""

from __future__ import annotations

from .label_config import TaskDataError


class BadRequest(ValueError):
    """The request itself is wrong (HTTP 400); the message says what to fix."""


class NotFound(LookupError):
    """The request names something that doesn't exist, e.g. a Label Studio task id (HTTP 404); the
    message says what and how to fix it."""


class TaskError(TaskDataError):
    """One task can't be predicted (e.g. it has no data)."""


class EngineNotReady(RuntimeError):
    """The models aren't loaded (still loading, or weights missing)."""
