"""Model weights: the manifest of official files, checks before loading, offline mode, the command line
(the downloads themselves: ``backend.weights_download``).

    python -m backend.weights download [--sam vit_b] [--dino swint_ogc] [--all] [--cache-dir DIR]
    python -m backend.weights check    [--sam vit_b] [--dino swint_ogc] [--all] [--cache-dir DIR]
    python -m backend.weights list

Without --sam/--dino/--all, download and check act on what the engine configuration needs (ENGINE_CONFIG,
SAM_VARIANT, GROUNDING_DINO_VARIANT, MODEL_CACHE_DIR, ...). WEIGHTS_BASE_URL=<url> fetches every file from
<url>/<path in the cache> instead of its official address (a mirror for air-gapped sites).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DEFAULT_CACHE_DIR, DINO_CHECKPOINTS, REPO_ROOT, SAM_CHECKPOINTS, TEXT_ENCODER_DIR, EngineConfig

log = logging.getLogger(__name__)

MANIFEST_PATH = REPO_ROOT / "model_cache" / "manifest.json"
BASE_URL_ENV = "WEIGHTS_BASE_URL"
SIDECAR_NAME = ".verified.json"  # per folder: sha256 of files already hashed, keyed by name
CHUNK_BYTES = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# Set before transformers / huggingface_hub load anything, so a missing local file fails instead of
# silently reaching the hub.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


class WeightsError(RuntimeError):
    """A weights file could not be found, verified or fetched."""


class MissingWeightsError(WeightsError):
    """Files the engine needs are missing or corrupt; the message says which and how to fetch them."""

    def __init__(self, message: str, problems: Sequence[str], command: str | None) -> None:
        super().__init__(message)
        self.problems = list(problems)
        self.command = command


class ChecksumError(WeightsError):
    """A downloaded file's sha256 differs from the manifest (the file was removed)."""


class DownloadError(WeightsError):
    """A file could not be downloaded."""


# -- the manifest ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestEntry:
    name: str  # path relative to the cache folder, e.g. "bert-base-uncased/vocab.txt"
    url: str
    sha256: str | None  # None: no published hash; the downloader reports the one it computes
    size: int | None


@dataclass(frozen=True)
class Manifest:
    files: dict[str, ManifestEntry]
    variants: dict[str, dict[str, list[str]]]  # "sam" / "dino" / "text_encoder" -> variant -> names

    def files_for(self, sam: Iterable[str] = (), dino: Iterable[str] = ()) -> list[ManifestEntry]:
        """Files of the given variants; any Grounding DINO variant brings the BERT text encoder."""
        names: list[str] = []
        for group, chosen in (("sam", list(sam)), ("dino", list(dino))):
            for variant in chosen:
                if variant not in self.variants[group]:
                    raise WeightsError(f"unknown {group} variant {variant!r}; one of {sorted(self.variants[group])}")
                names += self.variants[group][variant]
        if list(dino):
            names += self.variants["text_encoder"][TEXT_ENCODER_DIR]
        return [self.files[name] for name in dict.fromkeys(names)]

    def all_files(self) -> list[ManifestEntry]:
        return list(self.files.values())


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    """Read and check ``model_cache/manifest.json`` (or ``path``)."""
    path = Path(path) if path else MANIFEST_PATH
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read weights manifest {path}: {exc}") from exc
    files: dict[str, ManifestEntry] = {}
    for name, item in data.get("files", {}).items():
        sha256, size, url = item.get("sha256"), item.get("size"), item.get("url")
        if not isinstance(url, str) or not url:
            raise WeightsError(f"manifest {path}: {name} has no url")
        if sha256 is not None and not (isinstance(sha256, str) and _SHA256_RE.match(sha256)):
            raise WeightsError(f"manifest {path}: {name} sha256 must be 64 lowercase hex digits or null")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise WeightsError(f"manifest {path}: {name} size must be a byte count or null")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise WeightsError(f"manifest {path}: {name} must be a path inside the cache folder")
        files[name] = ManifestEntry(name, url, sha256, size)
    variants = {group: dict(data.get("variants", {}).get(group, {})) for group in ("sam", "dino", "text_encoder")}
    for group, table in variants.items():
        for variant, names in table.items():
            unknown = [n for n in names if n not in files]
            if unknown:
                raise WeightsError(f"manifest {path}: {group} {variant} lists unknown files {unknown}")
    return Manifest(files, variants)


# -- what a configuration needs --------------------------------------------------------------
@dataclass(frozen=True)
class RequiredFile:
    path: Path
    role: str  # for messages, e.g. "SAM vit_b checkpoint"
    entry: ManifestEntry | None  # None: a custom file; it must exist but is not hash-checked
    fetch: str | None = None  # CLI arguments that download it, e.g. "--sam vit_b"

    @property
    def sha256(self) -> str | None:
        return self.entry.sha256 if self.entry else None

    @property
    def size(self) -> int | None:
        return self.entry.size if self.entry else None


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _official(path: Path, cache_dir: Path, manifest: Manifest) -> ManifestEntry | None:
    """The manifest entry when ``path`` is an official file's place in the cache, else None."""
    for name, entry in manifest.files.items():
        if _same_path(path, cache_dir / name):
            return entry
    return None


def required_files(config: EngineConfig, manifest: Manifest | None = None) -> list[RequiredFile]:
    """The checkpoints and text-encoder files ``config`` loads, official ones with their manifest entry."""
    manifest = manifest or load_manifest()
    cache = config.cache_dir
    sam_entry = _official(config.sam_checkpoint_path, cache, manifest)
    dino_entry = _official(config.dino_checkpoint_path, cache, manifest)
    required = [
        RequiredFile(config.sam_checkpoint_path, f"SAM {config.sam_variant} checkpoint", sam_entry,
                     _fetch_args(sam_entry, manifest)),
        RequiredFile(config.dino_checkpoint_path, f"Grounding DINO {config.dino_variant} checkpoint", dino_entry,
                     _fetch_args(dino_entry, manifest)),
    ]
    if config.dino_config:
        required.append(RequiredFile(config.dino_config_path, "Grounding DINO config (custom)", None))
    if _same_path(config.text_encoder_path, cache / TEXT_ENCODER_DIR):
        fetch = f"--dino {config.dino_variant}"  # BERT comes with every Grounding DINO download
        for name in manifest.variants["text_encoder"][TEXT_ENCODER_DIR]:
            required.append(RequiredFile(cache / name, "text encoder", manifest.files[name], fetch))
    else:
        required.append(RequiredFile(config.text_encoder_path / "config.json", "text encoder (custom folder)", None))
    return required


def _fetch_args(entry: ManifestEntry | None, manifest: Manifest) -> str | None:
    """The download arguments that bring ``entry`` ("--sam vit_b"), None for files outside the manifest."""
    for group in ("sam", "dino"):
        for variant, names in manifest.variants[group].items():
            if entry is not None and entry.name in names:
                return f"--{group} {variant}"
    return None


# -- verification ----------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (checkpoints are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(stat: os.stat_result) -> dict[str, int]:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _read_sidecar(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / SIDECAR_NAME).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remember_verified(path: Path, digest: str) -> None:
    """Record ``path``'s sha256 for its current size/mtime/inode; best effort (the cache may be read-only)."""
    data = _read_sidecar(path.parent)
    data[path.name] = dict(_stat_key(path.stat()), sha256=digest)
    tmp = path.parent / f"{SIDECAR_NAME}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path.parent / SIDECAR_NAME)
    except OSError as exc:
        log.debug("cannot write %s: %s", path.parent / SIDECAR_NAME, exc)
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path, use_cache: bool = True) -> str:
    """sha256 of ``path``, reused from the sidecar while the file's size, mtime and inode are unchanged."""
    key = _stat_key(path.stat())
    if use_cache:
        known = _read_sidecar(path.parent).get(path.name)
        if isinstance(known, dict) and all(known.get(k) == v for k, v in key.items()) and known.get("sha256"):
            return str(known["sha256"])
    if key["size"] > 100 * 2**20:
        log.info("verifying %s (%.1f GB, once)", path, key["size"] / 1e9)
    digest = sha256_file(path)
    if use_cache:
        remember_verified(path, digest)
    return digest


def verify(path: Path, sha256: str | None = None, size: int | None = None, use_cache: bool = True) -> str | None:
    """None when ``path`` is a file of the expected size and sha256 (each checked when given); else the problem."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_file():
        return "not a file"
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        # Cheap and catches the common case (interrupted copy) without hashing gigabytes.
        return f"corrupt or incomplete: {actual_size} bytes, expected {size}"
    if sha256 is None:
        return None
    try:
        digest = file_sha256(path, use_cache)
    except OSError as exc:
        return f"unreadable: {exc}"
    if digest != sha256:
        return f"corrupt: sha256 {digest}, expected {sha256}"
    return None


def check_ready(config: EngineConfig, manifest: Manifest | None = None) -> list[str]:
    """Problems with the files ``config`` needs, one line each; an empty list means ready."""
    return [f"{req.path}: {problem} ({req.role})" for req, problem in _problems(config, manifest)]


def _problems(config: EngineConfig, manifest: Manifest | None) -> list[tuple[RequiredFile, str]]:
    found = []
    for req in required_files(config, manifest):
        problem = verify(req.path, req.sha256, req.size)
        if problem:
            if req.entry is None and problem == "missing":
                problem = "missing (custom file, not in the manifest: check the path in the engine config)"
            found.append((req, problem))
    return found


def ensure_ready(config: EngineConfig, manifest: Manifest | None = None) -> None:
    """Raise MissingWeightsError naming every missing/corrupt file and the command that fetches them."""
    found = _problems(config, manifest)
    if not found:
        return
    problems = [f"{req.path}: {problem} ({req.role})" for req, problem in found]
    fetch = list(dict.fromkeys(req.fetch for req, _ in found if req.fetch))
    command = None
    lines = [f"Model weights are not ready (model cache {config.cache_dir}):"]
    lines += [f"  - {p}" for p in problems]
    if fetch:
        command = download_command(fetch, config.cache_dir)
        lines += ["Download and verify them with:", f"  {command}",
                  f"(without internet: set {BASE_URL_ENV} to a mirror holding the same file names, "
                  "or copy the files there; model_cache/manifest.json lists URLs and sha256)"]
    raise MissingWeightsError("\n".join(lines), problems, command)


def download_command(fetch_args: Iterable[str], cache_dir: Path) -> str:
    command = " ".join(["python -m backend.weights download", *fetch_args])
    if not _same_path(cache_dir, DEFAULT_CACHE_DIR):
        command += f" --cache-dir {cache_dir}"
    return command


# -- offline mode ----------------------------------------------------------------------------
def offline_env() -> dict[str, str]:
    """Environment variables that keep transformers / huggingface_hub off the network (for subprocesses)."""
    return dict(OFFLINE_ENV)


def force_offline() -> None:
    """Make transformers / huggingface_hub use local files only; call before building models."""
    os.environ.update(OFFLINE_ENV)
    # Both libraries read the variables once, at import; fix the copies of any already imported.
    # (Set through the module's namespace: module objects are typed read-only for unknown names.)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        vars(constants)["HF_HUB_OFFLINE"] = True
    hub = sys.modules.get("transformers.utils.hub")
    if hub is not None and hasattr(hub, "_is_offline_mode"):
        vars(hub)["_is_offline_mode"] = True


# -- command line ----------------------------------------------------------------------------
def _selected(args: argparse.Namespace, manifest: Manifest) -> list[ManifestEntry] | None:
    if args.all:
        return manifest.all_files()
    if args.sam or args.dino:
        return manifest.files_for(args.sam or (), args.dino or ())
    return None  # what the engine configuration needs


def _config(args: argparse.Namespace) -> EngineConfig:
    config = EngineConfig.from_env()
    return config.replace(cache_dir=args.cache_dir) if args.cache_dir else config


def _cache_dir(args: argparse.Namespace) -> Path:
    return args.cache_dir or EngineConfig.from_env().cache_dir


def _human(size: int | None) -> str:
    if size is None:
        return "?"
    return f"{size / 1e6:,.1f} MB" if size >= 100_000 else f"{size / 1e3:,.1f} kB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("download", "download and verify model files"), ("check", "verify model files")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--sam", action="append", choices=sorted(SAM_CHECKPOINTS), help="SAM variant (repeatable)")
        sub.add_argument("--dino", action="append", choices=sorted(DINO_CHECKPOINTS),
                         help="Grounding DINO variant (repeatable; brings the BERT text encoder)")
        sub.add_argument("--all", action="store_true", help="every file in the manifest")
        sub.add_argument("--cache-dir", type=Path, help="model cache folder (default: MODEL_CACHE_DIR or model_cache/)")
        if name == "download":
            sub.add_argument("--base-url", help=f"mirror to fetch <url>/<file> from (default: ${BASE_URL_ENV})")
            sub.add_argument("--retries", type=int, default=3)
            sub.add_argument("--no-progress", action="store_true")
    commands.add_parser("list", help="list the manifest's files, variants, sizes and URLs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = load_manifest(args.manifest)

    if args.command == "list":
        for group, table in manifest.variants.items():
            for variant, names in table.items():
                total = sum(manifest.files[n].size or 0 for n in names)
                print(f"{group:12} {variant:18} {_human(total):>12}  {', '.join(names)}")
        for entry in manifest.all_files():
            print(f"{entry.name:40} {_human(entry.size):>12}  {entry.sha256 or 'sha256 unknown':64}  {entry.url}")
        return 0

    selected = _selected(args, manifest)
    try:
        if args.command == "download":
            cache_dir = _cache_dir(args)
            entries = selected if selected is not None else [
                r.entry for r in required_files(_config(args), manifest) if r.entry]
            from .weights_download import download

            got = download(list(dict.fromkeys(entries)), cache_dir, base_url=args.base_url, retries=args.retries,
                           progress=not args.no_progress)
            print(f"{len(got)} file(s) downloaded, {len(entries) - len(got)} already present, into {cache_dir}")
            if selected is not None:
                return 0
        if selected is not None:  # check of explicit variants
            cache_dir = _cache_dir(args)
            problems = [f"{cache_dir / e.name}: {p}" for e in selected
                        if (p := verify(cache_dir / e.name, e.sha256, e.size))]
            if problems:
                fetch = [f"--sam {v}" for v in args.sam or ()] + [f"--dino {v}" for v in args.dino or ()]
                print("\n".join(["Not ready:", *problems, "Fetch with:",
                                 "  " + download_command(fetch or ["--all"], cache_dir)]), file=sys.stderr)
                return 1
        else:
            ensure_ready(_config(args), manifest)
    except MissingWeightsError as exc:
        print(exc, file=sys.stderr)
        return 1
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
