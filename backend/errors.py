"""Errors the Label Studio side raises, shared by the prompt planner, the model and the HTTP layer."""

from __future__ import annotations

from .label_config import TaskDataError


class BadRequest(ValueError):
    """The request itself is wrong (HTTP 400); the message says what to fix."""


class TaskError(TaskDataError):
    """One task can't be predicted (e.g. it has no data)."""


class EngineNotReady(RuntimeError):
    """The models aren't loaded (still loading, or weights missing)."""
