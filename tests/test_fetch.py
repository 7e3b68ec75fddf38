"""Fetching task images: Label Studio URLs, tokens (legacy and personal access tokens), the host
allow-list, redirects, the byte limit and log redaction, against local HTTP servers on 127.0.0.1.

``FakeLabelStudio`` serves what a Label Studio 1.23 serves to an ML backend (uploads, local files,
presigned cloud storage, token refresh, tasks and projects); test_server.py uses it too.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
import numpy as np
import pytest
from PIL import Image

from backend.fetch import (
    FetchError,
    FetchSettings,
    HostNotAllowedError,
    ImageTooLargeError,
    decode_data_url,
    fetch_image,
    host_allowed,
)
from backend.ls_api import (
    ClientRegistry,
    Credentials,
    LabelStudioAuthError,
    LabelStudioClient,
    install_log_redaction,
    redact,
    register_secret,
)

LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
JWT_SECRET = "test-only-hmac-secret-not-a-real-key-0123456789"


def png_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def make_pat(lifetime: float = 3600) -> str:
    """A personal access token as Label Studio 1.23 issues them: a JWT refresh token."""
    return jwt.encode({"token_type": "refresh", "exp": int(time.time() + lifetime), "user_id": 1}, JWT_SECRET)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeLabelStudio:
    """Label Studio's media, token and task endpoints on 127.0.0.1, recording every request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}  # "/data/upload/1/x.png", "/data/local-files/dir/x.png", "/raw/x.png"
        self.tasks: dict[int, dict[str, Any]] = {}
        self.projects: dict[int, dict[str, Any]] = {}
        self.presign_target: str | None = None  # where /tasks/<id>/presign/ redirects
        self.presign_status = 303  # ... and with which status (301, 302, 303, 307, 308)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self.access_lifetime = 300.0
        self.access_epoch = 0  # bump to invalidate every access token issued so far
        self.refreshes = 0
        self.pats: set[str] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeLabelStudio:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def issue_pat(self) -> str:
        pat = make_pat()
        self.pats.add(pat)
        return pat

    def authorised(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.partition(" ")
        if scheme == "Token":
            return token == LEGACY_TOKEN
        if scheme == "Bearer":
            try:
                claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
            except jwt.PyJWTError:
                return False
            return claims.get("token_type") == "access" and claims.get("epoch") == self.access_epoch
        return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes = b"", content_type: str = "application/octet-stream",
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, obj: Any) -> None:
                self._send(status, json.dumps(obj).encode(), "application/json")

            def do_POST(self) -> None:
                auth = self.headers.get("Authorization")
                fake.requests.append(("POST", self.path, auth))
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") == "/api/token/refresh":
                    if body.get("refresh") not in fake.pats:
                        return self._json(401, {"detail": "Token is invalid or expired"})
                    fake.refreshes += 1
                    access = jwt.encode({"token_type": "access", "epoch": fake.access_epoch,
                                         "exp": int(time.time() + fake.access_lifetime)}, JWT_SECRET)
                    return self._json(200, {"access": access})
                self._json(404, {"detail": "not found"})

            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                fake.requests.append(("GET", self.path, auth))
                parsed = urlparse(self.path)
                query = parse_qs(parsed.query)
                path = parsed.path
                if path == "/big":  # streamed, no Content-Length: only a streaming limit can stop it
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    try:
                        for _ in range(64):
                            self.wfile.write(b"\0" * 65536)
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                if path == "/big-declared":
                    self.send_response(200)
                    self.send_header("Content-Length", str(10 ** 9))
                    self.end_headers()
                    self.close_connection = True
                    return
                if path == "/redirect":
                    return self._send(302, headers={"Location": query["to"][0]})
                if path.startswith("/raw/"):  # a plain web server: no auth
                    data = fake.files.get(path)
                    return self._send(200, data) if data is not None else self._json(404, {})
                # Everything else is Label Studio's and needs a key.
                if not fake.authorised(auth):
                    return self._json(401, {"detail": "Authentication credentials were not provided."})
                if path.startswith("/storage-data/uploaded"):
                    key = "/data/" + query.get("filepath", [""])[0]
                elif path.startswith("/data/local-files"):
                    key = "/data/local-files/" + query.get("d", [""])[0]
                else:
                    key = path
                if key in fake.files:
                    return self._send(200, fake.files[key], "image/png")
                if path.startswith("/tasks/") and path.endswith("/presign/"):
                    uri = base64.urlsafe_b64decode(query["fileuri"][0]).decode()
                    return self._send(fake.presign_status, headers={"Location": f"{fake.presign_target}?uri={uri}"})
                if path.startswith("/api/tasks/"):
                    task = fake.tasks.get(int(path.rstrip("/").rsplit("/", 1)[1]))
                    return self._json(200, task) if task else self._json(404, {"detail": "Not found."})
                if path.startswith("/api/projects/"):
                    project = fake.projects.get(int(path.rstrip("/").rsplit("/", 1)[1]))
                    return self._json(200, project) if project else self._json(404, {"detail": "Not found."})
                self._json(404, {"detail": "Not found."})

        return Handler


@pytest.fixture
def fake_ls():
    with FakeLabelStudio() as ls:
        yield ls


@pytest.fixture
def cloud():
    """A second host standing in for S3: serves /raw/ files without auth."""
    with FakeLabelStudio() as server:
        yield server


def legacy_client(ls: FakeLabelStudio, token: str = LEGACY_TOKEN) -> LabelStudioClient:
    return LabelStudioClient(Credentials(ls.url, token))


SETTINGS = FetchSettings(max_bytes=1 << 20, timeout=5)


# -- data URLs ----------------------------------------------------------------------------------------
def test_data_urls_decode_and_respect_the_byte_limit():
    image = png_bytes()
    assert fetch_image(data_url(image), None, SETTINGS) == image
    assert decode_data_url("data:text/plain,hello%20there", 100) == b"hello there"
    with pytest.raises(FetchError, match="malformed data URL"):
        fetch_image("data:image/png;base64", None, SETTINGS)
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_BYTES"):
        fetch_image(data_url(b"\0" * 2000), None, FetchSettings(max_bytes=1000))


# -- Label Studio URLs and tokens -----------------------------------------------------------------------
def test_upload_with_legacy_token_sends_token_header(fake_ls):
    image = png_bytes()
    fake_ls.files["/data/upload/1/abc-img0.png"] = image
    assert fetch_image("/data/upload/1/abc-img0.png", legacy_client(fake_ls), SETTINGS) == image
    auths = {auth for _, _, auth in fake_ls.requests}
    assert auths == {f"Token {LEGACY_TOKEN}"}


def test_personal_access_token_is_refreshed_once_then_reused(fake_ls):
    image = png_bytes(seed=1)
    fake_ls.files["/data/upload/1/pat.png"] = image
    client = LabelStudioClient(Credentials(fake_ls.url, fake_ls.issue_pat()))
    assert client.is_pat
    for _ in range(3):
        assert fetch_image("/data/upload/1/pat.png", client, SETTINGS) == image
    assert fake_ls.refreshes == 1
    bearer = [auth for method, _, auth in fake_ls.requests if method == "GET"]
    assert bearer and all(a.startswith("Bearer ") and a != f"Bearer {client.credentials.api_key}" for a in bearer)


def test_expired_access_token_is_refreshed_after_a_401(fake_ls):
    fake_ls.files["/data/upload/1/x.png"] = png_bytes()
    client = LabelStudioClient(Credentials(fake_ls.url, fake_ls.issue_pat()))
    fetch_image("/data/upload/1/x.png", client, SETTINGS)
    fake_ls.access_epoch += 1  # Label Studio no longer accepts the access token we hold
    assert fetch_image("/data/upload/1/x.png", client, SETTINGS)
    assert fake_ls.refreshes == 2
    # ... and access tokens about to expire are refreshed before use
    fake_ls.access_lifetime = 5  # inside the refresh margin
    client.invalidate()
    fetch_image("/data/upload/1/x.png", client, SETTINGS)
    fetch_image("/data/upload/1/x.png", client, SETTINGS)
    assert fake_ls.refreshes == 4


def test_rejected_keys_name_label_studio_api_key(fake_ls):
    fake_ls.files["/data/upload/1/x.png"] = png_bytes()
    with pytest.raises(LabelStudioAuthError, match="LABEL_STUDIO_API_KEY"):
        fetch_image("/data/upload/1/x.png", legacy_client(fake_ls, "wrong-token-123456"), SETTINGS)
    revoked = LabelStudioClient(Credentials(fake_ls.url, make_pat()))  # a PAT this LS never issued
    with pytest.raises(LabelStudioAuthError, match="LABEL_STUDIO_API_KEY"):
        fetch_image("/data/upload/1/x.png", revoked, SETTINGS)
    from_setup = LabelStudioClient(Credentials(fake_ls.url, "wrong-token-123456", "setup"))
    with pytest.raises(LabelStudioAuthError, match="/setup.*LABEL_STUDIO_API_KEY"):
        fetch_image("/data/upload/1/x.png", from_setup, SETTINGS)
    no_key = LabelStudioClient(Credentials(fake_ls.url, ""))
    with pytest.raises(LabelStudioAuthError, match="LABEL_STUDIO_API_KEY"):
        fetch_image("/data/upload/1/x.png", no_key, SETTINGS)


def test_local_files_and_presigned_cloud_storage(fake_ls, cloud):
    local, remote = png_bytes(seed=2), png_bytes(seed=3)
    fake_ls.files["/data/local-files/photos/cat.png"] = local
    assert fetch_image("/data/local-files/?d=photos/cat.png", legacy_client(fake_ls), SETTINGS) == local

    # s3:// goes to Label Studio's presign endpoint, which redirects to the storage host: that host is
    # not on the allow-list, but Label Studio sent us there, and our key must not follow.
    cloud.files["/raw/bucket-object"] = remote
    fake_ls.presign_target = f"{cloud.url}/raw/bucket-object"
    assert fetch_image("s3://bucket/cat.png", legacy_client(fake_ls), SETTINGS, task_id=7) == remote
    assert any(path.startswith("/tasks/7/presign/") for _, path, _ in fake_ls.requests)
    assert [auth for _, _, auth in cloud.requests] == [None]
    with pytest.raises(FetchError, match="task id"):
        fetch_image("gs://bucket/cat.png", legacy_client(fake_ls), SETTINGS)


# -- the allow-list -------------------------------------------------------------------------------------
def test_other_hosts_need_the_allow_list(fake_ls, cloud):
    cloud.files["/raw/x.png"] = png_bytes()
    url = f"{cloud.url}/raw/x.png"
    with pytest.raises(HostNotAllowedError, match="ALLOWED_IMAGE_HOSTS"):
        fetch_image(url, legacy_client(fake_ls), SETTINGS)
    with pytest.raises(HostNotAllowedError):
        fetch_image(url, None, SETTINGS)
    assert cloud.requests == []  # refused before connecting
    allowed = FetchSettings(max_bytes=1 << 20, timeout=5, allowed_hosts=(cloud.host,))
    assert fetch_image(url, legacy_client(fake_ls), allowed) == cloud.files["/raw/x.png"]
    # The Label Studio key is never sent to another host.
    assert [auth for _, _, auth in cloud.requests] == [None]


def test_redirects_from_non_label_studio_hosts_are_checked(fake_ls, cloud):
    cloud.files["/raw/x.png"] = png_bytes()
    allowed = FetchSettings(timeout=5, allowed_hosts=(cloud.host,))
    # an allowed host redirecting to Label Studio's host is fine ...
    fake_ls.files["/raw/y.png"] = png_bytes(seed=5)
    moved = f"{cloud.url}/redirect?to={fake_ls.url}/raw/y.png"
    assert fetch_image(moved, legacy_client(fake_ls), allowed) == fake_ls.files["/raw/y.png"]
    # ... but not to a host nobody allowed
    evil = f"http://127.0.0.2:{free_port()}/raw/secret"
    with pytest.raises(HostNotAllowedError):
        fetch_image(f"{cloud.url}/redirect?to={evil}", legacy_client(fake_ls), allowed)


def test_host_allowed_patterns():
    assert host_allowed("images.example.com", ("images.example.com",))
    assert host_allowed("images.example.com:8443", ("images.example.com",))
    assert not host_allowed("images.example.com:8443", ("images.example.com:443",))
    assert host_allowed("a.cdn.example.com", ("*.example.com",))
    assert host_allowed("a.cdn.example.com", (".example.com",))
    assert not host_allowed("example.com.evil.net", ("*.example.com",))
    assert host_allowed("anything", ("*",))
    assert not host_allowed("anything", ())
    assert FetchSettings.from_env({"ALLOWED_IMAGE_HOSTS": " A.com, b.com:81 ,"}).allowed_hosts == ("a.com", "b.com:81")


def test_verify_ssl_setting():
    assert FetchSettings.from_env({}).verify_ssl is True
    assert FetchSettings.from_env({"VERIFY_SSL": "False"}).verify_ssl is False
    with pytest.raises(ValueError, match="VERIFY_SSL='flase'"):
        FetchSettings.from_env({"VERIFY_SSL": "flase"})


# -- limits and failures --------------------------------------------------------------------------------
def test_byte_limit_is_enforced_while_streaming(fake_ls):
    allowed = FetchSettings(max_bytes=100_000, timeout=5, allowed_hosts=(fake_ls.host,))
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_BYTES"):
        fetch_image(f"{fake_ls.url}/big", None, allowed)
    with pytest.raises(ImageTooLargeError, match="1,000,000,000 bytes"):
        fetch_image(f"{fake_ls.url}/big-declared", None, allowed)


def test_unreachable_missing_and_unsupported_urls_give_clear_errors(fake_ls):
    closed = f"127.0.0.1:{free_port()}"
    allowed = FetchSettings(timeout=5, allowed_hosts=(closed,))
    with pytest.raises(FetchError, match="can't reach"):
        fetch_image(f"http://{closed}/x.png", None, allowed)
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_image("/data/upload/1/missing.png", legacy_client(fake_ls), SETTINGS)
    for url in ("/etc/passwd", "file:///etc/passwd", "ftp://host/x.png", ""):
        with pytest.raises(FetchError):
            fetch_image(url, legacy_client(fake_ls), SETTINGS)
    with pytest.raises(FetchError, match="LABEL_STUDIO_URL"):
        fetch_image("/data/upload/1/x.png", None, SETTINGS)


# -- credentials and redaction ----------------------------------------------------------------------------
def test_credentials_from_env():
    assert Credentials.from_env({}) is None
    creds = Credentials.from_env({"LABEL_STUDIO_URL": "http://ls:8080/", "LABEL_STUDIO_API_KEY": "k" * 40})
    assert (creds.url, creds.api_key) == ("http://ls:8080", "k" * 40)
    assert "k" * 40 not in repr(creds)
    legacy_names = Credentials.from_env({"LABEL_STUDIO_HOST": "http://h", "LABEL_STUDIO_ACCESS_TOKEN": "t" * 20})
    assert (legacy_names.url, legacy_names.api_key) == ("http://h", "t" * 20)
    with pytest.raises(ValueError, match="http"):
        Credentials.from_env({"LABEL_STUDIO_URL": "ls:8080"})
    registry = ClientRegistry()
    assert registry.get(creds) is registry.get(Credentials("http://ls:8080", "k" * 40))


def test_tokens_never_reach_the_logs(fake_ls, caplog):
    install_log_redaction()
    pat = fake_ls.issue_pat()
    fake_ls.files["/data/upload/1/x.png"] = png_bytes()
    with caplog.at_level(logging.DEBUG):
        client = LabelStudioClient(Credentials(fake_ls.url, pat))
        fetch_image("/data/upload/1/x.png", client, SETTINGS)
        access = client.download_token()
        logger = logging.getLogger("test.redaction")
        logger.info("setup body: %s", {"access_token": pat, "hostname": fake_ls.url})
        logger.warning("headers: Authorization: Bearer %s", access)
        logger.warning("legacy %s", LEGACY_TOKEN)  # not registered, but looks like a header value below
        logger.warning("Authorization: Token %s", LEGACY_TOKEN)
        try:
            raise RuntimeError(f"failed with {pat}")
        except RuntimeError:
            logger.exception("boom")
    text = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    assert pat not in text and access not in text
    assert f"Token {LEGACY_TOKEN}" not in text
    assert "Bearer ***" in text and "***" in text
    register_secret(LEGACY_TOKEN)
    assert LEGACY_TOKEN not in redact(f"legacy {LEGACY_TOKEN}")
    assert redact("token_scores and access rules") == "token_scores and access rules"
