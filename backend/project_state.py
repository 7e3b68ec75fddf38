"""Per-project state: the prompt a person last used, /setup's extra_params, credentials and schema."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .cache import LruCache
from .errors import BadRequest
from .jobs.projects import ProjectStates, StoredProjectState
from .ls_api import Credentials
from .prompts import PromptInput

DEFAULT_PROJECT_MEMORY_BYTES = 64 << 20


@dataclass(frozen=True)
class ProjectState:
    remembered: PromptInput = PromptInput()  # last prompt/thresholds a person used
    extra: PromptInput = PromptInput()  # from /setup extra_params
    credentials: Credentials | None = None  # hostname + access_token from /setup
    label_config: str | None = None  # schema from /setup
    updated: float = field(default_factory=time.time)


def project_key(project: Any) -> str | None:
    """Label Studio's project uid "<id>.<created timestamp>" (or a bare id) -> "<id>"."""
    if project is None or isinstance(project, bool):
        return None
    if isinstance(project, Mapping):
        project = project.get("id")
        if project is None:
            return None
    if not isinstance(project, (str, int)):
        raise BadRequest(f"project must be a string like '1.1700000000' or an integer id, got {type(project).__name__}")
    key = str(project).strip().split(".", 1)[0]
    return key or None


def _prompt_json(given: PromptInput) -> dict[str, Any]:
    return {"phrases": list(given.phrases) if given.phrases is not None else None,
            "box_threshold": given.box_threshold, "text_threshold": given.text_threshold}


def _prompt_input(data: Mapping[str, Any] | None) -> PromptInput:
    if not data:
        return PromptInput()
    phrases = data.get("phrases")
    return PromptInput(tuple(str(p) for p in phrases) if phrases is not None else None,
                       data.get("box_threshold"), data.get("text_threshold"))


def _from_stored(stored: StoredProjectState | None) -> ProjectState:
    if stored is None:
        return ProjectState()
    return ProjectState(remembered=_prompt_input(stored.remembered), extra=_prompt_input(stored.extra),
                        credentials=stored.credentials, label_config=stored.label_config, updated=stored.updated)


class ProjectMemory:
    """Thread-safe store of ``ProjectState`` per project.

    With ``shared`` (the job store's ``ProjectStates``: the server's case) the state lives in the
    shared database, so every worker process and replica agrees on a project's prompt and /setup
    credentials and they survive a restart. Without it (tests, one-off tools) it is kept in this
    process, least recently used out first, bounded in projects and in bytes (a schema can be up to
    MAX_LABEL_CONFIG_BYTES).
    """

    def __init__(self, capacity: int = 1024, max_bytes: int | None = DEFAULT_PROJECT_MEMORY_BYTES,
                 shared: ProjectStates | None = None) -> None:
        self._shared = shared
        self._states: LruCache[ProjectState] = LruCache(capacity, max_bytes)
        self._lock = threading.Lock()  # makes update's read-modify-write atomic

    def get(self, key: str | None) -> ProjectState:
        if key is None:
            return ProjectState()
        if self._shared is not None:
            return _from_stored(self._shared.get(key))
        return self._states.get(key) or ProjectState()

    def update(self, key: str | None, **changes: Any) -> ProjectState:
        if key is None:
            return ProjectState()
        if self._shared is not None:
            stored = {name: _prompt_json(value) if isinstance(value, PromptInput) else value
                      for name, value in changes.items()}
            return _from_stored(self._shared.update(key, **stored))
        with self._lock:
            state = replace(self._states.get(key) or ProjectState(), updated=time.time(), **changes)
            self._states.put(key, state)
            return state

    def forget(self, key: str | None) -> None:
        if key is None:
            return
        if self._shared is not None:
            self._shared.forget(key)
        else:
            self._states.pop(key)

    def __len__(self) -> int:
        return len(self._states)
