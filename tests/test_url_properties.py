"""Property tests for the fetch guard (hypothesis): for generated URLs, the origin the guard decides is
the origin requests/urllib3 connect to (or the URL is refused); the API key's path check never lets a
path through that normalises outside Label Studio's media routes; and against real loopback servers an
unlisted host never receives a request, whatever the URL is made of.
"""

from __future__ import annotations

import ipaddress
import posixpath
import unicodedata
from urllib.parse import unquote

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from requests.adapters import HTTPAdapter

from backend.fetch import FetchError, FetchSettings, fetch_image
from backend.fetch_guard import DEFAULT_PORTS, ImageURL, ImageURLError, Origin, key_path_refusal, parse_image_url
from tests.test_fetch import FakeLabelStudio, png_bytes

_ADAPTER = HTTPAdapter()


def requests_connects_to(url: str) -> Origin | None:
    """Where requests would open a connection for ``url`` (None when requests refuses the URL).

    The oracle is requests' own pool key (``build_connection_pool_key_attributes``), with what
    urllib3's connection does to it: default ports, and a trailing dot stripped before DNS.
    """
    try:
        prepared = requests.Request("GET", url).prepare()
        host_params, _ = _ADAPTER.build_connection_pool_key_attributes(prepared, True)
    except (requests.RequestException, ValueError, UnicodeError):
        return None
    scheme, host, port = host_params["scheme"], host_params["host"], host_params["port"]
    if scheme not in DEFAULT_PORTS or not host:
        return None
    host = host.rstrip(".")
    try:
        host = ipaddress.IPv6Address(host).compressed
    except ValueError:
        pass
    return Origin(scheme, host, port or DEFAULT_PORTS[scheme])


HOSTS = ["127.0.0.1", "example.com", "EXAMPLE.com.", "a_b", "[::1]", "[::FFFF:127.0.0.1]", "[fe80::1%25eth0]",
         "münchen.de", "xn--mnchen-3ya.de", "ｅxample.com", "exa%6Dple.com", "ex%2Fample.com", "2130706433",
         "127.1", "0x7f.1", "a.com%00", "", "a b", "ex\tample.com", "a.com。b", "1.2.3.4.5", "[::1"]
PIECES = ["\\", "@", "/", "#", "?", ":", "%5C", "%5c", "%40", "%2F", "%23", "\t", "\n", " ", "＠", "／", "．",
          ":80", ":0", ":8080", ":65536", ":08080", "user:pw", "..", "%2e", "evil.com", "127.0.0.1"]
SCHEMES = ["http://", "https://", "HTTP://", "hTTps://", "http:/", "http:", "http:\\\\", "ftp://", "//", "http:///"]

urls = st.builds(
    lambda scheme, userinfo, host, port, tail: scheme + userinfo + host + port + tail,
    st.sampled_from(SCHEMES),
    st.one_of(st.just(""), st.lists(st.sampled_from(PIECES), max_size=3).map(lambda p: "".join(p) + "@")),
    st.one_of(st.sampled_from(HOSTS), st.text(alphabet="abc.-_%5C@:[]\\/#?", max_size=12)),
    st.sampled_from(["", ":", ":0", ":80", ":443", ":8080", ":0080", ":65535", ":65536", ": 80", ":-1"]),
    st.lists(st.sampled_from(PIECES + ["/x.png", "?q=1", "#f"]), max_size=5).map("".join),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(urls)
@example("http://127.0.0.1:1\\@127.0.0.1:2/secret")
@example("http://169.254.169.254\\@example.com/")
@example("http://a.com:0/")
@example("http://[fe80::1%25eth0]/")
@example("http://＠:80@127.0.0.1")
@example("http://a.com./x")
@example("http://user:pw@a.com%5C@b.com/")
def test_guard_origin_is_the_origin_requests_connects_to(url):
    try:
        target = parse_image_url(url)
    except ImageURLError:
        return  # refused: nothing is connected to
    _agrees_with_requests(url, target)


def _agrees_with_requests(url: str, target: ImageURL) -> None:
    # the request we build connects exactly where the guard decided (requests may still refuse a
    # user:password it can't encode: then nothing connects) ...
    built = requests_connects_to(target.url)
    assert built == target.origin or (built is None and target.userinfo)
    # ... and it's where requests itself would have gone with the raw string (when it takes it at all)
    raw = requests_connects_to(url)
    assert raw is None or raw == target.origin


@given(st.text(max_size=60).map(lambda s: "http://" + s))
@settings(max_examples=500, deadline=None)
def test_guard_origin_matches_requests_for_arbitrary_text(url):
    try:
        target = parse_image_url(url)
    except ImageURLError:
        return
    _agrees_with_requests(url, target)


# -- the key's path check -----------------------------------------------------------------------------------
SEGMENTS = ["data", "upload", "local-files", "storage-data", "uploaded", "api", "current-user", "token", "tasks",
            "1", "presign", "x.png", "..", ".", "", "%2e%2e", "%2E%2e", "%252e%252e", ".%2e", "%2e.", "..%2f",
            "..%5c", "..;", "..;x", ";x", "%2f", "%5c", "．．", "%ef%bc%8e%ef%bc%8e", "..%00", "%2e%2e%2f",
            "..／", "..＼", "%ef%bc%8f", "..%ef%bc%8f", "％２ｅ％２ｅ"]
QUERIES = [None, "", "d=x.png", "d=../x", "d=%2e%2e/x", "filepath=upload/1/x.png", "filepath=upload/../api",
           "filepath=upload%252f..%252fapi", "fileuri=eA==", "d=", "filepath=avatars/x"]


def _fully_decoded_stages(text: str) -> list[str]:
    stages = [text]
    for _ in range(10):
        decoded = unquote(stages[-1])
        if decoded == stages[-1]:
            break
        stages.append(decoded)
    return stages


def _normalised(path: str) -> str:
    text = unicodedata.normalize("NFKC", _fully_decoded_stages(path)[-1]).replace("\\", "/")
    text = "/".join(segment.split(";", 1)[0] for segment in text.split("/"))
    return posixpath.normpath("/" + text.lstrip("/"))


@settings(max_examples=800, deadline=None)
@given(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=7), st.sampled_from(["/", "\\", "//"]),
       st.sampled_from(QUERIES))
def test_key_paths_that_pass_stay_inside_the_media_routes(segments, separator, query):
    path = "/" + separator.join(segments)
    if key_path_refusal(path, query) is not None:
        return
    for stage in _fully_decoded_stages(path):
        parts = [s.split(";", 1)[0] for s in stage.replace("\\", "/").split("/")]
        assert ".." not in [unicodedata.normalize("NFKC", p).strip() for p in parts]
    normal = _normalised(path)
    assert normal.startswith(("/data/upload/", "/data/local-files", "/storage-data/uploaded", "/tasks/1/presign"))
    for value in _fully_decoded_stages(query or ""):
        assert "../" not in value.replace("\\", "/") and not value.endswith("..")


@pytest.mark.parametrize("path, query", [
    ("/data/upload/1/x.png", None), ("/data/upload/12/a%20b.png", None), ("/data/local-files/", "d=dir/x.png"),
    ("/storage-data/uploaded/", "filepath=upload/1/x.png"), ("/tasks/7/presign/", "fileuri=czM6Ly9iL3g="),
    ("/projects/3/resolve/", "fileuri=czM6Ly9iL3g="),
])
def test_key_paths_label_studio_uses_are_allowed(path, query):
    assert key_path_refusal(path, query) is None


# -- real connections ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hosts():
    with FakeLabelStudio() as allowed, FakeLabelStudio() as unlisted:
        allowed.files["/raw/x.png"] = png_bytes()
        unlisted.files["/raw/x.png"] = png_bytes(seed=3)
        yield allowed, unlisted


CONNECT_PIECES = ["\\", "@", "/", "#", "?", "%5C", "%40", ":", "\t", "＠", "／", "user:pw@", "/raw/x.png", "..",
                  "."]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(CONNECT_PIECES + ["{allowed}", "{unlisted}"]), min_size=1, max_size=6),
       st.sampled_from(["http://", "HTTP://", "http:\\\\", "http:/"]))
def test_unlisted_server_never_receives_a_request(hosts, pieces, scheme):
    allowed, unlisted = hosts
    unlisted.requests.clear()
    url = scheme + "".join(pieces).format(allowed=allowed.host, unlisted=unlisted.host)
    try:
        data = fetch_image(url, None, FetchSettings(timeout=5, allowed_hosts=(allowed.host,)))
    except FetchError:
        pass
    else:
        assert data == allowed.files["/raw/x.png"]
    assert unlisted.requests == []
