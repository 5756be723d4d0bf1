"""A bound on how much memory loading one file may take, checked while its pickle is read.

Every allocation a pickle can cause is bounded piece by piece (storages by
their records, views by their storages, calls by checked arguments), but the
opcodes themselves build Python objects: a million one-byte "empty set"
opcodes make a million sets, about 200 times the bytes they were read from.
:class:`MemoryBudget` watches the process's resident memory while the pickle
is consumed (the unpickler reads it in chunks of 128 KiB) and refuses the file
once loading it has grown memory past the budget: by default the larger of
:data:`MIN_BUDGET` and :data:`FILE_FACTOR` times the file's size. A real
checkpoint needs about its own size (its tensors) plus a few megabytes.

>>> budget = MemoryBudget(1 << 40)
>>> budget.check()  # nothing grew by a terabyte
"""
from __future__ import annotations

import os
import sys

__all__ = ["MemoryBudget", "MemoryBudgetExceeded", "MIN_BUDGET", "FILE_FACTOR", "default_budget"]

#: Loading any file may grow memory by this much (Python objects of the pickle, small tensors).
MIN_BUDGET = 512 << 20
#: ... or by this many times the file's size (its tensors are read once; mapped pages count too).
FILE_FACTOR = 3


def default_budget(file_size: int) -> int:
    return max(MIN_BUDGET, FILE_FACTOR * file_size)


class MemoryBudgetExceeded(Exception):
    """Loading grew the process's memory past the budget.

    (Not an ``UnpicklingError``: raised from the stream the unpickler reads, one
    would be reported by the C unpickler as "Ran out of input".)
    """


def _statm_reader():
    """Resident bytes now, from /proc (Linux); None where that is not available."""
    if not os.path.exists("/proc/self/statm"):
        return None
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:  # opened each time: /proc/self is resolved at open (a forked child is another self)
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            return int(os.read(fd, 128).split()[1]) * page
        finally:
            os.close(fd)

    return resident


def _peak_reader():
    """Peak resident bytes (getrusage): never decreases, so it can only make the check stricter late."""
    try:
        import resource
    except ImportError:
        return None
    scale = 1 if sys.platform == "darwin" else 1024
    return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


_reader = _statm_reader() or _peak_reader()


class MemoryBudget:
    """Refuses (:class:`MemoryBudgetExceeded`) once resident memory grew by more than ``limit`` bytes since creation."""

    def __init__(self, limit: int):
        self.limit = limit
        self._start = _reader() if _reader is not None else None

    def grown(self) -> int:
        return 0 if self._start is None else _reader() - self._start

    def check(self) -> None:
        if self._start is None:
            return
        grown = _reader() - self._start
        if grown > self.limit:
            raise MemoryBudgetExceeded(
                f"loading it took {grown:,} bytes of memory, more than its budget of {self.limit:,} "
                f"(the larger of {MIN_BUDGET >> 20} MiB and {FILE_FACTOR}x the file's size; a memory bomb?)")
