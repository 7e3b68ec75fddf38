"""Fetch a task's image: Label Studio uploads, local files, cloud storage, http(s) and data URLs.

URL resolution is label-studio-sdk's ``get_local_path`` (``/data/upload/...`` via the storage proxy
with a legacy fallback, ``/data/local-files/?d=...``, ``s3://``/``gs://``/``azure-blob://`` via Label
Studio's ``/tasks/<id>/presign/``, plain http(s)). Every HTTP request it makes goes through
``GuardedSession``, which
  * only contacts allowed hosts: Label Studio's own host, ``ALLOWED_IMAGE_HOSTS``, and wherever
    Label Studio itself redirects to (its presigned cloud-storage URLs);
  * follows redirects itself, dropping the Authorization header when the host changes;
  * streams the body and stops at ``MAX_IMAGE_BYTES``.
Data URLs are decoded here. Bare file paths are refused: task data must not read the server's disk.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import unquote_to_bytes, urljoin, urlparse

import requests

from .config import parse_switch
from .ls_api import LabelStudioAuthError, LabelStudioClient, LabelStudioError, host_of

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_BYTES = 50 * 1024 * 1024
DEFAULT_FETCH_TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*?),(?P<data>.*)$", re.DOTALL)


class FetchError(RuntimeError):
    """The image could not be fetched (unreachable, not found, unsupported URL)."""


class HostNotAllowedError(FetchError):
    """The URL points at a host outside the allow-list."""


class ImageTooLargeError(FetchError):
    """The image is bigger than MAX_IMAGE_BYTES."""


def _parse_hosts(text: str) -> tuple[str, ...]:
    return tuple(h.strip().lower() for h in text.split(",") if h.strip())


@dataclass(frozen=True)
class FetchSettings:
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    # Extra hosts task URLs may point at: "host", "host:port", "*.example.com", or "*" for any.
    allowed_hosts: tuple[str, ...] = ()
    timeout: float = DEFAULT_FETCH_TIMEOUT_S
    verify_ssl: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "FetchSettings":
        env = os.environ if env is None else env
        try:
            max_bytes = int(env.get("MAX_IMAGE_BYTES") or DEFAULT_MAX_IMAGE_BYTES)
            timeout = float(env.get("IMAGE_FETCH_TIMEOUT") or DEFAULT_FETCH_TIMEOUT_S)
        except ValueError as exc:
            raise ValueError(f"MAX_IMAGE_BYTES / IMAGE_FETCH_TIMEOUT must be numbers: {exc}") from exc
        if max_bytes <= 0:
            raise ValueError(f"MAX_IMAGE_BYTES must be positive, got {max_bytes}")
        try:
            verify = parse_switch(env.get("VERIFY_SSL") or "true")
        except ValueError as exc:
            raise ValueError(f"VERIFY_SSL={env['VERIFY_SSL']!r}: {exc}") from exc
        return cls(max_bytes=max_bytes, allowed_hosts=_parse_hosts(env.get("ALLOWED_IMAGE_HOSTS", "")),
                   timeout=timeout, verify_ssl=verify)


def host_allowed(netloc: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``netloc`` (host[:port]) matches an allow-list entry."""
    netloc = netloc.lower()
    hostname = netloc.rsplit("@", 1)[-1]
    bare = hostname.split(":")[0] if not hostname.startswith("[") else hostname.split("]")[0] + "]"
    for entry in allowed:
        if entry == "*" or entry in (hostname, bare):
            return True
        if entry.startswith("*.") and bare.endswith(entry[1:]):
            return True
        if entry.startswith(".") and bare.endswith(entry):
            return True
    return False


class GuardedSession(requests.Session):
    """A requests session that enforces the allow-list, follows redirects itself and caps body size.

    label-studio-sdk's downloader calls ``get(url, stream=True, headers=..., verify=...)`` and then
    reads ``response.content``; here the content is read (and limited) before it is handed back.
    """

    def __init__(self, settings: FetchSettings, ls_host: str | None) -> None:
        super().__init__()
        self.settings = settings
        self.ls_host = ls_host.lower() if ls_host else None

    def _check(self, url: str, trusted_redirect: bool) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https"):
            raise FetchError(f"unsupported image URL scheme {parsed.scheme!r} in {url[:100]!r}")
        netloc = parsed.netloc.lower()
        if trusted_redirect or netloc == self.ls_host or host_allowed(netloc, self.settings.allowed_hosts):
            return
        raise HostNotAllowedError(
            f"image host {parsed.hostname!r} is not allowed: only the Label Studio host"
            f"{' (' + self.ls_host + ')' if self.ls_host else ''} and ALLOWED_IMAGE_HOSTS are fetched from; "
            "add it to ALLOWED_IMAGE_HOSTS (comma-separated) to allow it"
        )

    def request(self, method, url, **kwargs):  # type: ignore[override]
        kwargs["allow_redirects"] = False
        kwargs["stream"] = True
        kwargs.setdefault("timeout", self.settings.timeout)
        kwargs.setdefault("verify", self.settings.verify_ssl)
        headers = dict(kwargs.pop("headers", None) or {})
        trusted = False
        for _ in range(MAX_REDIRECTS + 1):
            self._check(url, trusted)
            response = super().request(method, url, headers=headers, **kwargs)
            if not response.is_redirect:
                self._read_limited(response)
                return response
            location = urljoin(url, response.headers["location"])
            response.close()
            # Label Studio's own redirects (presigned cloud-storage URLs) are trusted; anyone else's
            # redirect target must pass the allow-list itself.
            trusted = host_of(url) == self.ls_host
            if host_of(location) != host_of(url):
                headers.pop("Authorization", None)
            url, method = location, "GET"
        raise FetchError(f"too many redirects fetching the image (more than {MAX_REDIRECTS})")

    def _read_limited(self, response: requests.Response) -> None:
        limit = self.settings.max_bytes
        length = response.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            response.close()
            raise ImageTooLargeError(_too_large(int(length), limit))
        chunks, total = [], 0
        try:
            for chunk in response.iter_content(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise ImageTooLargeError(_too_large(total, limit, at_least=True))
                chunks.append(chunk)
        finally:
            response.close()
        response._content = b"".join(chunks)  # what response.content returns from now on
        response._content_consumed = True


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    return (f"image is {'over ' if at_least else ''}{size:,} bytes, above the limit of {limit:,} bytes "
            "(MAX_IMAGE_BYTES)")


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:`` URL (base64 or percent-encoded)."""
    match = _DATA_URL.match(url)
    if not match:
        raise FetchError("malformed data URL: expected data:<mime>;base64,<data>")
    payload = match.group("data")
    base64_encoded = ";base64" in match.group("params").lower()
    estimate = len(payload) * 3 // 4 if base64_encoded else len(payload)
    if estimate > max_bytes:
        raise ImageTooLargeError(_too_large(estimate, max_bytes))
    if not base64_encoded:
        return unquote_to_bytes(payload)
    return decode_base64(payload)


def decode_base64(payload: str) -> bytes:
    try:
        return base64.b64decode("".join(payload.split()) + "==", validate=False)
    except (binascii.Error, ValueError) as exc:
        raise FetchError(f"image data is not valid base64: {exc}") from exc


def fetch_image(url: str, client: LabelStudioClient | None, settings: FetchSettings,
                task_id: int | None = None) -> bytes:
    """The bytes of the image at ``url`` (a task's data value).

    ``client`` is the Label Studio the task came from (for uploads, local files and presigned cloud
    storage); None when no Label Studio URL is configured, in which case only data URLs and hosts
    in ALLOWED_IMAGE_HOSTS can be fetched.
    """
    if not isinstance(url, str) or not url.strip():
        raise FetchError("the task has no image URL")
    url = url.strip()
    if url.startswith("data:"):
        return decode_data_url(url, settings.max_bytes)
    if not _is_fetchable(url):
        raise FetchError(f"unsupported image URL {url[:100]!r}: expected http(s), data:, /data/upload/..., "
                         "/data/local-files/?d=... or s3:// / gs:// / azure-blob:// storage")
    try:
        return _fetch_via_sdk(url, client, settings, task_id)
    except LabelStudioAuthError:
        raise
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if client is not None and status == 401 and exc.response is not None and host_of(exc.response.url) == client.host:
            if client.is_pat:  # the access token may have expired between refresh and use
                client.invalidate()
                try:
                    return _fetch_via_sdk(url, client, settings, task_id)
                except requests.HTTPError as again:
                    if again.response is None or again.response.status_code != 401:
                        raise FetchError(_http_error_message(again)) from again
            raise client.auth_error("downloading a task image") from exc
        raise FetchError(_http_error_message(exc)) from exc


def _fetch_via_sdk(url: str, client: LabelStudioClient | None, settings: FetchSettings,
                   task_id: int | None) -> bytes:
    from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_local_path, http_session

    needs_ls = not url.startswith(("http://", "https://"))
    if needs_ls and client is None:
        raise FetchError(f"can't fetch {url[:100]!r}: no Label Studio URL is known; set LABEL_STUDIO_URL and "
                         "LABEL_STUDIO_API_KEY (or connect the model from a Label Studio project)")
    if url.startswith(("s3:", "gs:", "azure-blob:")) and task_id is None:
        raise FetchError(f"cloud storage URL {url[:100]!r} needs the task id to be presigned by Label Studio")
    hostname = client.url if client else None
    # Only Label Studio's own URLs need our key; don't refresh tokens for a plain http image.
    token = client.download_token() if (client and (needs_ls or host_of(url) == client.host)) else None
    with GuardedSession(settings, client.host if client else None) as session, \
            tempfile.TemporaryDirectory(prefix="gsam-fetch-") as cache_dir, http_session(session):
        try:
            path = get_local_path(url, cache_dir=cache_dir, hostname=hostname, access_token=token,
                                  task_id=task_id, download_resources=True)
        except FetchError:
            raise
        except FileNotFoundError as exc:
            raise FetchError(f"can't fetch {url[:100]!r}: {exc}") from exc
        except requests.HTTPError:
            raise
        except requests.RequestException as exc:
            raise FetchError(f"can't reach the image at {_describe(url, client)}: {type(exc).__name__}") from exc
        except ValueError as exc:  # e.g. an invalid LABEL_STUDIO_URL, or a path outside the local-files root
            raise FetchError(f"can't fetch {url[:100]!r}: {exc}") from exc
        size = os.path.getsize(path)
        if size > settings.max_bytes:
            raise ImageTooLargeError(_too_large(size, settings.max_bytes))
        with open(path, "rb") as f:
            return f.read()


def _is_fetchable(url: str) -> bool:
    return url.startswith(("http://", "https://", "/data/", "data/", "/upload", "upload/", "/storage-data/",
                           "s3:", "gs:", "azure-blob:"))


def _describe(url: str, client: LabelStudioClient | None) -> str:
    if url.startswith(("http://", "https://")):
        parsed = urlparse(url)
        return f"{parsed.scheme}://{parsed.netloc}{parsed.path[:80]}"
    return f"{client.url if client else 'Label Studio'} ({url[:80]})"


def _http_error_message(exc: requests.HTTPError) -> str:
    response = exc.response
    if response is None:
        return f"image download failed: {exc}"
    parsed = urlparse(response.url)
    return f"image download failed: HTTP {response.status_code} from {parsed.scheme}://{parsed.netloc}{parsed.path[:80]}"


__all__ = [
    "FetchError", "FetchSettings", "GuardedSession", "HostNotAllowedError", "ImageTooLargeError",
    "LabelStudioAuthError", "LabelStudioError", "decode_base64", "decode_data_url", "fetch_image", "host_allowed",
]
