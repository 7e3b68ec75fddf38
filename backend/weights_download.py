"""Verified, resumable downloads of the manifest's weights files (``python -m backend.weights download``).

Each file streams into ``<name>.part``, resumes with an HTTP Range after a dropped connection, is checked
against the manifest's size and sha256 and only then renamed into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .weights import (
    BASE_URL_ENV,
    CHUNK_BYTES,
    ChecksumError,
    DownloadError,
    ManifestEntry,
    remember_verified,
    sha256_file,
    verify,
)

if TYPE_CHECKING:  # requests is imported where it is used: only downloads need it
    import requests

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"
NET_CHUNK_BYTES = 1 << 16  # a dropped connection loses at most the chunk being read


class _Retry(Exception):
    """A transient failure: try again (resuming from the .part file)."""


def download(entries: Iterable[ManifestEntry], cache_dir: Path, *, base_url: str | None = None,
             retries: int = 3, backoff_s: float = 2.0, timeout_s: float = 60.0, progress: bool = True,
             session: requests.Session | None = None) -> list[Path]:
    """Fetch every entry not already verified into ``cache_dir``; returns the paths downloaded.

    Each file streams into ``<name>.part`` (resumed with an HTTP Range after a dropped connection), is
    checked against the manifest's size and sha256, and only then renamed into place.
    """
    import requests

    base_url = base_url if base_url is not None else os.environ.get(BASE_URL_ENV) or None
    session = session or requests.Session()
    done = []
    for entry in entries:
        dest = Path(cache_dir) / entry.name
        if verify(dest, entry.sha256, entry.size) is None:
            log.info("ok %s (already verified)", entry.name)
            continue
        url = f"{base_url.rstrip('/')}/{entry.name}" if base_url else entry.url
        _download_one(entry, dest, url, session, retries, backoff_s, timeout_s, progress)
        done.append(dest)
    return done


def _download_one(entry: ManifestEntry, dest: Path, url: str, session: requests.Session, retries: int,
                  backoff_s: float, timeout_s: float, progress: bool) -> None:
    import requests

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    for attempt in range(1, retries + 1):
        try:
            digest = _fetch(entry, part, url, session, timeout_s, progress)
            break
        except (_Retry, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            if attempt == retries:
                resume = f"; run the command again to resume from {part}" if part.exists() else ""
                raise DownloadError(f"could not download {entry.name} from {url} after {retries} tries: {exc}"
                                    f"{resume}") from exc
            log.warning("download of %s interrupted (%s); retrying (%d/%d)", entry.name, exc, attempt, retries - 1)
            time.sleep(backoff_s * 2 ** (attempt - 1))
    size = part.stat().st_size
    if entry.size is not None and size != entry.size:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{entry.name}: downloaded {size} bytes from {url}, the manifest expects {entry.size}; "
                            "the file was removed")
    if entry.sha256 is not None and digest != entry.sha256:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"{entry.name}: checksum mismatch, downloaded file has sha256 {digest} but the manifest expects "
            f"{entry.sha256}; the file was removed. {url} served a different or damaged file "
            f"(check {BASE_URL_ENV} / your proxy) - run the command again.")
    os.replace(part, dest)
    remember_verified(dest, digest)
    if entry.sha256 is None:
        message = (f"{entry.name} has no published sha256 in the manifest, so it could not be verified; "
                   f"downloaded sha256 is {digest} ({size} bytes). Compare it with a trusted source and add it "
                   "to model_cache/manifest.json.")
        log.warning(message)
        warnings.warn(message, stacklevel=3)


def _fetch(entry: ManifestEntry, part: Path, url: str, session: requests.Session, timeout_s: float,
           progress: bool) -> str:
    """Append the rest of ``url`` to ``part``; returns the sha256 of the whole part file."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    if entry.size is not None and have > entry.size:
        part.unlink()
        have = 0
    if entry.size is not None and have == entry.size:
        return sha256_file(part)  # complete from an earlier run; only the checks were left
    headers = {"Range": f"bytes={have}-"} if have else {}
    with session.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
        if response.status_code == 416:  # our range is past the server's file: start over
            part.unlink(missing_ok=True)
            raise _Retry("server refused to resume (HTTP 416)")
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retry(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise DownloadError(f"cannot download {entry.name}: HTTP {response.status_code} from {url}")
        if have and response.status_code != 206:
            have = 0  # the server ignored the Range header and sends the whole file
        digest = hashlib.sha256()
        if have:
            with open(part, "rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    digest.update(chunk)
        length = response.headers.get("Content-Length")
        total = entry.size if entry.size is not None else (have + int(length) if length else None)
        with open(part, "ab" if have else "wb") as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.name,
            disable=not progress, file=sys.stderr,
        ) as bar:
            for chunk in response.iter_content(NET_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if entry.size is not None and part.stat().st_size < entry.size:
        raise _Retry(f"connection closed after {part.stat().st_size} of {entry.size} bytes")
    return digest.hexdigest()
