"""HTTP client of the backend's /api (the explain UI never loads a model itself), plus image codecs.

    client = BackendClient.from_env()          # BACKEND_URL, BASIC_AUTH_USER / BASIC_AUTH_PASS
    body = client.explain(rgb, "cat . dog", box_threshold=0.3, text_threshold=0.25)   # an ExplanationJson
    grid = token_map_from_png(body["encoder"]["blocks"][0]["map_png"])

Every answer is checked against its type in ``backend.api_schema`` (the one the backend builds it
with) before a view reads it. Only torch-free backend modules are shared (``backend.images``,
``backend.heatmaps``, ``backend.api_schema``), so images decode the same way on both sides; no model
code is imported.

Every failure (HTTP error, backend down, a body that isn't JSON) is a ``BackendError`` whose message
is the backend's own ``{"error": ...}`` text where there is one.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
import requests
from PIL import Image

from backend.api_schema import (
    CancelJson,
    ExplanationJson,
    JobJson,
    JobListJson,
    SchemaError,
    SegmentationJson,
    TaskExplanationJson,
    TaskJson,
    TaskSegmentationJson,
    parse,
)
from backend.images import ImageError, load_rgb

DEFAULT_BACKEND_URL = "http://127.0.0.1:9090"
# Progress polls are small reads: a backend that doesn't answer them quickly is reported, not waited for.
POLL_TIMEOUT_S = 10.0

_Json = TypeVar("_Json")


class BackendError(RuntimeError):
    """The backend refused or failed a request; ``str()`` is a message for people."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# -- images ---------------------------------------------------------------------------------------
def _b64(data: str | bytes) -> bytes:
    if isinstance(data, bytes):
        return data
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise BackendError(f"the backend sent an image that isn't base64: {exc}") from exc


def decode_mask(data: str | bytes) -> np.ndarray:
    """A base64 mask PNG (white = set) -> HxW bool."""
    try:
        with Image.open(io.BytesIO(_b64(data))) as image:
            return np.asarray(image.convert("L")) > 127
    except OSError as exc:
        raise BackendError(f"can't decode a mask the backend sent: {exc}") from exc


def decode_image_bytes(data: bytes) -> np.ndarray:
    """Image file bytes -> HxWx3 uint8 RGB, decoded like the backend does (EXIF orientation,
    alpha on white, pixel limit), so masks and maps line up with it."""
    try:
        return load_rgb(data)
    except ImageError as exc:
        raise BackendError(f"can't decode the image: {exc}") from exc


def encode_png(image: np.ndarray | Image.Image) -> bytes:
    """numpy (HxW, HxWx3, HxWx4) or PIL image -> PNG bytes."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)  # sent once over a local link: speed over bytes
    return buffer.getvalue()


# An upload is BMP up to this many bytes (an 8-megapixel photo): no encoding time on either side, and
# a body that crosses a local link in milliseconds (PNG costs ~0.2 s a megapixel each way). Past it,
# PNG keeps the body under the backend's MAX_IMAGE_BYTES (50 MB by default).
RAW_UPLOAD_BYTES = 24 * 1024 * 1024


def upload_file(image: np.ndarray | Image.Image | bytes) -> tuple[str, bytes, str]:
    """An image as a multipart file (name, bytes, type); bytes are sent as they are (the backend sniffs
    the format). Lossless either way: the backend decodes the very pixels the page holds, so an image
    it segmented before is a cache hit."""
    if isinstance(image, bytes):
        return "image", image, "application/octet-stream"
    array = np.asarray(image)
    if array.nbytes > RAW_UPLOAD_BYTES:
        return "image.png", encode_png(array), "image/png"
    buffer = io.BytesIO()
    Image.fromarray(array if array.dtype == np.uint8 else np.clip(array, 0, 255).astype(np.uint8)).save(
        buffer, format="BMP")
    return "image.bmp", buffer.getvalue(), "image/bmp"


def decode_ls_brush(result: Mapping[str, Any]) -> np.ndarray:
    """A Label Studio brush result (``value.rle`` at ``original_height`` x ``original_width``) ->
    HxW bool mask, with label-studio-sdk's decoder."""
    from label_studio_sdk.converter import brush

    try:
        height, width = int(result["original_height"]), int(result["original_width"])
        flat = brush.decode_rle(result["value"]["rle"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BackendError(f"a stored brush result can't be decoded ({type(exc).__name__}: {exc})") from exc
    if flat.size != height * width * 4:
        raise BackendError(f"a stored brush RLE holds {flat.size} values, expected {height}x{width}x4")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


# -- the HTTP client ------------------------------------------------------------------------------
@dataclass
class BackendClient:
    base_url: str = DEFAULT_BACKEND_URL
    auth: tuple[str, str] | None = None
    timeout: float = 600.0  # explaining a big image on CPU takes a while
    connect_timeout: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BackendClient:
        env = os.environ if env is None else env
        user, password = env.get("BASIC_AUTH_USER", ""), env.get("BASIC_AUTH_PASS", "")
        base_url = (env.get("BACKEND_URL") or DEFAULT_BACKEND_URL).strip().rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"BACKEND_URL must start with http:// or https://, got {base_url!r}")
        try:
            timeout = float(env.get("EXPLAIN_UI_TIMEOUT") or cls.timeout)
        except ValueError:
            raise ValueError(
                f"EXPLAIN_UI_TIMEOUT must be a number of seconds, got {env['EXPLAIN_UI_TIMEOUT']!r}") from None
        return cls(base_url=base_url, auth=(user, password) if user else None, timeout=timeout)

    # -- plumbing --
    def _send(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
              json: Mapping[str, Any] | None = None, image: np.ndarray | Image.Image | bytes | None = None,
              timeout: float | None = None) -> requests.Response:
        """One request (with ``image``: a multipart form, ``json`` its fields); any failure (no answer,
        an HTTP error) is a BackendError."""
        url = f"{self.base_url.rstrip('/')}{path}"
        timeout = self.timeout if timeout is None else timeout
        body: dict[str, Any] = {"json": json}
        if image is not None:
            body = {"files": {"image": upload_file(image)}, "data": {k: str(v) for k, v in (json or {}).items()}}
        try:
            response = requests.request(method, url, auth=self.auth, params=params, **body,
                                        timeout=(self.connect_timeout, timeout))
        except requests.Timeout as exc:
            raise BackendError(f"the backend at {self.base_url} didn't answer within {timeout:.0f} s") from exc
        except requests.RequestException as exc:
            raise BackendError(f"can't reach the backend at {self.base_url} ({type(exc).__name__}); "
                               "is it running? (BACKEND_URL)") from exc
        if response.status_code >= 400:
            raise BackendError(_error_message(response), response.status_code)
        return response

    def _json(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
              json: Mapping[str, Any] | None = None, image: np.ndarray | Image.Image | bytes | None = None,
              timeout: float | None = None) -> dict[str, Any]:
        """``_send``, and the answer's JSON object (anything else is a BackendError)."""
        response = self._send(method, path, params=params, json=json, image=image, timeout=timeout)
        try:
            body = response.json()
        except ValueError as exc:
            raise BackendError(f"the backend's answer to {method} {path} isn't JSON "
                               f"(HTTP {response.status_code})", response.status_code) from exc
        if not isinstance(body, dict):
            raise BackendError(f"the backend's answer to {method} {path} isn't a JSON object")
        return body

    def _typed(self, method: str, path: str, schema: type[_Json], *, params: Mapping[str, str] | None = None,
               json: Mapping[str, Any] | None = None, image: np.ndarray | Image.Image | bytes | None = None,
               timeout: float | None = None) -> _Json:
        """``_json`` checked against its type in ``backend.api_schema`` (a mismatch is a BackendError
        naming the field: the backend and this page are out of step)."""
        body = self._json(method, path, params=params, json=json, image=image, timeout=timeout)
        try:
            return parse(body, schema)
        except SchemaError as exc:
            raise BackendError(f"the backend's answer to {method} {path} is not what this page expects ({exc}); "
                               "are the backend and the explain UI the same version?") from exc

    @staticmethod
    def _fields(prompt: str | None, box_threshold: float | None, text_threshold: float | None) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if prompt is not None and prompt.strip():
            fields["prompt"] = prompt.strip()
        if box_threshold is not None:
            fields["box_threshold"] = float(box_threshold)
        if text_threshold is not None:
            fields["text_threshold"] = float(text_threshold)
        return fields

    # -- routes --
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def segment(self, image: np.ndarray | Image.Image | bytes, prompt: str, box_threshold: float | None = None,
                text_threshold: float | None = None) -> SegmentationJson:
        """Masks for ``prompt`` on ``image`` (an array, or image file bytes)."""
        return self._typed("POST", "/api/segment", SegmentationJson, image=image,
                           json=self._fields(prompt, box_threshold, text_threshold))

    def explain(self, image: np.ndarray | Image.Image | bytes, prompt: str, box_threshold: float | None = None,
                text_threshold: float | None = None) -> ExplanationJson:
        """The masks and the attention maps (token grids) that made them; from the backend's cache when
        it segmented this image with this prompt and these thresholds before."""
        return self._typed("POST", "/api/explain", ExplanationJson, image=image,
                           json=self._fields(prompt, box_threshold, text_threshold))

    def task(self, task_id: int, project: str | int | None = None) -> TaskJson:
        """A Label Studio task: its image's URL, labels and stored predictions."""
        return self._typed("GET", f"/api/tasks/{int(task_id)}", TaskJson, params=_project(project))

    def task_image(self, task_id: int, project: str | int | None = None) -> np.ndarray:
        response = self._send("GET", f"/api/tasks/{int(task_id)}/image", params=_project(project))
        return decode_image_bytes(response.content)

    def segment_task(self, task_id: int, project: str | int | None = None, prompt: str | None = None,
                     box_threshold: float | None = None, text_threshold: float | None = None) -> TaskSegmentationJson:
        """Masks on a task's image (no prompt: the project's labels or remembered prompt)."""
        return self._typed("POST", f"/api/tasks/{int(task_id)}/segment", TaskSegmentationJson,
                           params=_project(project), json=self._fields(prompt, box_threshold, text_threshold))

    def explain_task(self, task_id: int, project: str | int | None = None, prompt: str | None = None,
                     box_threshold: float | None = None, text_threshold: float | None = None) -> TaskExplanationJson:
        """``explain`` for a task's image (a task the backend predicted comes from its cache)."""
        return self._typed("POST", f"/api/tasks/{int(task_id)}/explain", TaskExplanationJson,
                           params=_project(project), json=self._fields(prompt, box_threshold, text_threshold))

    # -- background prediction jobs (backend/jobs_api.py) --
    @property
    def _poll_timeout(self) -> float:
        return min(self.timeout, POLL_TIMEOUT_S)

    def jobs(self, project: str | int | None = None) -> JobListJson:
        """The backend's most recent prediction jobs, newest first (of ``project`` when given)."""
        return self._typed("GET", "/api/jobs", JobListJson, params=_project(project), timeout=self._poll_timeout)

    def job(self, job_id: str) -> JobJson:
        """One job's progress: state, done/failed/total, rate, ETA, recent task errors."""
        return self._typed("GET", f"/api/jobs/{_job_path(job_id)}", JobJson, timeout=self._poll_timeout)

    def cancel_job(self, job_id: str) -> CancelJson:
        """Cancel an active job; a finished one is a BackendError with status 409 saying its state."""
        return self._typed("POST", f"/api/jobs/{_job_path(job_id)}/cancel", CancelJson, timeout=self._poll_timeout)


def _job_path(job_id: str) -> str:
    text = str(job_id).strip()
    if not text:
        raise BackendError("no job id given")
    return quote(text, safe="")  # an id is hex, but never let one reach another route


def _project(project: str | int | None) -> dict[str, str]:
    text = "" if project is None else str(project).strip()
    return {"project": text} if text else {}


def _error_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    if response.status_code == 404:
        return (f"the backend has no {response.request.method} {response.request.path_url} (HTTP 404): "
                "is BACKEND_URL right and the backend up to date?")
    text = " ".join(response.text.split())[:300]
    return f"the backend answered HTTP {response.status_code} {response.reason}" + (f": {text}" if text else "")
