"""Process heap settings for CPU inference.

At 800 px every Grounding DINO encoder layer allocates and frees several 70-150 MB activations.
glibc serves blocks that large with a fresh ``mmap`` and unmaps them on free, so each one is
faulted in page by page again: on the VMs measured here that made a 256->2048->256 FFN over
17,821 tokens ~25% slower. Keeping freed memory in one arena for reuse removes those page faults;
the cost is that resident memory stays near the process's peak instead of shrinking between tasks.

Kept memory is also fragmented memory: tasks leave blocks of other sizes behind (cache entries,
prompts of another length), the next large activation no longer fits the holes and the arena grows,
a few MiB to a few tens of MiB at a time, under concurrent requests by a whole task's working set.
``FreedMemoryBound`` caps what is kept: after a task, once the arena holds more than its limit free,
the free pages go back to the system (the next task faults its working set in once).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading

import numpy as np

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_applied: bool | None = None
_lock = threading.Lock()
MiB = 1 << 20


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (<malloc.h>, glibc >= 2.33): every field a size_t."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def reuse_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory (no mmap per large block, no trimming, one arena).

    Idempotent and process-wide; returns False where the C library is not glibc (the setting is
    then simply not available, nothing else changes).
    """
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def freed_memory_is_reused() -> bool:
    """Whether ``reuse_freed_memory`` is in force in this process."""
    return bool(_applied)


def _apply() -> bool:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # One arena: request threads' large blocks otherwise land in per-thread arenas, whose heaps
    # are capped at 64 MB and fall back to mmap anyway.
    ok = all(mallopt(param, value) == 1 for param, value in
             ((M_ARENA_MAX, 1), (M_TRIM_THRESHOLD, 2**31 - 1), (M_MMAP_MAX, 0)))
    if ok:
        logger.info("malloc: freed memory is kept for reuse (no per-block mmap, no trimming)")
    return ok


def return_freed_memory() -> bool:
    """Hand the heap's free pages back to the system now (glibc ``malloc_trim(0)``), whatever
    ``reuse_freed_memory`` set: for memory freed for good (weights dropped after a conversion), not
    for the per-task buffers that are reused. Returns False where the C library is not glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def _mallinfo2() -> _MallInfo2 | None:
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.argtypes, mallinfo2.restype = [], _MallInfo2
    return mallinfo2()


def _heap_resident_bytes() -> int | None:
    """Resident bytes of the main arena's brk heap: its ``[heap]`` ranges in /proc/self/maps (several
    where the kernel split it), their pages counted with ``mincore`` (reading /proc/self/smaps instead
    takes ~50 ms in a process with torch and OpenVINO loaded)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
        with open("/proc/self/maps") as maps:
            ranges = [tuple(int(bound, 16) for bound in line.split(None, 1)[0].split("-"))
                      for line in maps if line.rstrip().endswith("[heap]")]
    except (OSError, AttributeError):
        return None
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    mincore.restype = ctypes.c_int
    page = mmap.PAGESIZE
    total = 0
    for start, end in ranges:
        pages = np.zeros((end - start + page - 1) // page, dtype=np.uint8)
        if mincore(start, end - start, pages.ctypes.data) != 0:
            return None
        total += int(np.count_nonzero(pages & 1)) * page
    return total


def resident_free_heap_bytes() -> int | None:
    """Freed memory the heap still holds in RAM: the main arena's resident bytes less those in use.

    With ``reuse_freed_memory`` every block lives in that one arena. glibc's own count of free bytes
    (``mallinfo2().fordblks``) would not do: it still counts pages ``return_freed_memory`` handed
    back. None where the C library or /proc does not tell (not glibc, not Linux)."""
    info = _mallinfo2()
    resident = _heap_resident_bytes()
    if info is None or resident is None:
        return None
    return max(0, resident - int(info.uordblks))


class FreedMemoryBound:
    """Keeps the freed memory that ``reuse_freed_memory`` holds under a limit (FREED_MEMORY_KEPT).

    Arguments:
      limit: freed bytes the heap may keep resident after a task; None (auto) sets it from the first task:
        twice what that task left free (its working set, the memory worth reusing) plus 64 MiB.
    """

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"FREED_MEMORY_KEPT must be >= 0 bytes, got {limit}")
        self.limit = limit
        self.trims = 0  # how many times the free memory was handed back
        self._lock = threading.Lock()

    def after_task(self) -> bool:
        """Hand the heap's free memory back if it keeps more than the limit resident; True when it did.

        Called when a task has dropped its activations. ~1 ms (``mallinfo2``, then the heap's page
        residency only when its free bytes exceed the limit); a no-op where the C library is not glibc."""
        info = _mallinfo2()
        if info is None or (self.limit is not None and info.fordblks <= self.limit):
            return False  # what is resident and free is at most what is free
        free = resident_free_heap_bytes()
        if free is None:
            return False
        with self._lock:
            if self.limit is None:
                self.limit = 2 * free + 64 * MiB
                logger.info("malloc: keeping up to %d MiB of freed memory for reuse (FREED_MEMORY_KEPT=auto)",
                            self.limit // MiB)
                return False
            if free <= self.limit:
                return False
            self.trims += 1
        logger.debug("malloc: %d MiB freed and resident in the heap, over the %d MiB kept: handing it back",
                     free // MiB, self.limit // MiB)
        return return_freed_memory()
