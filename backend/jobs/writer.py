"""Writing a job's predictions to Label Studio 1.23 through its API, at most one per task and version.

Predictions go in bulk, ``POST /api/projects/<id>/import/predictions`` with a JSON list of
``{"task", "result", "score", "model_version"}`` (answer: 201 ``{"created": n}``), one chunk at a time.
Before a chunk is written, Label Studio is asked which of its tasks already have a prediction of the
version (``GET /api/tasks/`` with a Data Manager query: the chunk's ids, filtered on
``predictions_model_versions``, with ``fields=all`` so the answer lists only those tasks' predictions,
and the version is compared exactly, since the filter matches substrings); those are skipped. So a job
that is resumed after a crash, or runs beside a "Retrieve predictions", never stores a task twice.

What Label Studio does with a chunk (data_import/api.py ``ImportPredictionsAPI``, legacy path, the
default in 1.23.2): a task id not in the project rejects the whole chunk with HTTP 400; a prediction
whose result fails the labeling config's validation is silently dropped (``created`` is smaller). The
writer splits a rejected chunk to find the bad task, and re-checks the tasks of a short chunk to name
the ones Label Studio dropped. A 401 or 403 (wrong, expired or revoked key; no access to the project)
raises ``LabelStudioAuthError``: no retry fixes it, so the job stops.

Size: a chunk is bounded by bytes (``DEFAULT_CHUNK_BYTES``) as well as by count, since brush masks of
12-megapixel images make long RLE lists; a chunk refused as too large (HTTP 413, from Label Studio or
the reverse proxy in front of it, e.g. nginx's ``client_max_body_size``) or failing with HTTP 500 is
split like a rejected one, so one prediction can't take its chunk's others down with it; one that is
too large alone is rejected, naming the limit. Label Studio unreachable, timing out, or answering
429/502/503/504 (restarting, overloaded) raises ``LabelStudioUnavailable``: nothing is wrong with the
tasks, so the runner waits and tries again without spending their attempts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests

from ..ls_api import API_KEY_HELP, LabelStudioAuthError, LabelStudioClient, LabelStudioError, LabelStudioUnavailable

# Predictions per bulk request. Measured on Label Studio 1.23.2 (2 shared cores): a bulk request costs
# it ~35-65 ms per small prediction (rising with the project's size: it recounts the predictions of
# every task) against ~300 ms for one POST /api/predictions/ per task, and ~200 ms per real-size brush
# mask either way; so chunks need not be huge, and a small one keeps the last write of a job short.
DEFAULT_CHUNK = 20
# ... and at most about this many bytes of JSON per bulk request (a single larger prediction goes
# alone): below nginx's common client_max_body_size settings and far below Label Studio's own
# DATA_UPLOAD_MAX_MEMORY_SIZE (250 MB), and it bounds what a runner holds in memory.
DEFAULT_CHUNK_BYTES = 8 << 20
# Answers that mean "not now" rather than "not this": wait and retry without counting an attempt.
_UNAVAILABLE = frozenset({429, 502, 503, 504})
# The task list is paged; Label Studio may cap page_size (TASK_API_PAGE_SIZE_MAX).
_PAGE_SIZE = 100

_local = threading.local()  # one HTTP session per thread (keep-alive without sharing a Session)


@dataclass
class WriteOutcome:
    """Per task: ``written`` now, ``skipped`` (it already had a prediction of the version), or
    ``rejected`` by Label Studio with the reason (a deleted task, a result that failed validation)."""

    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)

    def merge(self, other: WriteOutcome) -> None:
        self.written += other.written
        self.skipped += other.skipped
        self.rejected.update(other.rejected)


def _session() -> requests.Session:
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


def _request(client: LabelStudioClient, method: str, path: str, what: str, *,
             params: Mapping[str, str | int] | None = None, body: Any = None) -> requests.Response:
    """One API call with the client's auth; a PAT's access token is refreshed once after a 401.

    Raises LabelStudioAuthError on 401/403, LabelStudioUnavailable when Label Studio can't be reached
    or answers 429/502/503/504; any other answer is returned for the caller to judge.
    """
    url = f"{client.url}/{path.lstrip('/')}"
    for attempt in (1, 2):
        try:
            response = _session().request(method, url, params=params, json=body, headers=client.auth_header(),
                                          timeout=client.timeout)
        except requests.RequestException as exc:
            raise LabelStudioUnavailable(f"can't reach Label Studio at {client.url} while {what}: "
                                         f"{type(exc).__name__}") from exc
        if response.status_code == 401 and attempt == 1 and client.is_pat:
            client.invalidate()  # the access token expired: refresh once
            continue
        if response.status_code == 401:
            raise client.auth_error(what)
        if response.status_code == 403:
            raise LabelStudioAuthError(
                f"Label Studio at {client.url} refused access (HTTP 403) while {what}: the key's user may not "
                f"see or change this project; {API_KEY_HELP}")
        if response.status_code in _UNAVAILABLE:
            raise LabelStudioUnavailable(f"Label Studio at {client.url} is unavailable (HTTP {response.status_code}) "
                                         f"while {what}: {_detail(response)}")
        return response
    raise AssertionError("unreachable")


def _detail(response: requests.Response) -> str:
    """Label Studio's own words for an error answer, shortened."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        detail = body.get("validation_errors") or body.get("detail") or body
        return json.dumps(detail)[:300] if not isinstance(detail, str) else detail[:300]
    return json.dumps(body)[:300]


def has_prediction_of(task: Mapping[str, Any], model_version: str) -> bool:
    """True when a task as Label Studio lists it (``fields=all``) has a prediction of exactly
    ``model_version`` (Label Studio's own filter matches substrings)."""
    return any(isinstance(p, Mapping) and p.get("model_version") == model_version
               for p in task.get("predictions") or [])


def tasks_with_prediction(client: LabelStudioClient, project: int, task_ids: Sequence[int],
                          model_version: str) -> set[int]:
    """The ids among ``task_ids`` that already have a prediction of exactly ``model_version``.

    Raises:
        LabelStudioAuthError: the key was rejected.
        LabelStudioError: Label Studio unreachable or answering with an error.
    """
    ids = sorted({int(t) for t in task_ids})
    if not ids:
        return set()
    query = {
        "selectedItems": {"all": False, "included": ids},
        "filters": {"conjunction": "and", "items": [{
            "filter": "filter:tasks:predictions_model_versions", "operator": "contains", "type": "List",
            "value": [model_version]}]},
    }
    what = f"checking which of {len(ids)} tasks of project {project} already have predictions"
    found: set[int] = set()
    page, seen = 1, 0
    while True:
        response = _request(client, "GET", "/api/tasks/", what, params={
            "project": int(project), "fields": "all", "page": page, "page_size": _PAGE_SIZE,
            "query": json.dumps(query)})
        if response.status_code == 404 and page > 1:  # Django's answer for a page past the end
            break
        if not response.ok:
            raise LabelStudioError(f"Label Studio at {client.url} answered HTTP {response.status_code} while "
                                   f"{what}: {_detail(response)}")
        try:
            body = response.json()
            tasks = body["tasks"]
            total = int(body.get("total", len(tasks)))
        except (ValueError, KeyError, TypeError) as exc:
            raise LabelStudioError(f"Label Studio at {client.url} sent an unexpected answer while {what}") from exc
        for task in tasks:
            if has_prediction_of(task, model_version):
                found.add(int(task["id"]))
        seen += len(tasks)
        if not tasks or seen >= total:
            break
        page += 1
    return found & set(ids)


def entry_bytes(entry: Mapping[str, Any]) -> int:
    """About how many bytes of a bulk request ``entry`` (a /predict entry) takes."""
    return len(json.dumps(list(entry.get("result") or []), separators=(",", ":"))) + 100


def chunked(predictions: Mapping[int, Mapping[str, Any]], chunk_size: int = DEFAULT_CHUNK,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[list[int]]:
    """The task ids of ``predictions`` in chunks of at most ``chunk_size`` and about ``chunk_bytes``
    (a larger prediction is a chunk of its own)."""
    chunks: list[list[int]] = []
    chunk: list[int] = []
    size = 0
    for task_id, entry in predictions.items():
        n = entry_bytes(entry)
        if chunk and (len(chunk) >= chunk_size or size + n > chunk_bytes):
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(task_id)
        size += n
    if chunk:
        chunks.append(chunk)
    return chunks


def write_predictions(client: LabelStudioClient, project: int, predictions: Mapping[int, Mapping[str, Any]],
                      model_version: str, chunk_size: int = DEFAULT_CHUNK,
                      chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> WriteOutcome:
    """Store one prediction of ``model_version`` per task that has none yet, in bulk chunks.

    Arguments:
        client: Label Studio and the key to use.
        project: the Label Studio project id.
        predictions: task id -> a /predict entry (``result`` list, ``score``); its ``model_version``
            is replaced by ``model_version`` so every stored prediction carries the job's.
        model_version: the version the job predicts with.
        chunk_size: predictions per request.
        chunk_bytes: about the most bytes per request (a larger prediction goes alone).
    Returns:
        ``WriteOutcome``: every task is in exactly one of written, skipped, rejected.
    Raises:
        LabelStudioAuthError: the key was rejected (401/403): stop the job.
        LabelStudioUnavailable: Label Studio unreachable, restarting or overloaded: retry later.
        LabelStudioError: Label Studio failing otherwise (no such project, a lone prediction's 500).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    outcome = WriteOutcome()
    for chunk in chunked(predictions, chunk_size, chunk_bytes):
        have = tasks_with_prediction(client, project, chunk, model_version)
        outcome.skipped += [t for t in chunk if t in have]
        todo = [t for t in chunk if t not in have]
        if todo:
            outcome.merge(_import(client, project, {t: predictions[t] for t in todo}, model_version))
    return outcome


def _import(client: LabelStudioClient, project: int, predictions: Mapping[int, Mapping[str, Any]],
            model_version: str) -> WriteOutcome:
    """One bulk import; a chunk Label Studio rejects (HTTP 400), refuses as too large (413) or fails on
    (500) is split until the bad task is alone: one prediction never costs the others theirs."""
    body = [{"task": int(task_id), "result": list(entry.get("result") or []), "score": entry.get("score"),
             "model_version": model_version} for task_id, entry in predictions.items()]
    what = f"storing {len(body)} predictions in project {project}"
    response = _request(client, "POST", f"/api/projects/{int(project)}/import/predictions", what, body=body)
    del body  # the chunk's JSON: don't hold it through the halves' requests
    status = response.status_code
    if status in (400, 413) or (status >= 500 and len(predictions) > 1):
        ids = list(predictions)
        if len(ids) == 1:
            if status == 413:
                return WriteOutcome(rejected={ids[0]: (
                    "the prediction is too large for Label Studio to accept (HTTP 413 for one prediction of "
                    f"{entry_bytes(predictions[ids[0]]):,} bytes): raise the request body limit of Label Studio "
                    "or of the proxy in front of it (nginx client_max_body_size, DATA_UPLOAD_MAX_MEMORY_SIZE)")})
            return WriteOutcome(rejected={ids[0]: f"Label Studio rejected the prediction: {_detail(response)}"})
        half = len(ids) // 2
        outcome = _import(client, project, {t: predictions[t] for t in ids[:half]}, model_version)
        outcome.merge(_import(client, project, {t: predictions[t] for t in ids[half:]}, model_version))
        return outcome
    if status == 404:
        raise LabelStudioError(f"Label Studio at {client.url} has no project {project} (HTTP 404) while {what}")
    if not response.ok:
        raise LabelStudioError(f"Label Studio at {client.url} answered HTTP {status} while "
                               f"{what}: {_detail(response)}")
    try:
        created = int(response.json()["created"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LabelStudioError(f"Label Studio at {client.url} sent an unexpected answer while {what}") from exc
    ids = list(predictions)
    if created >= len(ids):
        return WriteOutcome(written=ids)
    # Some predictions were dropped (they failed Label Studio's validation): find which.
    stored = tasks_with_prediction(client, project, ids, model_version)
    return WriteOutcome(
        written=[t for t in ids if t in stored],
        rejected={t: "Label Studio did not store the prediction: its result failed Label Studio's validation "
                     "against the labeling config (see Label Studio's log)" for t in ids if t not in stored})
