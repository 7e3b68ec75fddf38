"""backend.heap: freed large blocks are reused instead of being mapped and faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, os, sys
import numpy as np
if sys.argv[1] == "on":
    from backend.heap import reuse_freed_memory
    assert reuse_freed_memory() and reuse_freed_memory()
def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
before = resident_mb()
block = np.ones(50_000_000, dtype=np.float32)  # 200 MB, written
del block
after_free = resident_mb()
again = np.ones(50_000_000, dtype=np.float32)  # served from the kept memory: no growth
print(json.dumps({"kept_mb": after_free - before, "grown_mb": resident_mb() - after_free}))
"""


def _probe(mode: str) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_large_blocks_stay_mapped_for_reuse():
    # Default glibc: a 200 MB block is its own mapping, returned to the OS when freed.
    assert _probe("off")["kept_mb"] < 50
    # Kept for reuse: the memory stays resident and the next block of that size is served from it.
    on = _probe("on")
    assert on["kept_mb"] > 150 and on["grown_mb"] < 20
