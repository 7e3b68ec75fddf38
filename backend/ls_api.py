"""Talking to Label Studio's API: credentials, legacy vs personal access tokens, and log redaction.

Label Studio 1.23 accepts two kinds of API key:
  * legacy tokens: sent as ``Authorization: Token <key>``;
  * personal access tokens (PATs): a JWT *refresh* token. It is traded for a short-lived access token
    at ``POST /api/token/refresh {"refresh": <pat>}`` and the access token is sent as ``Bearer``.
``LabelStudioClient`` hides the difference and refreshes the access token before it expires and after
a 401. Every key it sees is registered with the log redactor so it never reaches a log line.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests

from .cache import LruCache
from .fetch_guard import FetchError, Origin, parse_image_url

logger = logging.getLogger(__name__)

API_KEY_HELP = (
    "set LABEL_STUDIO_API_KEY to a valid key (Label Studio > Account & Settings: a personal access "
    "token, or a legacy token where the organization allows them)"
)
# Refresh the access token this long before it expires, so it can't lapse in flight.
REFRESH_MARGIN_S = 30.0
DEFAULT_TIMEOUT_S = 30.0


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or answered with an error."""


class LabelStudioNotFound(LabelStudioError):
    """Label Studio has no such object (HTTP 404): a task or project id that doesn't exist, or one the
    API key's organisation can't see."""


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio can't be reached, timed out, or said it is unavailable (HTTP 429/502/503/504):
    it is restarting or overloaded, and nothing is wrong with the request; try again later."""


class LabelStudioAuthError(LabelStudioError):
    """Label Studio rejected our API key (HTTP 401)."""


# -- log redaction --------------------------------------------------------------------------------
# Keys and tokens seen at run time, newest last, bounded: every access-token refresh and every /setup
# adds one, and an unbounded set made each log line slower forever. Clients re-register their keys on
# use (which keeps live ones), configured secrets are pinned. Redaction reads an immutable snapshot,
# longest first, rebuilt only when the set changes.
MAX_SECRETS = 256
_MAX_PINNED = 64
_secrets: OrderedDict[str, None] = OrderedDict()
_pinned: OrderedDict[str, None] = OrderedDict()
_snapshot: tuple[str, ...] | None = ()
_secrets_lock = threading.Lock()
_MIN_SECRET_LEN = 8  # shorter strings would redact ordinary words
# Query parameters that carry signatures or credentials in presigned and token URLs (S3, GCS, Azure
# SAS, CloudFront, generic token=...), also when the URL is itself percent-encoded inside another.
_SIGNED_PARAMS = ("x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
                  "x-goog-credential", "googleaccessid", "signature", "sig", "se", "skoid", "sktid",
                  "key-pair-id", "policy", "token", "access_token", "refresh_token", "id_token", "api_key",
                  "apikey", "key", "password", "secret", "client_secret", "code")
_PATTERNS = (
    # Authorization headers in any form
    (re.compile(r"\b(Token|Bearer|Basic)\s+[A-Za-z0-9._~+/=\-]{8,}"), r"\1 ***"),
    # ... and whatever else follows "Authorization:" (another scheme, a bare key)
    (re.compile(r"""(?i)(\bauthorization['"]?\s*[:=]\s*['"]?)(?!(?:Token|Bearer|Basic) \*\*\*)"""
                r"""([^'"\s,}][^'"\r\n,}]*)"""), r"\1***"),
    # credentials in URLs: scheme://user:password@host, scheme://token@host, a password with an "@"
    # (the userinfo ends at the last "@" before the path, as urllib3 reads it)
    (re.compile(r"""(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#'"<>]*@"""), r"\1***@"),
    # signatures and tokens in query strings: ?X-Amz-Signature=..., &sig=..., %26token%3D...
    (re.compile(r"(?i)((?:[?&;]|%3F|%26)(?:" + "|".join(re.escape(p) for p in _SIGNED_PARAMS)
                + r")(?:=|%3D))(?:(?!%26)[^&\s#'\"<>])+"), r"\1***"),
    # unambiguous names in JSON, query strings or reprs: "access_token": "x", api_key=x, password='x'
    (re.compile(r"""(?i)(\b(?:access_token|refresh_token|api_key|apikey|password|x-amz-signature|"""
                r"""x-amz-security-token|x-goog-signature)['"]?\s*[:=]\s*['"]?)([^'"\s,&}]{4,})"""), r"\1***"),
    # common words only as quoted JSON/dict keys: {"refresh": "x"}, {'access': 'x'}, {"token": "x"}
    (re.compile(r"""(['"](?:access|refresh|token)['"]\s*:\s*['"])([^'"]{4,})"""), r"\1***"),
)


def register_secret(secret: str | None, *, pin: bool = False) -> None:
    """Make ``secret`` appear as ``***`` in every log record from now on.

    Arguments:
      secret: a key, token or password; shorter than 8 characters is ignored (it would redact words).
      pin: keep it for the life of the process (configured secrets: LABEL_STUDIO_API_KEY, the basic
        auth password). Others are kept while they are among the MAX_SECRETS most recently
        registered; registering one again (as clients do on each use) counts as recent.
    """
    global _snapshot
    if not secret or len(secret) < _MIN_SECRET_LEN:
        return
    with _secrets_lock:
        if secret in _pinned:
            return
        if pin:
            _secrets.pop(secret, None)
            _pinned[secret] = None
            if len(_pinned) > _MAX_PINNED:
                _pinned.popitem(last=False)
        elif secret in _secrets:
            _secrets.move_to_end(secret)
            return  # same set: the snapshot stays valid
        else:
            _secrets[secret] = None
            if len(_secrets) > MAX_SECRETS:
                _secrets.popitem(last=False)
        _snapshot = None


def _registered() -> tuple[str, ...]:
    global _snapshot
    snapshot = _snapshot
    if snapshot is None:
        with _secrets_lock:
            if _snapshot is None:
                _snapshot = tuple(sorted((*_pinned, *_secrets), key=len, reverse=True))
            snapshot = _snapshot
    return snapshot


def redact(text: str) -> str:
    """``text`` with registered secrets and token-looking values (Authorization headers, URL passwords,
    signed-URL query parameters) replaced by ``***``."""
    for secret in _registered():  # longest first, so a secret containing another goes whole
        if secret in text:
            text = text.replace(secret, "***")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


_factory_lock = threading.Lock()


def install_log_redaction() -> None:
    """Redact every log record of this process, whichever logger or handler it goes to.

    A record factory (rather than a handler filter) also covers handlers added later, such as
    gunicorn's or pytest's. Records are only rewritten when redaction changes them.
    """
    with _factory_lock:
        current = logging.getLogRecordFactory()
        if getattr(current, "_redacting", False):
            return

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = current(*args, **kwargs)
            try:
                message = record.getMessage()
            except Exception:  # a broken format string: leave it for logging to report
                return record
            cleaned = redact(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
            if record.exc_info and not record.exc_text:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            return record

        factory._redacting = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(factory)


# -- credentials ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """Where Label Studio is and the key to use; ``source`` says where they came from (for errors)."""

    url: str
    api_key: str
    source: str = "environment"

    def __repr__(self) -> str:  # never print the key
        return f"Credentials(url={self.url!r}, api_key=***, source={self.source!r})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Credentials | None:
        """LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY (label-studio-ml's LABEL_STUDIO_HOST /
        LABEL_STUDIO_ACCESS_TOKEN are read too); None when either is unset."""
        env = os.environ if env is None else env
        url = env.get("LABEL_STUDIO_URL") or env.get("LABEL_STUDIO_HOST") or ""
        key = env.get("LABEL_STUDIO_API_KEY") or env.get("LABEL_STUDIO_ACCESS_TOKEN") or ""
        if not url:
            return None
        return cls(normalise_url(url), key.strip(), "environment")


def normalise_url(url: str) -> str:
    """Label Studio's URL without a trailing slash; ValueError unless the image fetcher can use it."""
    url = url.strip().rstrip("/")
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"Label Studio URL must start with http:// or https://, got {url!r}")
    try:
        parse_image_url(url)
    except FetchError as exc:
        raise ValueError(f"Label Studio URL is not usable: {exc}") from None
    return url


def _jwt_claims(token: str) -> dict[str, Any] | None:
    """Unverified claims of a JWT, or None when ``token`` isn't one (a legacy token)."""
    if token.count(".") != 2:
        return None
    try:
        import jwt

        claims = jwt.decode(token, options={"verify_signature": False})
    except Exception:
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioClient:
    """One Label Studio instance and key; thread-safe. Refreshes PAT access tokens as needed."""

    def __init__(self, credentials: Credentials, timeout: float = DEFAULT_TIMEOUT_S,
                 session: requests.Session | None = None) -> None:
        self.credentials = credentials
        self.url = credentials.url
        self.timeout = timeout
        self._session = session or requests.Session()
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_expires = 0.0
        register_secret(credentials.api_key)
        claims = _jwt_claims(credentials.api_key) if credentials.api_key else None
        # A PAT is a refresh token; a JWT of another type (an access token pasted by hand) is used as is.
        self.is_pat = claims is not None and claims.get("token_type", "refresh") == "refresh"
        self._bearer_only = bool(claims) and not self.is_pat

    @property
    def origin(self) -> Origin:
        """(scheme, host, port) of Label Studio, parsed as the image fetcher parses every URL."""
        return parse_image_url(self.url).origin

    def auth_error(self, what: str) -> LabelStudioAuthError:
        origin = ("the access_token Label Studio sent to /setup" if self.credentials.source == "setup"
                  else "LABEL_STUDIO_API_KEY")
        return LabelStudioAuthError(
            f"Label Studio at {self.url} rejected {origin} (HTTP 401) while {what}: {API_KEY_HELP}"
        )

    # -- tokens ----------------------------------------------------------------------------------
    def download_token(self) -> str:
        """The token for label-studio-sdk's downloader: it sends JWTs as Bearer and others as Token."""
        if not self.credentials.api_key:
            raise LabelStudioAuthError(
                f"no API key for Label Studio at {self.url}: {API_KEY_HELP}"
            )
        register_secret(self.credentials.api_key)  # in use: keep it among the recent secrets
        if self.is_pat:
            return self._access_token()
        return self.credentials.api_key

    def auth_header(self) -> dict[str, str]:
        token = self.download_token()
        scheme = "Bearer" if (self.is_pat or self._bearer_only) else "Token"
        return {"Authorization": f"{scheme} {token}"}

    def invalidate(self) -> None:
        """Forget the access token (after a 401) so the next call refreshes it."""
        with self._lock:
            self._access, self._access_expires = None, 0.0

    def _access_token(self) -> str:
        with self._lock:
            if self._access and time.time() < self._access_expires - REFRESH_MARGIN_S:
                register_secret(self._access)
                return self._access
            self._access, self._access_expires = self._refresh()
            return self._access

    def _refresh(self) -> tuple[str, float]:
        try:
            response = self._session.post(f"{self.url}/api/token/refresh",
                                          json={"refresh": self.credentials.api_key}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise LabelStudioError(f"can't reach Label Studio at {self.url} to refresh the access token: "
                                   f"{type(exc).__name__}") from exc
        if response.status_code in (401, 403):
            raise self.auth_error("refreshing the personal access token (expired or revoked?)")
        if not response.ok:
            raise LabelStudioError(f"Label Studio at {self.url} answered HTTP {response.status_code} "
                                   "to /api/token/refresh")
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError) as exc:
            raise LabelStudioError(f"Label Studio at {self.url} sent no access token from /api/token/refresh") from exc
        register_secret(access)
        claims = _jwt_claims(access) or {}
        expires = float(claims.get("exp", time.time() + 300))
        logger.debug("refreshed the Label Studio access token for %s", self.url)
        return access, expires

    # -- API calls -------------------------------------------------------------------------------
    def get_json(self, path: str, what: str) -> Any:
        """GET ``path`` (``/api/...``) as JSON; retries once after a 401 with a fresh access token."""
        url = f"{self.url}/{path.lstrip('/')}"
        for attempt in (1, 2):
            try:
                response = self._session.get(url, headers=self.auth_header(), timeout=self.timeout)
            except requests.RequestException as exc:
                raise LabelStudioError(f"can't reach Label Studio at {self.url} while {what}: "
                                       f"{type(exc).__name__}") from exc
            if response.status_code == 401 and attempt == 1 and self.is_pat:
                self.invalidate()
                continue
            if response.status_code == 401:
                raise self.auth_error(what)
            if response.status_code == 404:
                raise LabelStudioNotFound(f"Label Studio at {self.url} has no such object while {what} (HTTP 404)")
            if not response.ok:
                raise LabelStudioError(f"Label Studio at {self.url} answered HTTP {response.status_code} while {what}")
            try:
                return response.json()
            except ValueError as exc:
                raise LabelStudioError(f"Label Studio at {self.url} sent invalid JSON while {what}") from exc
        raise AssertionError("unreachable")

    def get_task(self, task_id: int) -> dict[str, Any]:
        task = self.get_json(f"/api/tasks/{int(task_id)}", f"fetching task {task_id}")
        if not isinstance(task, dict):
            raise LabelStudioError(f"Label Studio sent a malformed task {task_id}")
        return task

    def get_project(self, project_id: int) -> dict[str, Any]:
        project = self.get_json(f"/api/projects/{int(project_id)}", f"fetching project {project_id}")
        if not isinstance(project, dict):
            raise LabelStudioError(f"Label Studio sent a malformed project {project_id}")
        return project


class ClientRegistry:
    """One client per (url, key), so refreshed access tokens are shared by every request."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_S, max_clients: int = 32) -> None:
        self.timeout = timeout
        self.max_clients = max_clients
        self._clients: LruCache[LabelStudioClient] = LruCache(max_clients)  # keys rotate rarely

    def get(self, credentials: Credentials) -> LabelStudioClient:
        return self._clients.get_or_compute((credentials.url, credentials.api_key),
                                            lambda: LabelStudioClient(credentials, timeout=self.timeout))
