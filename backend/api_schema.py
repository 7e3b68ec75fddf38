"""The JSON the backend's job routes answer with, as one typed definition: the server builds it
(``JobProgress.to_json``, ``backend.jobs_api``) and the explain UI's client reads it
(``explain_ui.client``), both importing these types. Plain ``typing`` only: no torch, no Flask.

``parse`` checks a decoded answer against a type here, so a client fails with the field that is
wrong instead of a ``KeyError`` somewhere in a view.
"""

from __future__ import annotations

import types
from typing import Any, TypedDict, TypeVar, Union, cast, get_args, get_origin, get_type_hints, is_typeddict


class TaskErrorJson(TypedDict):
    """Why one task of a job failed (the newest few per job)."""

    task: int  # the Label Studio task id
    state: str  # "failed" (given up) or "pending" (will be retried)
    attempts: int  # tries so far
    error: str


class JobJson(TypedDict):
    """``GET /api/jobs/<id>``: where a background prediction job stands."""

    id: str
    project: str  # the Label Studio project id ("7")
    model_version: str  # every prediction the job writes carries it
    state: str  # "queued", "running", "done", "failed" or "cancelled"
    total: int  # tasks in the job: done + failed + pending + running
    done: int  # predictions in Label Studio
    failed: int  # given up (see errors)
    pending: int
    running: int
    rate: float | None  # tasks/s over the last two minutes; None before the job started
    eta_s: float | None  # seconds left at that rate; None while there is no rate to go by
    error: str | None  # why the whole job stopped (a rejected API key), else None
    errors: list[TaskErrorJson]  # the most recent task errors, newest first
    created: float  # epoch seconds
    updated: float


class JobListJson(TypedDict):
    """``GET /api/jobs``: the most recent jobs, newest first."""

    jobs: list[JobJson]


class CancelJson(TypedDict):
    """``POST /api/jobs/<id>/cancel`` on an active job (a finished one answers 409)."""

    cancelled: bool
    job: JobJson  # the job after cancelling: its state is "cancelled"


# The states a job can be in (``JobJson.state``; the store's own constants are these); only an
# active job can be cancelled.
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE_JOB_STATES = JOB_STATES[:2]


class SchemaError(ValueError):
    """A JSON value does not have the shape of its type here; ``str()`` names the field."""


_T = TypeVar("_T")


def parse(data: object, schema: type[_T], where: str = "answer") -> _T:
    """``data`` (decoded JSON) as ``schema`` (a TypedDict above) after checking every field's type.

    Arguments:
        data: what ``json.loads`` returned.
        schema: ``JobJson``, ``JobListJson`` or ``CancelJson``.
        where: how the message names the value ("answer" gives "answer.jobs[0].done").
    Returns:
        ``data`` itself, typed. Extra keys are allowed (a newer server may add fields).
    Raises:
        SchemaError: a missing key or a value of the wrong type, named by its path.
    """
    _check(data, schema, where)
    return cast(_T, data)


def _check(value: object, hint: Any, where: str) -> None:
    if is_typeddict(hint):
        if not isinstance(value, dict):
            raise SchemaError(f"{where} must be a JSON object, got {_kind(value)}")
        for name, field_hint in get_type_hints(hint).items():
            if name not in value:
                raise SchemaError(f"{where} has no '{name}'")
            _check(value[name], field_hint, f"{where}.{name}")
        return
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(hint):
            try:
                _check(value, option, where)
                return
            except SchemaError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise SchemaError(f"{where} must be a list, got {_kind(value)}")
        (item,) = get_args(hint)
        for i, element in enumerate(value):
            _check(element, item, f"{where}[{i}]")
        return
    if hint is type(None):
        if value is not None:
            raise SchemaError(f"{where} must be null, got {_kind(value)}")
        return
    # JSON has one number type: an integral float is not an int, but an int is a fine float.
    accepted: tuple[type, ...] = (int, float) if hint is float else (hint,)
    if isinstance(value, bool) and hint is not bool or not isinstance(value, accepted):
        raise SchemaError(f"{where} must be {_NAMES.get(hint, str(hint))}, got {_kind(value)}")


_NAMES: dict[Any, str] = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


__all__ = ["ACTIVE_JOB_STATES", "JOB_STATES", "CancelJson", "JobJson", "JobListJson", "SchemaError",
           "TaskErrorJson", "parse"]
