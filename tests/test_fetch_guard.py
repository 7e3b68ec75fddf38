"""The fetch guard against real loopback servers: allow-list bypasses (issue 10 item 1), Label Studio's
key sent to non-media paths (item 2), the total fetch deadline (item 6) and malformed image data (item 9).

Every bypass test has an *unlisted* server that must receive no request at all, and a Label Studio that
records which paths it was asked for with the key.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from backend._wsgi import ServerSettings, create_app
from backend.fetch import (
    FetchError,
    FetchSettings,
    FetchTimeoutError,
    HostNotAllowedError,
    ImageDataError,
    ImageURLError,
    URLNotAllowedError,
    decode_base64,
    decode_data_url,
    fetch_image,
)
from backend.fetch_guard import host_allowed, parse_image_url
from backend.ls_api import Credentials, LabelStudioClient
from backend.ls_model import ModelSettings
from tests.test_fetch import LEGACY_TOKEN, FakeLabelStudio, png_bytes

SECRET_JSON = json.dumps({"token": LEGACY_TOKEN}).encode()
MEDIA = ("/data/upload/", "/data/local-files/", "/storage-data/uploaded/")
CONFIG = ('<View><Image name="image" value="$image"/>'
          '<BrushLabels name="tag" toName="image"><Label value="cat"/></BrushLabels></View>')


@pytest.fixture(scope="module")
def _servers():
    """Label Studio, an allow-listed host and an unlisted one, shared by the module (each test starts
    with empty request logs)."""
    with FakeLabelStudio() as ls, FakeLabelStudio() as allowed, FakeLabelStudio() as unlisted:
        ls.files["/raw/x.png"] = png_bytes()
        ls.files["/data/upload/1/x.png"] = png_bytes(seed=1)
        ls.files["/api/current-user/token"] = SECRET_JSON  # what the traversal reached before
        allowed.files["/raw/x.png"] = png_bytes(seed=4)
        # the unlisted host serves an image, so that a leak would succeed rather than just fail
        unlisted.files["/raw/x.png"] = unlisted.files["/secret"] = png_bytes(seed=9)
        yield ls, allowed, unlisted


@pytest.fixture
def ls(_servers):
    _servers[0].requests.clear()
    return _servers[0]


@pytest.fixture
def allowed(_servers):
    _servers[1].requests.clear()
    return _servers[1]


@pytest.fixture
def unlisted(_servers):
    _servers[2].requests.clear()
    return _servers[2]


def client_for(server: FakeLabelStudio) -> LabelStudioClient:
    return LabelStudioClient(Credentials(server.url, LEGACY_TOKEN))


def settings(*hosts: str, timeout: float = 5) -> FetchSettings:
    return FetchSettings(max_bytes=1 << 20, timeout=timeout, allowed_hosts=hosts)


# -- item 1: the host that is checked is the host that is connected to ------------------------------------
BYPASSES = [
    "http://{other}\\@{allowed}/raw/x.png",  # the audit's case: urllib3 ends the host at "\"
    "http://{other}\\\\@{allowed}/raw/x.png",
    "http://{other}\\.{allowed_host}/raw/x.png",
    "HTTP://{other}\\@{allowed}/raw/x.png",
    "http://{other}%5C@{allowed}/raw/x.png",  # userinfo "other%5C" for the allowed host: refused as userinfo
    "http://{other}%5c@{allowed}/raw/x.png",
    "http://{allowed}@{other}/raw/x.png",  # userinfo that looks like the allowed host
    "http://{allowed}:pw@{other}/raw/x.png",
    "http://{other}/@{allowed}/raw/x.png",
    "http://{other}#@{allowed}/raw/x.png",
    "http://{other}?@{allowed}/raw/x.png",
    "http://{other}/raw/x.png#@{allowed}",
    "http://{other}/raw/x.png?u=http://{allowed}/",
    "http://{other}\t@{allowed}/raw/x.png",  # urlsplit strips tabs and newlines, urllib3 doesn't
    "http://{other}\n@{allowed}/raw/x.png",
    "http://{allowed_host}:{other_port}/raw/x.png",
    "http://{allowed_host}:0{other_port}/raw/x.png",
    "http://{allowed_host}.:{other_port}/raw/x.png",
    "http://[::ffff:127.0.0.1]:{other_port}/raw/x.png",
    "http://localhost:{other_port}/raw/x.png",
    "http://１２７.0.0.1:{other_port}/raw/x.png",  # full-width digits
    "http://{other}＠{allowed}/raw/x.png",  # full-width @
    "http://{other}／@{allowed}/raw/x.png",  # full-width solidus
    " http://{other}\\@{allowed}/raw/x.png ",
    "http://{other}:@{allowed}/raw/x.png",
    "http://a@{other}@{allowed}/raw/x.png",
    "//{other}/raw/x.png",
    "http:/{other}/raw/x.png",
    "http:\\\\{other}/raw/x.png",
    # other spellings of the loopback address: another host to the allow-list, refused unless listed
    "http://2130706433:{other_port}/raw/x.png",
    "http://0177.0.0.1:{other_port}/raw/x.png",
    "http://0x7f.1:{other_port}/raw/x.png",
    "http://127.1:{other_port}/raw/x.png",
    "http://0.0.0.0:{other_port}/raw/x.png",
    "http://[::1]:{other_port}/raw/x.png",
    "http://[::ffff:7f00:1]:{other_port}/raw/x.png",
    "http://[0:0:0:0:0:ffff:127.0.0.1]:{other_port}/raw/x.png",
    "http://[::127.0.0.1]:{other_port}/raw/x.png",
    "http://[64:ff9b::7f00:1]:{other_port}/raw/x.png",
    "http://[2002:7f00:1::]:{other_port}/raw/x.png",
    "http://[fe80::1%25lo]:{other_port}/raw/x.png",
    "http://{allowed_host}:{other_port}:/raw/x.png",
    "http://{other}%40{allowed}/raw/x.png",
    "http://{other}%2540{allowed}/raw/x.png",
    "https://{allowed_host}:{other_port}/raw/x.png",
]


def _fill(template: str, allowed: FakeLabelStudio, other: FakeLabelStudio) -> str:
    return template.format(other=other.host, allowed=allowed.host, allowed_host="127.0.0.1",
                           other_port=other.host.rsplit(":", 1)[1])


@pytest.mark.parametrize("template", BYPASSES)
def test_unlisted_host_gets_no_request_from_an_allow_listed_url(template, allowed, unlisted):
    url = _fill(template, allowed, unlisted)
    try:
        data = fetch_image(url, None, settings(allowed.host))
    except FetchError:
        pass
    else:
        assert data == allowed.files["/raw/x.png"]
    assert unlisted.requests == []


@pytest.mark.parametrize("template", BYPASSES)
def test_unlisted_host_gets_no_request_when_label_studio_is_the_trusted_host(template, ls, unlisted):
    url = _fill(template, ls, unlisted)
    try:
        fetch_image(url, client_for(ls), settings())
    except FetchError:
        pass
    assert unlisted.requests == []
    # and Label Studio never saw the key outside its media routes
    assert [path for _, path, auth in ls.requests if auth and not path.startswith(MEDIA)] == []


@pytest.mark.parametrize("template", BYPASSES[:6])
def test_redirect_hops_are_checked_the_same_way(template, allowed, unlisted):
    target = _fill(template, allowed, unlisted)
    with pytest.raises(FetchError):
        fetch_image(f"{allowed.url}/redirect?to={target}", None, settings(allowed.host))
    assert unlisted.requests == []


def test_backslash_url_is_refused_naming_the_backslash(allowed, unlisted):
    with pytest.raises(ImageURLError, match="backslash"):
        fetch_image(f"http://{unlisted.host}\\@{allowed.host}/secret", None, settings(allowed.host))


def test_userinfo_is_refused_for_other_hosts(allowed):
    with pytest.raises(URLNotAllowedError, match="user name or password"):
        fetch_image(f"http://user:hunter2hunter2@{allowed.host}/raw/x.png", None, settings(allowed.host))
    assert allowed.requests == []


@pytest.mark.parametrize("userinfo, secret", [
    ("user:p@ss-w0rd-tail", "ss-w0rd-tail"),  # urllib3 ends the userinfo at the last "@"
    ("ghp_t0kenAsUserName0123", "ghp_t0kenAsUserName0123"),  # a token as the user name, no password
    ("u:pw\\x@y", "x@y"),
])
@pytest.mark.parametrize("host", ["{allowed}", "127.0.0.1:0", "127.0.0.1\t"])  # refused as userinfo, port 0, tab
def test_userinfo_refusal_does_not_echo_the_credentials(userinfo, secret, host, allowed):
    with pytest.raises(FetchError) as raised:
        fetch_image(f"http://{userinfo}@{host.format(allowed=allowed.host)}/raw/x.png", None, settings(allowed.host))
    assert secret not in str(raised.value)
    assert allowed.requests == []


def test_equivalent_spellings_of_an_allowed_host_are_still_allowed(allowed):
    port = allowed.host.rsplit(":", 1)[1]
    image = allowed.files["/raw/x.png"]
    for url in (f"http://127.0.0.1:{port}/raw/x.png", f"HTTP://127.0.0.1:{port}/raw/x.png",
                f"http://127.0.0.1:{port}/raw/./x.png", f"http://127.0.0.1:{port}/raw/x.png#frag"):
        assert fetch_image(url, None, settings(allowed.host)) == image
    host_only = settings("127.0.0.1")  # a bare host allows every port
    assert fetch_image(f"http://127.0.0.1:{port}/raw/x.png", None, host_only) == image


def test_allow_list_entries_are_validated():
    with pytest.raises(ValueError, match="ALLOWED_IMAGE_HOSTS entry 'a b'"):
        FetchSettings.from_env({"ALLOWED_IMAGE_HOSTS": "ok.com, a b"})
    with pytest.raises(ValueError, match="IMAGE_FETCH_TIMEOUT"):
        FetchSettings.from_env({"IMAGE_FETCH_TIMEOUT": "0"})


def test_host_not_allowed_error_names_the_connected_host(allowed, unlisted):
    with pytest.raises(HostNotAllowedError, match=unlisted.host):
        fetch_image(f"http://{unlisted.host}/raw/x.png", None, settings(allowed.host))


# -- item 2: Label Studio's key only on its media routes -----------------------------------------------------
TRAVERSALS = [
    "/data/upload/../../api/current-user/token",
    "/data/upload/1/../../../api/current-user/token",
    "/data/upload/%2e%2e/%2e%2e/api/current-user/token",
    "/data/upload/%2E%2E/%2E%2E/api/current-user/token",
    "/data/upload/.%2e/.%2E/api/current-user/token",
    "/data/upload/%252e%252e/%252e%252e/api/current-user/token",
    "/data/upload/%25252e%25252e/%25252e%25252e/api/current-user/token",
    "/data/upload/..%2f..%2fapi/current-user/token",
    "/data/upload/..%2F..%2Fapi%2Fcurrent-user%2Ftoken",
    "/data/upload/..\\..\\api/current-user/token",
    "/data/upload/..%5c..%5capi/current-user/token",
    "/data/upload/..;/..;/api/current-user/token",
    "/data/upload//..//..//api/current-user/token",
    "/data/upload/．．/．．/api/current-user/token",  # full-width dots (NFKC "..")
    "upload/../../api/current-user/token",
    "/upload/../../api/current-user/token",
    "/data/local-files/?d=../../../api/current-user/token",
    "/data/local-files/?d=%2e%2e/%2e%2e/etc/passwd",
    "/storage-data/uploaded/?filepath=upload/../../api/current-user/token",
    "/storage-data/uploaded/?filepath=upload%2F..%2F..%2Fapi",
    "/storage-data/uploaded/?filepath=avatars/x.png",
    "/data/other/api/current-user/token",
    "{ls}/api/current-user/token",  # absolute: the SDK adds the key for Label Studio's host
    "{ls}/data/upload/../../api/current-user/token",
    "{ls}/data/upload/%2e%2e/%2e%2e/api/current-user/token",
    "{ls}/data/upload/1/x.png/../../../../api/current-user/token",
    "{ls}/api/current-user/token?x=/data/upload/1/x.png",
    "{ls}/api/current-user/token#/data/upload/1/x.png",
    "{ls}/api/current-user/token;/data/upload/1/x.png",
    "{ls}/tasks/1/presign/../../api/current-user/token?fileuri=eA==",
    # compatibility slashes NFKC folds into "/" and "\\" (full-width, small), raw or percent-encoded
    "/data/upload/..／..／api/current-user/token",
    "/data/upload/..%EF%BC%8F..%EF%BC%8Fapi/current-user/token",
    "/data/upload/..＼..＼api/current-user/token",
    "/data/upload/..﹨..﹨api/current-user/token",
    "/data/upload/..∕..∕api/current-user/token",  # division slash: NFKC keeps it, some mappings don't
    "/storage-data/uploaded/?filepath=upload/..／..／api/current-user/token",
    "/data/local-files/?d=..／..／api/current-user/token",
    "{ls}/data/upload/..／..／api/current-user/token",
    # percent-encoded bytes that aren't UTF-8: the overlong %C0%AE is "." to lenient decoders
    "/data/upload/%c0%ae%c0%ae/%c0%ae%c0%ae/api/current-user/token",
    "/data/upload/%C0%AE%C0%AE%C0%AF%C0%AE%C0%AE%C0%AFapi/current-user/token",
    "/data/upload/%e0%80%ae%e0%80%ae/%e0%80%ae%e0%80%ae/api/current-user/token",
    "{ls}/data/upload/%c0%ae%c0%ae/%c0%ae%c0%ae/api/current-user/token",
    "/data/local-files/?d=%c0%ae%c0%ae/%c0%ae%c0%ae/api/current-user/token",
    # control characters once decoded: "..\\0" is ".." to a C string
    "/data/upload/..%00/..%00/api/current-user/token",
    "{ls}/data/upload/..%00/..%00/api/current-user/token",
    "/data/upload/..%2500/..%2500/api/current-user/token",
    # full-width percent signs that fold into %2e
    "/data/upload/％２ｅ％２ｅ/％２ｅ％２ｅ/api/current-user/token",
]


@pytest.mark.parametrize("image", TRAVERSALS)
def test_label_studio_key_never_leaves_the_media_routes(image, ls):
    with pytest.raises(FetchError) as raised:
        fetch_image(image.format(ls=ls.url), client_for(ls), settings())
    assert LEGACY_TOKEN not in str(raised.value)
    assert [path for _, path, auth in ls.requests if auth and not path.startswith(MEDIA)] == []
    assert not any("current-user" in path or "passwd" in path for _, path, _ in ls.requests)


def test_traversal_is_refused_with_a_403_naming_the_media_routes(ls):
    image = "/data/upload/../../api/current-user/token"
    with pytest.raises(URLNotAllowedError, match=r"\.\..*only /data/upload/"):
        fetch_image(image, client_for(ls), settings())
    ls.tasks[3] = {"id": 3, "project": 1, "data": {"image": image}}
    ls.projects[1] = {"id": 1, "label_config": CONFIG}
    app = create_app(settings=ServerSettings(load_on_start=False, model=ModelSettings(
        credentials=Credentials(ls.url, LEGACY_TOKEN), fetch=settings())))
    response = app.test_client().get("/api/tasks/3/image")
    assert response.status_code == 403
    assert "only /data/upload/" in response.get_json()["error"]
    assert LEGACY_TOKEN.encode() not in response.get_data()


def test_media_routes_still_work_with_the_key(ls, allowed):
    client = client_for(ls)
    assert fetch_image("/data/upload/1/x.png", client, settings()) == ls.files["/data/upload/1/x.png"]
    assert fetch_image(f"{ls.url}/data/upload/1/x.png", client, settings()) == ls.files["/data/upload/1/x.png"]
    ls.files["/data/local-files/dir/a b.png"] = png_bytes(seed=6)
    assert fetch_image("/data/local-files/?d=dir/a b.png", client, settings()) == png_bytes(seed=6)
    # presigned cloud storage: Label Studio redirects to another host, which gets no key
    ls.presign_target = f"{allowed.url}/raw/x.png"
    assert fetch_image("s3://bucket/x.png", client, settings(), task_id=7) == allowed.files["/raw/x.png"]
    assert [auth for _, _, auth in allowed.requests] == [None]


def test_a_success_that_is_not_an_image_is_refused_without_echoing_it(ls):
    ls.files["/data/upload/1/fake.png"] = SECRET_JSON
    with pytest.raises(ImageDataError, match="not an image") as raised:
        fetch_image("/data/upload/1/fake.png", client_for(ls), settings())
    assert LEGACY_TOKEN not in str(raised.value)
    ls.files["/raw/page.png"] = b"<!doctype html><html><body>login</body></html>"
    with pytest.raises(ImageDataError, match="not an image"):
        fetch_image(f"{ls.url}/raw/page.png", None, settings(ls.host))


# -- item 6: one deadline for the whole fetch -----------------------------------------------------------------
class SlowServer:
    """Trickles a response: the body, the headers, or a chain of redirects, each step within any
    per-read timeout but together far over the fetch's deadline."""

    def __init__(self, step: float = 0.1) -> None:
        self.step = step
        self.stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> SlowServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        slow = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _trickle(self, data: bytes) -> None:
                for i in range(len(data)):
                    if slow.stop.wait(slow.step):
                        return
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()

            def do_GET(self) -> None:
                body = png_bytes(8, 8)
                try:
                    if self.path == "/body":
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                                         + f"Content-Length: {len(body)}\r\n\r\n".encode())
                        self._trickle(body)
                    elif self.path == "/headers":
                        self._trickle(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: 0\r\n" * 20
                                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                    elif self.path.startswith("/hop/"):
                        n = int(self.path.rsplit("/", 1)[1])
                        slow.stop.wait(slow.step * 4)
                        location = f"/hop/{n + 1}" if n < 4 else "/done"
                        self.wfile.write(f"HTTP/1.1 302 Found\r\nLocation: {location}\r\n"
                                         "Content-Length: 0\r\n\r\n".encode())
                    else:
                        self.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
                except OSError:
                    pass  # the client hung up, as it should
                self.close_connection = True

        return Handler


@pytest.mark.parametrize("path", ["/body", "/headers", "/hop/0"])
def test_fetch_has_a_total_deadline(path):
    timeout = 1.0
    with SlowServer(step=0.1) as server:
        start = time.monotonic()
        with pytest.raises(FetchTimeoutError, match="IMAGE_FETCH_TIMEOUT=1 s"):
            fetch_image(f"http://{server.host}{path}", None, settings(server.host, timeout=timeout))
        elapsed = time.monotonic() - start
    assert elapsed < 3 * timeout  # a per-read timeout let /body run for its whole 10+ s


def test_a_slow_task_image_is_a_504_naming_the_setting(ls):
    with SlowServer(step=0.1) as server:
        ls.tasks[4] = {"id": 4, "project": 1, "data": {"image": f"http://{server.host}/body"}}
        ls.projects[1] = {"id": 1, "label_config": CONFIG}
        app = create_app(settings=ServerSettings(load_on_start=False, model=ModelSettings(
            credentials=Credentials(ls.url, LEGACY_TOKEN), fetch=settings(server.host, timeout=1.0))))
        response = app.test_client().get("/api/tasks/4/image")
    assert response.status_code == 504
    assert "IMAGE_FETCH_TIMEOUT=1 s" in response.get_json()["error"]


def test_fast_fetch_is_not_cut_by_the_deadline():
    with SlowServer(step=0.1) as server:
        assert fetch_image(f"http://{server.host}/done", None, settings(server.host, timeout=1.0)) == png_bytes(8, 8)


def test_connect_to_a_silent_listener_times_out_within_the_deadline():
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(FetchTimeoutError):
            fetch_image(f"http://{host}/x.png", None, settings(host, timeout=0.5))
        assert time.monotonic() - start < 1.5


# -- item 9: malformed image data is a 422 naming the problem ------------------------------------------------
@pytest.mark.parametrize("url, message", [
    ("data:image/png;base64", "malformed data URL"),
    ("data:image/png,base64", None),  # not base64: percent-decoded bytes (not an image: decoding says so later)
    ("data:image/png;base64,@@@@", "'@' at position 0"),
    ("data:image/png;base64,iVBORw0K!GgoAAAANSUhEUg", "'!'"),
    ("data:image/png;base64,QQ=QQ", "padding"),
    ("data:image/png;base64,Q", "length"),
    ("data:image/png;base64,QQ====", "padding"),
    ("data:image/png;base64,", "empty"),
    ("data:image/png;base64,ab-c+d", "'-'"),  # two alphabets mixed
])
def test_malformed_data_urls_raise_image_data_error(url, message):
    if message is None:
        assert decode_data_url(url, 100) == b"base64"
        return
    with pytest.raises(ImageDataError, match=message):
        fetch_image(url, None, settings())


def test_base64_forms_that_encoders_produce_are_accepted():
    data = png_bytes(4, 4)
    import base64
    standard = base64.b64encode(data).decode()
    assert decode_base64(standard) == data
    assert decode_base64(standard.rstrip("=")) == data
    assert decode_base64("\n".join(standard[i:i + 76] for i in range(0, len(standard), 76))) == data
    assert decode_base64(base64.urlsafe_b64encode(data).decode()) == data
    assert decode_data_url("data:image/png;base64," + standard.replace("+", "%2B").replace("/", "%2F"), 10_000) == data


@pytest.mark.parametrize("image", ["data:image/png;base64", "data:image/png;base64,@@@@", "%%%%", "QQ=QQ"])
def test_bad_image_data_is_422_at_the_segment_route(image):
    app = create_app(settings=ServerSettings(load_on_start=False))
    response = app.test_client().post("/api/segment", json={"image": image, "prompt": "cat"})
    assert response.status_code == 422
    assert "base64" in response.get_json()["error"] or "data URL" in response.get_json()["error"]


def test_label_studio_url_is_parsed_like_image_urls():
    assert Credentials.from_env({"LABEL_STUDIO_URL": "http://label_studio:8080/"}).url == "http://label_studio:8080"
    for url in ("http://x\\@y:8080", "http://ls:0", "http://l s:8080"):
        with pytest.raises(ValueError, match="Label Studio URL is not usable"):
            Credentials.from_env({"LABEL_STUDIO_URL": url})


@pytest.mark.parametrize("url, entry, allowed_", [
    ("http://münchen.de/x.png", "münchen.de", True),
    ("http://münchen.de/x.png", "xn--mnchen-3ya.de", True),
    ("http://Images.Example.COM./x.png", "images.example.com", True),
    ("http://images.example.com/x.png", "images.example.com.", True),
    ("https://images.example.com/x.png", "images.example.com:443", True),
    ("http://images.example.com/x.png", "images.example.com:443", False),
    ("http://[0:0:0:0:0:0:0:1]:8080/x.png", "[::1]:8080", True),
    ("http://exa%6Dple.com/x.png", "example.com", True),
    ("http://a.cdn.example.com/x.png", "*.example.com", True),
    ("http://example.com.evil.net/x.png", "*.example.com", False),
    ("http://evilexample.com/x.png", ".example.com", False),
    ("http://2130706433/x.png", "127.0.0.1", False),  # another spelling of an address is another host
    ("http://127.1/x.png", "127.0.0.1", False),
])
def test_allow_list_compares_the_normalised_host_and_port(url, entry, allowed_):
    assert host_allowed(parse_image_url(url).origin, (entry,)) is allowed_
