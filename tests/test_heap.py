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


def _probe(mode: str, script: str = PROBE) -> dict:
    """``script`` run in a fresh interpreter (malloc settings are process-wide) with ``mode``; its JSON line."""
    run = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_large_blocks_stay_mapped_for_reuse():
    # Default glibc: a 200 MB block is its own mapping, returned to the OS when freed.
    assert _probe("off")["kept_mb"] < 50
    # Kept for reuse: the memory stays resident and the next block of that size is served from it.
    on = _probe("on")
    assert on["kept_mb"] > 150 and on["grown_mb"] < 20


BOUND_PROBE = r"""
import json, sys
import numpy as np
from backend.heap import FreedMemoryBound, resident_free_heap_bytes, reuse_freed_memory
MiB = 1 << 20
assert reuse_freed_memory()
bound = FreedMemoryBound(None if sys.argv[1] == "auto" else int(sys.argv[1]) * MiB)
block = np.ones(50_000_000, dtype=np.float32)  # 200 MB, written, then freed: kept for reuse
del block
before = resident_free_heap_bytes()
handed_back = bound.after_task()
print(json.dumps({"before_mb": before / MiB, "after_mb": resident_free_heap_bytes() / MiB,
                  "handed_back": handed_back, "limit_mb": bound.limit / MiB, "trims": bound.trims}))
"""


def _bound_probe(limit: str) -> dict:
    return _probe(limit, BOUND_PROBE)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_memory_over_the_bound_is_handed_back_after_a_task():
    # Over the limit: the kept 200 MB leave RAM (the pages, not the arena's addresses).
    small = _bound_probe("64")
    assert small["before_mb"] > 150
    assert small["handed_back"] and small["trims"] == 1 and small["after_mb"] < 64
    # Under it: kept for the next task.
    large = _bound_probe("1024")
    assert not large["handed_back"] and large["after_mb"] > 150


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_auto_bound_is_set_by_the_first_task_from_what_it_left_free():
    auto = _bound_probe("auto")
    assert not auto["handed_back"] and auto["after_mb"] > 150  # the first task's memory is what reuse is for
    assert auto["limit_mb"] == pytest.approx(2 * auto["before_mb"] + 64, abs=1)
