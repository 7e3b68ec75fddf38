"""Label Studio's key and the path check, beyond the single-request cases of test_fetch_guard.py: what a
refusal names, file names that must still pass, and redirects from Label Studio with every status,
back to itself (the key stays on media routes) or to another origin (no key at all).
"""

from __future__ import annotations

import pytest

from backend.fetch import URLNotAllowedError, fetch_image
from backend.fetch_guard import key_path_refusal
from tests.test_fetch import FakeLabelStudio, png_bytes
from tests.test_fetch_guard import client_for, settings


@pytest.fixture(scope="module")
def _servers():
    with FakeLabelStudio() as ls, FakeLabelStudio() as unlisted:
        ls.files["/raw/x.png"] = unlisted.files["/raw/x.png"] = png_bytes()
        yield ls, unlisted


@pytest.fixture
def ls(_servers):
    _servers[0].requests.clear()
    return _servers[0]


@pytest.fixture
def unlisted(_servers):
    _servers[1].requests.clear()
    return _servers[1]


@pytest.mark.parametrize("path, query, reason", [
    ("/data/upload/..／x", None, "climbs out"),
    ("/data/upload/%c0%ae%c0%ae/x", None, "aren't UTF-8"),
    ("/data/local-files/", "d=%c0%ae%c0%ae/x", "aren't UTF-8"),
    ("/data/upload/..%00/x", None, "control characters"),
    ("/storage-data/uploaded/", "filepath=upload/1/x%0a.png", "control characters"),
])
def test_key_path_refusals_name_what_was_wrong(path, query, reason):
    assert reason in (key_path_refusal(path, query) or "")


def test_key_paths_with_non_ascii_file_names_are_still_allowed():
    for path in ("/data/upload/1/ｃａｔ.png", "/data/upload/1/%E7%8C%AB.png", "/data/upload/1/a%252520b.png"):
        assert key_path_refusal(path, None) is None


REDIRECT_STATUSES = [301, 302, 303, 307, 308]


@pytest.mark.parametrize("status", REDIRECT_STATUSES)
@pytest.mark.parametrize("target", [
    "../../../api/current-user/token",  # relative to /tasks/7/presign/
    "/api/current-user/token",
    "{ls}/api/current-user/token",
    "/data/upload/%2e%2e/%2e%2e/api/current-user/token",
    "/data/upload/..%EF%BC%8F..%EF%BC%8Fapi/current-user/token",  # full-width solidus (a header is latin-1)
    "/data/upload/%c0%ae%c0%ae/%c0%ae%c0%ae/api/current-user/token",
])
def test_label_studio_redirecting_to_itself_keeps_the_key_on_media_routes(status, target, ls, monkeypatch):
    monkeypatch.setattr(ls, "presign_target", target.format(ls=ls.url))
    monkeypatch.setattr(ls, "presign_status", status)
    with pytest.raises(URLNotAllowedError, match="refusing to send the Label Studio API key"):
        fetch_image("s3://bucket/x.png", client_for(ls), settings(), task_id=7)
    assert not any("current-user" in path for _, path, _ in ls.requests)


@pytest.mark.parametrize("status", REDIRECT_STATUSES)
@pytest.mark.parametrize("target", ["{unlisted}/raw/x.png", "http://localhost:{ls_port}/raw/x.png"])
def test_label_studio_redirecting_elsewhere_sends_no_key(status, target, ls, unlisted, monkeypatch):
    """A presigned hop to another origin (another host, or Label Studio's own server under another
    name) goes without the key, whatever the redirect's status."""
    monkeypatch.setattr(ls, "presign_target", target.format(unlisted=unlisted.url, ls_port=ls.host.rsplit(":", 1)[1]))
    monkeypatch.setattr(ls, "presign_status", status)
    assert fetch_image("s3://bucket/x.png", client_for(ls), settings(), task_id=7)
    hops = [auth for server in (ls, unlisted) for _, path, auth in server.requests if path.startswith("/raw/")]
    assert hops == [None]
