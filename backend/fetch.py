"""Fetch a task's image: Label Studio uploads, local files, cloud storage, http(s) and data URLs.

URL resolution is label-studio-sdk's ``get_local_path`` (``/data/upload/...`` via the storage proxy
with a legacy fallback, ``/data/local-files/?d=...``, ``s3://``/``gs://``/``azure-blob://`` via Label
Studio's ``/tasks/<id>/presign/``, plain http(s)). Every HTTP request it makes goes through
``GuardedSession``, which
  * parses each URL once and connects only where that parse says (``backend.fetch_guard``): Label
    Studio's own host, ``ALLOWED_IMAGE_HOSTS``, and wherever Label Studio itself redirects to (its
    presigned cloud-storage URLs); user:password@ only for Label Studio's host;
  * sends Label Studio's key only to its media routes (uploads, local files, storage proxy, presign),
    checked on the final request the SDK built, so ``/data/upload/../../api/...`` can't borrow it;
  * follows redirects itself, dropping the Authorization header when the origin changes;
  * holds the whole fetch (connect, redirects, body) to one IMAGE_FETCH_TIMEOUT deadline, and streams
    the body up to ``MAX_IMAGE_BYTES``; a successful answer must be an image.
Data URLs are decoded here. Bare file paths are refused: task data must not read the server's disk.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, unquote_to_bytes, urljoin, urlsplit

import requests
import urllib3
from PIL import Image, UnidentifiedImageError
from requests.structures import CaseInsensitiveDict

from .config import parse_switch
from .fetch_deadline import Deadline, DeadlineAdapter
from .fetch_guard import (
    KEY_PATHS_HELP,
    FetchError,
    FetchTimeoutError,
    HostNotAllowedError,
    ImageDataError,
    ImageTooLargeError,
    ImageURL,
    ImageURLError,
    Origin,
    URLNotAllowedError,
    connected_origin,
    describe_url,
    host_allowed,
    key_path_refusal,
    label_studio_path_refusal,
    parse_allowed_hosts,
    parse_image_url,
)
from .ls_api import LabelStudioAuthError, LabelStudioClient, LabelStudioError

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_BYTES = 50 * 1024 * 1024
DEFAULT_FETCH_TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*?),(?P<data>.*)$", re.DOTALL)
_LABEL_STUDIO_PATHS = ("/data/", "/upload/", "upload/", "/storage-data/")
_CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")


@dataclass(frozen=True)
class FetchSettings:
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    # Extra hosts task URLs may point at: "host", "host:port", "*.example.com", or "*" for any.
    allowed_hosts: tuple[str, ...] = ()
    timeout: float = DEFAULT_FETCH_TIMEOUT_S  # seconds for the whole fetch: connect, redirects, body
    verify_ssl: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FetchSettings:
        env = os.environ if env is None else env
        try:
            max_bytes = int(env.get("MAX_IMAGE_BYTES") or DEFAULT_MAX_IMAGE_BYTES)
            timeout = float(env.get("IMAGE_FETCH_TIMEOUT") or DEFAULT_FETCH_TIMEOUT_S)
        except ValueError as exc:
            raise ValueError(f"MAX_IMAGE_BYTES / IMAGE_FETCH_TIMEOUT must be numbers: {exc}") from exc
        if max_bytes <= 0:
            raise ValueError(f"MAX_IMAGE_BYTES must be positive, got {max_bytes}")
        if not timeout > 0:
            raise ValueError(f"IMAGE_FETCH_TIMEOUT must be a positive number of seconds, got {timeout}")
        try:
            verify = parse_switch(env.get("VERIFY_SSL") or "true")
        except ValueError as exc:
            raise ValueError(f"VERIFY_SSL={env['VERIFY_SSL']!r}: {exc}") from exc
        return cls(max_bytes=max_bytes, allowed_hosts=parse_allowed_hosts(env.get("ALLOWED_IMAGE_HOSTS", "")),
                   timeout=timeout, verify_ssl=verify)


# -- the session the SDK downloads through --------------------------------------------------------------
class GuardedSession(requests.Session):
    """A requests session that connects only where the allow-list says, keeps Label Studio's key on its
    media routes, follows redirects itself, and holds the fetch to one deadline and MAX_IMAGE_BYTES.

    label-studio-sdk's downloader calls ``get(url, stream=True, headers=..., verify=...)`` and then
    reads ``response.content``; here the content is read (limited, and checked to be an image when the
    answer is a success) before it is handed back.
    """

    def __init__(self, settings: FetchSettings, label_studio_url: str | None,
                 deadline: Deadline | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.label_studio: ImageURL | None = parse_image_url(label_studio_url) if label_studio_url else None
        self.deadline = deadline or Deadline(settings.timeout)
        for prefix in ("http://", "https://"):
            self.mount(prefix, DeadlineAdapter())

    def get_redirect_target(self, resp: requests.Response) -> None:
        # requests would read a redirect's whole body (unbounded) to work out the next request it
        # won't send; redirects are followed in request() instead.
        return None

    def _is_label_studio(self, origin: Origin) -> bool:
        return self.label_studio is not None and origin == self.label_studio.origin

    def request(self, method: str, url: str | bytes, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        headers: CaseInsensitiveDict[str] = CaseInsensitiveDict(kwargs.get("headers") or {})
        verify = self.settings.verify_ssl  # VERIFY_SSL; the SDK passes its own reading of the same variable
        url = url.decode() if isinstance(url, bytes) else url
        trusted, previous = False, None
        for _ in range(MAX_REDIRECTS + 1):
            target = parse_image_url(url)
            if previous is not None and target.origin != previous:
                headers.pop("Authorization", None)  # our key stays with the origin it was meant for
            self._check_origin(target, trusted)
            prepared = self._prepare(method, target, headers)
            response = self._send(prepared, verify)
            location = response.headers.get("location") if response.is_redirect else None
            if location is None:
                self._read_body(response, target)
                return response
            response.close()
            # Label Studio's own redirects (presigned cloud-storage URLs) are trusted; anyone else's
            # redirect target must pass the allow-list itself.
            trusted = self._is_label_studio(target.origin)
            previous = target.origin
            url, method = urljoin(target.url, location.encode("latin1").decode("utf-8", "replace")), "GET"
        raise FetchError(f"too many redirects fetching the image (more than {MAX_REDIRECTS})")

    def _check_origin(self, target: ImageURL, trusted: bool) -> None:
        is_label_studio = self._is_label_studio(target.origin)
        if target.userinfo and not is_label_studio:
            raise URLNotAllowedError(f"image URL {describe_url(target.url)} carries a user name or password "
                                     "(user:pass@): only Label Studio's own URL may")
        if trusted or is_label_studio or host_allowed(target.origin, self.settings.allowed_hosts):
            return
        ls = f" ({self.label_studio.origin})" if self.label_studio else ""
        raise HostNotAllowedError(
            f"image host {target.origin.netloc!r} is not allowed: only the Label Studio host{ls} and "
            "ALLOWED_IMAGE_HOSTS are fetched from; add it to ALLOWED_IMAGE_HOSTS (comma-separated) to allow it"
        )

    def _prepare(self, method: str, target: ImageURL, headers: CaseInsensitiveDict[str]) -> requests.PreparedRequest:
        prepared = self.prepare_request(requests.Request(method, target.url, headers=dict(headers)))
        # Belt and braces: the connection requests will open is the one that was checked.
        connected = connected_origin(prepared.url or "")
        if connected != target.origin:
            raise ImageURLError(f"image URL {describe_url(target.url)} reads as {target.origin} but would "
                                f"connect to {connected}: refusing the ambiguous URL")
        if "Authorization" in prepared.headers:
            if not self._is_label_studio(target.origin):
                raise URLNotAllowedError(f"refusing to send credentials to {target.origin}: only Label "
                                         "Studio's own URLs are fetched with them")
            assert self.label_studio is not None
            sent = urlsplit(prepared.url or "")  # the path and query as they go on the wire
            reason = key_path_refusal(sent.path, sent.query or None, self.label_studio.path)
            if reason:
                raise URLNotAllowedError(f"refusing to send the Label Studio API key: {reason}; "
                                         f"only {KEY_PATHS_HELP} are fetched with it")
        return prepared

    def _send(self, prepared: requests.PreparedRequest, verify: Any) -> requests.Response:
        timeout = min(self.settings.timeout, self.deadline.remaining())
        options = self.merge_environment_settings(prepared.url or "", {}, True, verify, None)
        with self._deadline_errors():
            return self.send(prepared, allow_redirects=False, timeout=(timeout, timeout), **options)

    @contextmanager
    def _deadline_errors(self) -> Iterator[None]:
        """Sockets opened inside are cut at the deadline; what that (or a socket timeout) raises
        becomes a FetchTimeoutError naming IMAGE_FETCH_TIMEOUT."""
        with self.deadline.watching():
            try:
                yield
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                if self.deadline.expired or isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)):
                    raise self.deadline.error() from exc
                raise

    def _read_body(self, response: requests.Response, target: ImageURL) -> None:
        limit = self.settings.max_bytes
        length = response.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            response.close()
            raise ImageTooLargeError(_too_large(int(length), limit))
        chunks, total = [], 0
        try:
            with self._deadline_errors():
                for chunk in response.iter_content(_CHUNK):
                    total += len(chunk)
                    if total > limit:
                        raise ImageTooLargeError(_too_large(total, limit, at_least=True))
                    chunks.append(chunk)
            if self.deadline.expired:  # the last read may have ended because the socket was cut
                raise self.deadline.error()
        finally:
            response.close()
        body = b"".join(chunks)
        response._content = body  # what response.content returns from now on
        response._content_consumed = True
        if response.ok:
            require_image(body, response.headers.get("content-type"), target.describe())


def require_image(body: bytes, content_type: str | None, source: str) -> None:
    """Refuse a body that isn't an image PIL can open (say, a JSON or HTML page), without echoing it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(body)):
                return
        except Image.DecompressionBombError:
            return  # an image, just a big one: load_rgb applies the pixel limit with a clear message
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            pass
    kind = (content_type or "no Content-Type").split(";")[0].strip()
    raise ImageDataError(f"{source} answered with {kind} ({len(body):,} bytes), not an image")


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    return (f"image is {'over ' if at_least else ''}{size:,} bytes, above the limit of {limit:,} bytes "
            "(MAX_IMAGE_BYTES)")


# -- data URLs -------------------------------------------------------------------------------------------
def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:`` URL (base64 or percent-encoded).

    Raises:
      ImageDataError: the URL isn't ``data:[<mime>][;base64],<data>`` or its base64 is invalid.
      ImageTooLargeError: the data is over ``max_bytes``.
    """
    match = _DATA_URL.match(url)
    if not match:
        raise ImageDataError("malformed data URL: expected data:<mime>;base64,<data> (no ',' found)")
    payload = match.group("data")
    base64_encoded = ";base64" in match.group("params").lower()
    estimate = len(payload) * 3 // 4 if base64_encoded else len(payload)
    if estimate > max_bytes:
        raise ImageTooLargeError(_too_large(estimate, max_bytes))
    if not base64_encoded:
        return unquote_to_bytes(payload)
    # RFC 2397 data is URL-encoded; base64 has no '%', so decoding it first is safe
    return decode_base64(unquote(payload) if "%" in payload else payload)


_BASE64_JUNK = re.compile(r"[^A-Za-z0-9+/=]")
_URLSAFE = str.maketrans("-_", "+/")


def decode_base64(payload: str) -> bytes:
    """Strict base64 (standard or URL-safe alphabet; whitespace and missing padding tolerated).

    Raises:
      ImageDataError: empty, characters outside the alphabet, or a length no encoder produces.
    """
    text = "".join(payload.split())
    if not text:
        raise ImageDataError("image data is empty")
    if ("-" in text or "_" in text) and not ("+" in text or "/" in text):
        text = text.translate(_URLSAFE)
    junk = _BASE64_JUNK.search(text)
    if junk:
        raise ImageDataError(f"image data is not valid base64: {junk.group()!r} at position {junk.start()} "
                             "is not a base64 character")
    body = text.rstrip("=")
    if "=" in body or len(text) - len(body) > 2 or len(body) % 4 == 1:
        raise ImageDataError(f"image data is not valid base64: bad padding or length ({len(text)} characters)")
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageDataError(f"image data is not valid base64: {exc}") from None


# -- fetching --------------------------------------------------------------------------------------------
def fetch_image(url: str, client: LabelStudioClient | None, settings: FetchSettings,
                task_id: int | None = None) -> bytes:
    """The bytes of the image at ``url`` (a task's data value).

    Arguments:
      url: http(s), data:, a Label Studio path (/data/upload/..., /data/local-files/?d=...,
        /storage-data/...) or a cloud URI (s3://, gs://, azure-blob://, presigned by Label Studio).
      client: the Label Studio the task came from (for uploads, local files and presigned cloud
        storage); None when no Label Studio URL is configured, in which case only data URLs and
        hosts in ALLOWED_IMAGE_HOSTS can be fetched.
      settings: limits, allow-list, TLS verification.
      task_id: the task's id, needed to presign cloud URIs.
    Returns:
      the image file's bytes (not decoded).
    Raises:
      FetchError and its subclasses (each names the cause), LabelStudioAuthError when Label Studio
      rejects our key.
    """
    if not isinstance(url, str) or not url.strip():
        raise ImageURLError("the task has no image URL")
    url = url.strip()
    if url.startswith("data:"):
        return decode_data_url(url, settings.max_bytes)
    with Deadline(settings.timeout) as deadline:
        try:
            return _fetch_via_sdk(url, client, settings, task_id, deadline)
        except LabelStudioAuthError:
            raise
        except requests.HTTPError as exc:
            response = exc.response
            if client is None or response is None or response.status_code != 401 \
                    or not _is_label_studio(response.url, client):
                raise FetchError(_http_error_message(exc)) from exc
            if client.is_pat:  # the access token may have expired between refresh and use
                client.invalidate()
                try:
                    return _fetch_via_sdk(url, client, settings, task_id, deadline)
                except requests.HTTPError as again:
                    if again.response is None or again.response.status_code != 401:
                        raise FetchError(_http_error_message(again)) from again
            raise client.auth_error("downloading a task image") from exc


def _is_label_studio(url: str, client: LabelStudioClient) -> bool:
    try:
        return parse_image_url(url).origin == client.origin
    except ImageURLError:
        return False


def _fetch_via_sdk(url: str, client: LabelStudioClient | None, settings: FetchSettings,
                   task_id: int | None, deadline: Deadline) -> bytes:
    from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_local_path, http_session

    is_http = url.lower().startswith(("http://", "https://"))
    if is_http:
        parse_image_url(url)  # malformed or ambiguous URLs fail here, before any token is fetched
    elif url.startswith(_LABEL_STUDIO_PATHS):
        reason = label_studio_path_refusal(url)
        if reason:
            raise URLNotAllowedError(f"refusing the task's Label Studio URL: {reason}; only {KEY_PATHS_HELP} "
                                     "are fetched with the API key")
    elif not url.startswith(_CLOUD_SCHEMES):
        raise ImageURLError(f"unsupported image URL {describe_url(url)}: expected http(s), data:, /data/upload/..., "
                            "/data/local-files/?d=... or s3:// / gs:// / azure-blob:// storage")
    if not is_http and client is None:
        raise FetchError(f"can't fetch {describe_url(url)}: no Label Studio URL is known; set LABEL_STUDIO_URL and "
                         "LABEL_STUDIO_API_KEY (or connect the model from a Label Studio project)")
    if url.startswith(_CLOUD_SCHEMES) and task_id is None:
        raise ImageURLError(f"cloud storage URL {describe_url(url)} needs the task id to be presigned by Label Studio")
    # Only Label Studio's own URLs need our key; don't refresh tokens for a plain http image.
    token = client.download_token() if client and (not is_http or _is_label_studio(url, client)) else None
    with GuardedSession(settings, client.url if client else None, deadline) as session, \
            tempfile.TemporaryDirectory(prefix="gsam-fetch-") as cache_dir, http_session(session):
        try:
            path = get_local_path(url, cache_dir=cache_dir, hostname=client.url if client else None,
                                  access_token=token, task_id=task_id, download_resources=True)
        except FetchError:
            raise
        except FileNotFoundError as exc:
            raise FetchError(f"can't fetch {describe_url(url)}: {exc}") from exc
        except requests.HTTPError:
            raise
        except requests.RequestException as exc:
            raise FetchError(f"can't reach the image at {_describe(url, client)}: {type(exc).__name__}") from exc
        except ValueError as exc:  # e.g. an invalid LABEL_STUDIO_URL, or a path outside the local-files root
            raise FetchError(f"can't fetch {describe_url(url)}: {exc}") from exc
        size = os.path.getsize(path)
        if size > settings.max_bytes:
            raise ImageTooLargeError(_too_large(size, settings.max_bytes))
        with open(path, "rb") as f:
            return f.read()


def _describe(url: str, client: LabelStudioClient | None) -> str:
    if url.lower().startswith(("http://", "https://")):
        return describe_url(url)
    return f"{client.url if client else 'Label Studio'} ({describe_url(url, 80)})"


def _http_error_message(exc: requests.HTTPError) -> str:
    response = exc.response
    if response is None:
        return f"image download failed: {type(exc).__name__}"
    return f"image download failed: HTTP {response.status_code} from {describe_url(response.url)}"


__all__ = [
    "Deadline", "FetchError", "FetchSettings", "FetchTimeoutError", "GuardedSession", "HostNotAllowedError",
    "ImageDataError", "ImageTooLargeError", "ImageURLError", "LabelStudioAuthError", "LabelStudioError",
    "URLNotAllowedError", "decode_base64", "decode_data_url", "fetch_image", "host_allowed", "require_image",
]
