"""backend.weights against a real HTTP server on 127.0.0.1: download, resume, verify, readiness messages."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote

import pytest

from backend import weights, weights_download
from backend.config import _ENV_FIELDS, DINO_CHECKPOINTS, REPO_ROOT, SAM_CHECKPOINTS, TEXT_ENCODER_DIR, EngineConfig
from backend.weights import ChecksumError, DownloadError, MissingWeightsError


class FileServer:
    """Serves a folder with HTTP Range support, records requests, and can misbehave on purpose."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.drop_first_after: int | None = None  # first response: send this many bytes, then hang up
        self.ignore_range = False
        self.status: dict[str, int] = {}  # path -> forced HTTP status
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = unquote(self.path.split("?")[0]).lstrip("/")
                server.requests.append((path, self.headers.get("Range")))
                file = server.root / path
                if path in server.status:
                    self.send_error(server.status[path])
                    return
                if not file.is_file():
                    self.send_error(404)
                    return
                body = file.read_bytes()
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and not server.ignore_range:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if server.drop_first_after is not None:
                    cut, server.drop_first_after = server.drop_first_after, None
                    self.wfile.write(body[start:start + cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    srv = FileServer(root)
    yield srv
    srv.close()


@pytest.fixture
def clean_env(monkeypatch):
    """No engine-config or mirror variables from the outer environment."""
    for key in [*_ENV_FIELDS, "ENGINE_CONFIG", weights.BASE_URL_ENV]:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve(srv: FileServer, name: str, data: bytes) -> None:
    path = srv.root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def entry(srv: FileServer, name: str, data: bytes, sha256: str | None = "auto") -> weights.ManifestEntry:
    return weights.ManifestEntry(name, f"{srv.url}/{name}", sha(data) if sha256 == "auto" else sha256, len(data))


def official_lookalike(srv: FileServer, tmp_path: Path) -> Path:
    """A manifest with the real file names and variants, but small contents served by ``srv``."""
    real = json.loads(weights.MANIFEST_PATH.read_text())
    files = {}
    for i, name in enumerate(real["files"]):
        data = f"{name} #{i} ".encode() * 50
        serve(srv, name, data)
        files[name] = {"url": f"https://example.invalid/{name}", "sha256": sha(data), "size": len(data)}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"files": files, "variants": real["variants"]}))
    return path


# -- the real manifest -----------------------------------------------------------------------------
def test_real_manifest_is_well_formed_and_covers_every_variant():
    data = json.loads(weights.MANIFEST_PATH.read_text())
    for name, item in data["files"].items():
        assert item["url"].startswith("https://"), name
        assert isinstance(item["size"], int) and not isinstance(item["size"], bool) and item["size"] > 0, name
        assert item["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", item["sha256"]), name
        if "huggingface.co" in item["url"]:  # pinned to a commit, never a moving branch
            assert re.search(r"/resolve/[0-9a-f]{40}/", item["url"]), name
    manifest = weights.load_manifest()
    for variant, name in SAM_CHECKPOINTS.items():
        assert manifest.variants["sam"][variant] == [name]
        assert name in manifest.files
    for variant, name in DINO_CHECKPOINTS.items():
        assert manifest.variants["dino"][variant] == [name]
        assert name in manifest.files
    bert = manifest.variants["text_encoder"][TEXT_ENCODER_DIR]
    needed = {"config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}
    assert {Path(n).name for n in bert} == needed
    assert all(n.startswith(TEXT_ENCODER_DIR + "/") for n in bert)
    assert set(manifest.variants["sam"]) == set(SAM_CHECKPOINTS)
    assert set(manifest.variants["dino"]) == set(DINO_CHECKPOINTS)


def test_files_for_variants_brings_text_encoder_with_dino():
    manifest = weights.load_manifest()
    names = [e.name for e in manifest.files_for(sam=["vit_b"], dino=["swint_ogc"])]
    assert names[:2] == ["sam_vit_b_01ec64.pth", "groundingdino_swint_ogc.pth"]
    assert f"{TEXT_ENCODER_DIR}/model.safetensors" in names
    assert [e.name for e in manifest.files_for(sam=["vit_t"])] == ["mobile_sam.pt"]
    with pytest.raises(weights.WeightsError, match="unknown sam variant"):
        manifest.files_for(sam=["vit_x"])


def test_load_manifest_rejects_bad_hash(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"files": {"a.pth": {"url": "https://x/a.pth", "sha256": "abc", "size": 3}}}))
    with pytest.raises(weights.WeightsError, match="sha256"):
        weights.load_manifest(path)


# -- required files ---------------------------------------------------------------------------------
def test_required_files_official_and_custom(tmp_path):
    manifest = weights.load_manifest()
    req = weights.required_files(EngineConfig(cache_dir=tmp_path, sam_variant="vit_h", dino_variant="swinb"), manifest)
    names = [r.entry.name for r in req if r.entry]
    assert names[:2] == ["sam_vit_h_4b8939.pth", "groundingdino_swinb_cogcoor.pth"]
    assert len(names) == 7 and all(r.entry for r in req)
    assert [r.fetch for r in req[:3]] == ["--sam vit_h", "--dino swinb", "--dino swinb"]

    custom = EngineConfig(cache_dir=tmp_path, sam_checkpoint=str(tmp_path / "ft" / "mine.pth"),
                          dino_checkpoint="my_dino.pth", text_encoder="my-bert")
    req = weights.required_files(custom, manifest)
    assert [(r.path, r.entry) for r in req] == [
        (tmp_path / "ft" / "mine.pth", None), (tmp_path / "my_dino.pth", None),
        (tmp_path / "my-bert" / "config.json", None)]


def test_custom_checkpoints_must_exist_but_are_not_hashed(tmp_path, monkeypatch):
    manifest = weights.load_manifest()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text("{}")
    (tmp_path / "dino.pth").write_bytes(b"not a real checkpoint")
    config = EngineConfig(cache_dir=tmp_path, sam_checkpoint="finetuned_sam.pth", dino_checkpoint="dino.pth",
                          text_encoder="bert")
    problems = weights.check_ready(config, manifest)
    assert len(problems) == 1 and "finetuned_sam.pth" in problems[0] and "custom" in problems[0]
    with pytest.raises(MissingWeightsError) as err:
        weights.ensure_ready(config, manifest)
    assert err.value.command is None  # nothing the downloader could fetch
    (tmp_path / "finetuned_sam.pth").write_bytes(b"anything")
    monkeypatch.setattr(weights, "sha256_file", lambda p: pytest.fail(f"hashed custom file {p}"))
    assert weights.check_ready(config, manifest) == []
    weights.ensure_ready(config, manifest)


# -- missing / corrupt -> one clear error --------------------------------------------------------------
def test_missing_files_error_names_files_and_command(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(MissingWeightsError) as err:
        weights.ensure_ready(EngineConfig(cache_dir=cache))
    message = str(err.value)
    for name in ("sam_vit_b_01ec64.pth", "groundingdino_swint_ogc.pth", "bert-base-uncased/model.safetensors"):
        assert str(cache / name) in message
    command = f"python -m backend.weights download --sam vit_b --dino swint_ogc --cache-dir {cache}"
    assert err.value.command == command and command in message
    assert len(err.value.problems) == 7


def test_ready_then_corrupt_file_detected(tmp_path, server):
    manifest = weights.load_manifest(official_lookalike(server, tmp_path))
    cache = tmp_path / "cache"
    config = EngineConfig(cache_dir=cache, sam_variant="vit_t")
    weights_download.download(manifest.files_for(sam=["vit_t"], dino=["swint_ogc"]), cache, base_url=server.url,
                              progress=False)
    weights.ensure_ready(config, manifest)

    vocab = cache / "bert-base-uncased" / "vocab.txt"
    data = bytearray(vocab.read_bytes())
    data[0] ^= 1  # same size, one bit off
    vocab.write_bytes(bytes(data))
    os.utime(vocab, ns=(vocab.stat().st_atime_ns, vocab.stat().st_mtime_ns + 10**9))
    with pytest.raises(MissingWeightsError) as err:
        weights.ensure_ready(config, manifest)
    assert err.value.problems == [f"{vocab}: corrupt: sha256 {sha(bytes(data))}, expected "
                                  f"{manifest.files['bert-base-uncased/vocab.txt'].sha256} (text encoder)"]
    assert "download --dino swint_ogc" in str(err.value) and "--sam" not in err.value.command

    vocab.write_bytes(b"short")
    assert "corrupt or incomplete: 5 bytes" in weights.check_ready(config, manifest)[0]


# -- downloads -------------------------------------------------------------------------------------
def test_download_verifies_shows_progress_and_skips_verified(tmp_path, server, capsys):
    a, b = os.urandom(300_000), b"nested file"
    serve(server, "a.bin", a)
    serve(server, "enc/b.txt", b)
    entries = [entry(server, "a.bin", a), entry(server, "enc/b.txt", b)]
    cache = tmp_path / "cache"
    got = weights_download.download(entries, cache, retries=1)
    assert got == [cache / "a.bin", cache / "enc" / "b.txt"]
    assert (cache / "a.bin").read_bytes() == a and (cache / "enc" / "b.txt").read_bytes() == b
    assert not list(cache.rglob("*.part"))
    err = capsys.readouterr().err
    assert "a.bin" in err and "100%" in err
    assert weights.verify(cache / "a.bin", sha(a), len(a)) is None

    server.requests.clear()
    assert weights_download.download(entries, cache) == []
    assert server.requests == []  # already verified: nothing fetched


def test_checksum_mismatch_is_clear_and_leaves_no_file(tmp_path, server):
    data = b"these are not the weights you are looking for"
    serve(server, "w.pth", data)
    wrong = "0" * 64
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError) as err:
        weights_download.download([entry(server, "w.pth", data, sha256=wrong)], cache, progress=False)
    message = str(err.value)
    assert "w.pth" in message and wrong in message and sha(data) in message and "removed" in message
    assert list(cache.iterdir()) == []  # neither w.pth nor w.pth.part


def test_resumes_after_dropped_connection(tmp_path, server):
    data = os.urandom(200_000)
    serve(server, "big.pth", data)
    server.drop_first_after = 70_000
    cache = tmp_path / "cache"
    weights_download.download([entry(server, "big.pth", data)], cache, retries=3, backoff_s=0, progress=False)
    assert (cache / "big.pth").read_bytes() == data
    (first, first_range), (second, second_range) = server.requests
    assert first == second == "big.pth" and first_range is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second_range).group(1))
    assert 0 < resumed_at <= 70_000  # kept what arrived (up to the chunk being read when it broke)


def test_resumes_existing_part_and_restarts_when_server_ignores_range(tmp_path, server):
    data = os.urandom(50_000)
    serve(server, "m.pth", data)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "m.pth.part").write_bytes(data[:20_000])
    weights_download.download([entry(server, "m.pth", data)], cache, progress=False)
    assert (cache / "m.pth").read_bytes() == data
    assert server.requests[-1] == ("m.pth", "bytes=20000-")

    (cache / "m.pth").unlink()
    (cache / "m.pth.part").write_bytes(b"x" * 20_000)  # junk prefix; the server will send everything
    server.ignore_range = True
    weights_download.download([entry(server, "m.pth", data)], cache, progress=False)
    assert (cache / "m.pth").read_bytes() == data


def test_http_errors(tmp_path, server):
    data = b"abc"
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=r"HTTP 404 from http://127\.0\.0\.1:\d+/absent\.pth"):
        weights_download.download([entry(server, "absent.pth", data)], cache, retries=3, backoff_s=0, progress=False)
    assert len(server.requests) == 1  # a 404 is not retried

    serve(server, "flaky.pth", data)
    server.status["flaky.pth"] = 503
    with pytest.raises(DownloadError, match="after 2 tries"):
        weights_download.download([entry(server, "flaky.pth", data)], cache, retries=2, backoff_s=0, progress=False)
    assert len(server.requests) == 3


def test_unknown_hash_is_computed_reported_and_remembered(tmp_path, server):
    data = b"weights without a published hash"
    serve(server, "n.pth", data)
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match=sha(data)):
        weights_download.download([entry(server, "n.pth", data, sha256=None)], cache, progress=False)
    sidecar = json.loads((cache / weights.SIDECAR_NAME).read_text())
    assert sidecar["n.pth"]["sha256"] == sha(data)


def test_mirror_base_url_from_environment(tmp_path, server, monkeypatch):
    data = b"mirrored"
    serve(server, "sub/x.pth", data)
    item = weights.ManifestEntry("sub/x.pth", "https://unreachable.invalid/x.pth", sha(data), len(data))
    monkeypatch.setenv(weights.BASE_URL_ENV, server.url + "/")
    weights_download.download([item], tmp_path / "cache", progress=False)
    assert server.requests == [("sub/x.pth", None)]


# -- the sidecar cache -------------------------------------------------------------------------------
def test_sidecar_skips_rehash_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    data = os.urandom(4096)
    path.write_bytes(data)
    calls = []
    real = weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda p: calls.append(p) or real(p))

    assert weights.verify(path, sha(data), len(data)) is None
    assert weights.verify(path, sha(data), len(data)) is None
    assert len(calls) == 1  # second check read the sidecar

    changed = bytes([data[0] ^ 0xFF]) + data[1:]
    path.write_bytes(changed)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert weights.verify(path, sha(data), len(data)) == f"corrupt: sha256 {sha(changed)}, expected {sha(data)}"
    assert len(calls) == 2

    assert weights.verify(path, sha(data), len(data), use_cache=False) is not None
    assert len(calls) == 3


# -- command line --------------------------------------------------------------------------------------
def test_cli_download_then_check(tmp_path, server, clean_env, capsys):
    manifest = official_lookalike(server, tmp_path)
    cache = tmp_path / "cache"
    clean_env.setenv("MODEL_CACHE_DIR", str(cache))
    clean_env.setenv("SAM_VARIANT", "vit_l")
    assert weights.main(["--manifest", str(manifest), "check"]) == 1
    assert "download --sam vit_l --dino swint_ogc" in capsys.readouterr().err

    clean_env.setenv(weights.BASE_URL_ENV, server.url)
    assert weights.main(["--manifest", str(manifest), "download", "--no-progress"]) == 0
    fetched = [p for p in cache.rglob("*") if p.is_file() and p.name != weights.SIDECAR_NAME]
    assert sorted(p.relative_to(cache).as_posix() for p in fetched) == [
        "bert-base-uncased/config.json", "bert-base-uncased/model.safetensors", "bert-base-uncased/tokenizer.json",
        "bert-base-uncased/tokenizer_config.json", "bert-base-uncased/vocab.txt", "groundingdino_swint_ogc.pth",
        "sam_vit_l_0b3195.pth"]
    assert weights.main(["--manifest", str(manifest), "check"]) == 0
    assert weights.main(["--manifest", str(manifest), "check", "--sam", "vit_b", "--cache-dir", str(cache)]) == 1
    assert weights.main(["--manifest", str(manifest), "download", "--sam", "vit_b", "--cache-dir", str(cache),
                         "--no-progress"]) == 0
    assert weights.main(["--manifest", str(manifest), "check", "--sam", "vit_b", "--cache-dir", str(cache)]) == 0


def test_cli_module_entry_point_exit_code(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in _ENV_FIELDS and k != "ENGINE_CONFIG"}
    result = subprocess.run([sys.executable, "-m", "backend.weights", "check", "--sam", "vit_b", "--cache-dir",
                             str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "sam_vit_b_01ec64.pth: missing" in result.stderr
    assert f"python -m backend.weights download --sam vit_b --cache-dir {tmp_path}" in result.stderr
    listing = subprocess.run([sys.executable, "-m", "backend.weights", "list"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "groundingdino_swinb_cogcoor.pth" in listing.stdout


# -- offline ------------------------------------------------------------------------------------------
def test_force_offline_fixes_env_and_already_imported_libraries(monkeypatch):
    import huggingface_hub.constants as constants
    import transformers.utils.hub as hub

    for key in weights.OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_is_offline_mode", False)
    weights.force_offline()
    assert all(os.environ[k] == "1" for k in weights.OFFLINE_ENV)
    assert constants.HF_HUB_OFFLINE is True and hub.is_offline_mode() is True
    assert weights.offline_env() == weights.OFFLINE_ENV
