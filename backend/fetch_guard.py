"""Where an image fetch may connect and where it may send Label Studio's key, decided on the URL that is sent.

requests parses a URL with urllib3's ``parse_url`` to build the request and then re-reads the prepared
URL with the standard library's ``urlsplit`` to pick the connection. The two disagree on some inputs
(for urllib3 a ``\\`` ends the host, for ``urlsplit`` it doesn't; ``:0`` is a port to one and dropped by
the other), which is how a task could name an allowed host and reach another. So a URL is parsed once
here (``parse_image_url``, urllib3's parser), the request is built from the parsed parts
(``ImageURL.url``), and ``connected_origin`` re-reads the prepared request the way requests' adapter
does: a fetch goes ahead only when both say the same (scheme, host, port). Pure functions, no I/O;
``backend.fetch`` does the fetching.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

DEFAULT_PORTS = {"http": 80, "https": 443}
# A host as it is connected to: an IDNA/ASCII name (underscores allowed: compose service names), a
# dotted IPv4 address, or an IPv6 address (no zone id). Anything else (%, whitespace, ...) is refused.
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_MAX_DECODE_ROUNDS = 4  # %252e%252e is two rounds; more than this is an attack, not a file name


class FetchError(RuntimeError):
    """The image could not be fetched (unreachable, not found, unsupported URL)."""


class ImageURLError(FetchError):
    """The image URL is malformed or of a kind that can't be fetched (a bad input: 422)."""


class URLNotAllowedError(FetchError):
    """The URL is well formed but the fetch is refused: a host, credentials or path we must not use (403)."""


class HostNotAllowedError(URLNotAllowedError):
    """The URL points at a host outside the allow-list."""


class ImageTooLargeError(FetchError):
    """The image is bigger than MAX_IMAGE_BYTES."""


class ImageDataError(FetchError):
    """The image data is malformed (a bad data: URL or base64) or isn't an image at all (422)."""


class FetchTimeoutError(FetchError):
    """The whole fetch (connect, redirects and body) took longer than IMAGE_FETCH_TIMEOUT (504)."""


@dataclass(frozen=True)
class Origin:
    """Exactly what a request connects to."""

    scheme: str  # "http" or "https"
    host: str  # lower-case ASCII name without a trailing dot, dotted IPv4, or compressed IPv6 (no brackets)
    port: int  # the explicit port, or the scheme's default

    @property
    def netloc(self) -> str:
        """``host[:port]`` as written in a URL (IPv6 in brackets, the default port left out)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}"


@dataclass(frozen=True)
class ImageURL:
    """An http(s) URL parsed once; ``url`` is the request built from these parts (no fragment)."""

    origin: Origin
    userinfo: str | None  # "user:password" as written (percent-encoded), or None
    path: str  # percent-encoded, dot segments removed (what urllib3 sends); "/" at least
    query: str | None

    @property
    def url(self) -> str:
        auth = f"{self.userinfo}@" if self.userinfo else ""
        query = f"?{self.query}" if self.query is not None else ""
        return f"{self.origin.scheme}://{auth}{self.origin.netloc}{self.path}{query}"

    def describe(self) -> str:
        """The URL without credentials or query string (signatures live there), for messages."""
        return f"{self.origin}{self.path[:80]}"


def _normal_host(host: str) -> str:
    """``host`` as compared and connected to; ValueError when it isn't a plain name or address."""
    if host.startswith("[") and host.endswith("]"):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        if address.scope_id:  # "%eth0": requests and urllib3 disagree on its encoding
            raise ValueError(f"{host!r} has an IPv6 zone id")
        return address.compressed
    host = host.lower()
    host = host.removesuffix(".")
    if not _NAME.fullmatch(host):
        raise ValueError(f"host {host!r} has characters a host name can't have")
    return host


def parse_image_url(url: str) -> ImageURL:
    """Parse an http(s) image URL the way the HTTP client will, refusing anything ambiguous.

    Arguments:
      url: the URL as found in a task or a redirect's Location.
    Returns:
      the parsed URL; its ``origin`` is what the fetch connects to.
    Raises:
      ImageURLError: not http(s), no host, an invalid port, control characters, or a part two parsers
        could read differently (a backslash before the path).
    """
    shown = describe_url(url)
    if not isinstance(url, str) or _CONTROL.search(url):
        raise ImageURLError(f"image URL {shown} contains control characters (tab, newline, NUL, ...)")
    scheme = _SCHEME.match(url)
    if not scheme or scheme.group(1).lower() not in DEFAULT_PORTS:
        raise ImageURLError(f"unsupported image URL {shown}: expected http:// or https://")
    rest = url[scheme.end():]
    if not rest.startswith("//"):
        raise ImageURLError(f"image URL {shown} has no host: expected {scheme.group(1)}://host/path")
    authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
    if "\\" in authority:
        # urllib3 ends the host at the backslash, urlsplit (and browsers' idea of userinfo) don't:
        # http://169.254.169.254\@allowed/ names one host and reaches the other.
        raise ImageURLError(f"image URL {shown} has a backslash before its path: write it as %5C")
    try:
        parsed = parse_url(url)
    except ValueError as exc:  # urllib3's LocationParseError is one
        raise ImageURLError(f"image URL {shown} can't be parsed: {_parse_reason(exc)}") from None
    if not parsed.host:
        raise ImageURLError(f"image URL {shown} has no host")
    if parsed.port == 0:  # requests drops ":0" and connects to the default port instead
        raise ImageURLError(f"image URL {shown} has port 0")
    try:
        host = _normal_host(parsed.host)
    except ValueError as exc:
        raise ImageURLError(f"image URL {shown}: {exc}") from None
    scheme_name = scheme.group(1).lower()
    origin = Origin(scheme_name, host, parsed.port or DEFAULT_PORTS[scheme_name])
    return ImageURL(origin, parsed.auth or None, parsed.path or "/", parsed.query)


def _parse_reason(exc: ValueError) -> str:
    # urllib3's "Failed to parse: <url>" repeats the URL (credentials included): keep only the why.
    text = str(exc).removeprefix("Failed to parse: ")
    return "invalid host or port" if "://" in text else text[:120]


def connected_origin(prepared_url: str) -> Origin:
    """The (scheme, host, port) requests' adapter connects to for a prepared URL.

    requests' ``_urllib3_request_context`` keys the connection pool on ``urlparse(url)``'s scheme,
    hostname and port; this reads them the same way.
    """
    parts = urlsplit(prepared_url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ImageURLError(f"the request URL {describe_url(prepared_url)} has no http(s) host")
    host = parts.hostname
    try:
        host = _normal_host(f"[{host}]" if ":" in host else host)
        port = parts.port
    except ValueError as exc:
        raise ImageURLError(f"the request URL {describe_url(prepared_url)}: {exc}") from None
    return Origin(scheme, host, port or DEFAULT_PORTS[scheme])


def describe_url(url: object, limit: int = 100) -> str:
    """``url`` for an error message or log line: no user:password, no query string (signatures).

    The whole userinfo goes, up to the last "@" before the path (as urllib3 splits it): a token may be
    the user name itself, and a password may hold an unencoded "@".
    """
    if not isinstance(url, str):
        return repr(url)[:limit]
    text = url.split("#", 1)[0].split("?", 1)[0]
    text = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*:[/\\]*)[^/]*@", r"\1***@", text)
    if "?" in url:
        text += "?..."
    text = _CONTROL.sub("?", text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


# -- the allow-list --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostPattern:
    """One ALLOWED_IMAGE_HOSTS entry: ``host``, ``host:port``, ``*.domain`` / ``.domain``, or ``*``."""

    host: str  # normalised like Origin.host; "" for "*"
    port: int | None  # None: any port
    suffix: bool  # match subdomains of ``host`` (not ``host`` itself)

    @classmethod
    def parse(cls, entry: str) -> HostPattern:
        text = entry.strip()
        if text == "*":
            return cls("", None, True)
        suffix = text.startswith(("*.", "."))
        body = text[2:] if text.startswith("*.") else text[1:] if suffix else text
        try:
            parsed = parse_url("http://" + body)
            if not parsed.host or parsed.auth or parsed.path or parsed.query or parsed.fragment is not None:
                raise ValueError("expected host or host:port")
            if parsed.port == 0:
                raise ValueError("port 0")
            return cls(_normal_host(parsed.host), parsed.port, suffix)
        except (LocationParseError, ValueError) as exc:
            raise ValueError(f"ALLOWED_IMAGE_HOSTS entry {entry!r} is not a host, host:port, *.domain or *: "
                             f"{exc}") from None

    def allows(self, origin: Origin) -> bool:
        if self.port is not None and self.port != origin.port:
            return False
        if self.suffix:
            return not self.host or origin.host.endswith("." + self.host)
        return origin.host == self.host


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """ALLOWED_IMAGE_HOSTS (comma-separated) as lower-case entries; ValueError names a bad entry."""
    entries = tuple(h.strip().lower() for h in text.split(",") if h.strip())
    for entry in entries:
        HostPattern.parse(entry)
    return entries


def host_allowed(target: Origin | str, allowed: Iterable[str]) -> bool:
    """Whether ``target`` (an Origin, a URL, or ``host[:port]``) matches an allow-list entry.

    Entries without a port allow every port; ``host:port`` allows that port only (default ports
    count: ``example.com:443`` allows ``https://example.com/``). Invalid entries allow nothing.
    """
    if isinstance(target, str):
        try:
            target = parse_image_url(target if "://" in target else f"http://{target}").origin
        except ImageURLError:
            return False
    for entry in allowed:
        try:
            if HostPattern.parse(entry).allows(target):
                return True
        except ValueError:
            continue
    return False


# -- where Label Studio's key may go ----------------------------------------------------------------------
KEY_PATHS_HELP = ("/data/upload/..., /data/local-files/?d=..., /storage-data/uploaded/?filepath=upload/... "
                  "and /tasks|projects/<id>/presign|resolve/?fileuri=...")


# What a server, proxy or file system may read as a path separator: "/" and "\" (NFKC folds the
# full-width and small forms ／ ＼ ﹨ into these) and the look-alikes NFKC leaves alone but some
# "best fit" mappings turn into "/" or "\" (∕ ⁄ ⧸ ∖ ⧹).
_SEPARATORS = re.compile("[/\\\\\u2215\u2044\u29f8\u2216\u29f9]")


def _segments(path: str) -> list[str]:
    # ";params" are dropped by some servers: decide on what's left
    return [segment.split(";", 1)[0] for segment in _SEPARATORS.split(path)]


def _unquote(text: str, path: str) -> str:
    """One round of percent-decoding; ValueError when the bytes aren't UTF-8.

    A lenient decoder reads the overlong ``%C0%AE`` as ".", ``unquote`` as U+FFFD: bytes that aren't
    UTF-8 have no single meaning, so the path is refused rather than guessed at.
    """
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"path {describe_url(path)} has percent-encoded bytes that aren't UTF-8 (such as the "
                         "overlong %C0%AE for '.')") from None


def _forms(path: str) -> set[str]:
    """Every reading of ``path`` a server might act on: percent-decoded 0 to _MAX_DECODE_ROUNDS times,
    with compatibility folding (NFKC: ．→., ／→/, ％２ｅ→%2e) before or after any round."""
    forms: set[str] = set()
    level = {path}
    for _ in range(_MAX_DECODE_ROUNDS + 1):
        level = (level | {unicodedata.normalize("NFKC", text) for text in level}) - forms
        forms |= level
        level = {decoded for text in level if (decoded := _unquote(text, path)) != text} - forms
        if not level:
            return forms
    raise ValueError(f"path {describe_url(path)} is percent-encoded more than {_MAX_DECODE_ROUNDS} times")


def decoded_segments(path: str) -> tuple[str, ...]:
    """``path``'s segments after percent-decoding until stable; ValueError when any reading of it
    (``_forms``) has a ``..`` segment or a control character.

    Every reading is checked because the server may decode once, twice (Label Studio's storage-data
    view calls ``unquote`` on an already decoded parameter) or not at all, and may fold look-alike
    characters; a NUL or newline ends or splits the path for some of them ("..\\0" reads as "..").
    """
    for form in _forms(path):
        if _CONTROL.search(form):
            raise ValueError(f"path {describe_url(path)} has control characters once percent-decoded "
                             "(%00, %0A, ...)")
        if any(segment.strip() == ".." for segment in _segments(form)):
            raise ValueError(f"path {describe_url(path)} climbs out of its directory ('..')")
    text = path
    while (decoded := unquote(text)) != text:  # bounded: _forms decoded it to the end
        text = decoded
    return tuple(s for s in _segments(text) if s not in ("", "."))


def key_path_refusal(path: str, query: str | None, base_path: str = "") -> str | None:
    """Why Label Studio's key must not be sent to ``path?query``, or None when it may.

    Only Label Studio's media routes are fetched with the key: uploads, local files, the storage proxy
    and presigned cloud-storage resolution. ``base_path`` is where Label Studio is mounted
    (LABEL_STUDIO_URL's path).
    """
    try:
        segments = decoded_segments(path)
        base = decoded_segments(base_path)
        values: dict[str, list[str]] = {}
        try:
            pairs = parse_qsl(query or "", keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            return ("the query string has percent-encoded bytes that aren't UTF-8 (such as the overlong "
                    "%C0%AE for '.')")
        for key, value in pairs:
            decoded_segments(value)  # a parameter can't climb either
            values.setdefault(key, []).append(unquote(unquote(value)))
    except ValueError as exc:
        return str(exc)
    if segments[:len(base)] != base:
        return f"path {describe_url(path)} is outside Label Studio's URL"
    route = segments[len(base):]
    if route[:2] == ("data", "upload") and len(route) > 2:
        return None
    if route == ("data", "local-files") and all(values.get("d", [""])):
        return None
    if (route == ("storage-data", "uploaded") and values.get("filepath")
            and all(v.lstrip("/").startswith("upload/") for v in values["filepath"])):
        return None
    if (len(route) == 3 and route[0] in ("tasks", "projects") and route[1].isdigit()
            and route[2] in ("presign", "resolve") and values.get("fileuri")):
        return None
    return f"{describe_url(path)} is not one of Label Studio's media URLs"


def label_studio_path_refusal(task_url: str) -> str | None:
    """``key_path_refusal`` for a task's relative Label Studio URL (``/data/upload/...``, ``upload/...``)."""
    path, _, query = task_url.split("#", 1)[0].partition("?")
    if path.startswith(("upload/", "/upload/")):  # the SDK prefixes these with /data
        path = "/data/" + path.lstrip("/")
    return key_path_refusal(path, query or None)


__all__: Sequence[str] = [
    "DEFAULT_PORTS", "KEY_PATHS_HELP", "FetchError", "FetchTimeoutError", "HostNotAllowedError", "HostPattern",
    "ImageDataError", "ImageTooLargeError", "ImageURL", "ImageURLError", "Origin", "URLNotAllowedError",
    "connected_origin", "decoded_segments", "describe_url", "host_allowed", "key_path_refusal",
    "label_studio_path_refusal", "parse_allowed_hosts", "parse_image_url",
]
