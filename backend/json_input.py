"""Strict, depth-bounded JSON parsing for everything a client sends (request bodies, JSON-in-a-string
fields such as /setup's extra_params): one parser, so every route refuses the same inputs the same way.

``json.loads`` recurses once per nesting level (a 100k-deep body raises RecursionError inside it),
accepts NaN/Infinity (not JSON; they break the JSON we send back) and, like everything after it
(jsonify, copies), has no depth bound; ``parse_json`` turns all of these into ``JsonInputError``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

# Label Studio's own bodies nest under 10 levels (/predict: tasks, annotations, results, values; a
# webhook: 6); task data is the user's, so leave room. Far below the parser's recursion limit.
MAX_JSON_DEPTH = 100


class JsonInputError(ValueError):
    """Client input is not strict JSON or nests too deeply (HTTP 400); the message names which input."""


def parse_json(text: bytes | str, what: str) -> Any:
    """``text`` parsed as strict JSON nesting at most MAX_JSON_DEPTH arrays/objects.

    Arguments:
        text: the JSON text (bytes are decoded as UTF-8/16/32, as ``json.loads`` does).
        what: the input's name for the error message, e.g. "request body" or "extra_params".
    Returns:
        The parsed value (dict, list, str, int, float, bool or None).
    Raises:
        JsonInputError: naming ``what`` and the problem.
    """
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:  # deeper than the interpreter allows: stopped inside the C parser
        raise JsonInputError(_too_deep(what)) from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, integers over 4300 digits, NaN/Infinity
        raise JsonInputError(f"{what} is not valid JSON: {exc}") from None
    if _nesting_exceeds(value, MAX_JSON_DEPTH):
        raise JsonInputError(_too_deep(what))
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _too_deep(what: str) -> str:
    return f"{what} nests JSON arrays/objects too deeply: at most {MAX_JSON_DEPTH} levels are accepted"


def _nesting_exceeds(value: Any, limit: int) -> bool:
    # Iterative, so checking a deep value can't itself overflow the stack.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
