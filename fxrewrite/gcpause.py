"""Pausing Python's cyclic garbage collector while a whole graph is built or rewritten.

Tracing, rewriting and re-binding create several objects per node (fx nodes, their
argument tuples, metadata, module copies) and keep nearly all of them alive until the
step returns. Each of the collector's full passes walks *every* live object, so on a
graph of 100,000 nodes the collector, not the work, dominates, and the time per node
grows with the graph (measured: 10x the nodes cost 15-33x the time). Paused for the
call, the work stays linear; the few cycles a step leaves behind (erased nodes) are
collected at the collector's next pass after it.

>>> import gc
>>> @gc_paused
... def enabled_inside():
...     return gc.isenabled()
>>> enabled_inside(), gc.isenabled()
(False, True)
"""
from __future__ import annotations

import functools
import gc
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def gc_paused(fn: F) -> F:
    """Run ``fn`` with the cyclic garbage collector disabled (if it was enabled), re-enabling it after,
    also when ``fn`` raises. Nested calls leave it to the outermost."""

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return paused  # type: ignore[return-value]


__all__ = ["gc_paused"]
