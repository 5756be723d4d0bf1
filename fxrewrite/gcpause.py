"""Pausing Python's cyclic garbage collector while a whole graph is built or rewritten.

Tracing, rewriting and re-binding create several objects per node (fx nodes, their
argument tuples, metadata, module copies) and keep nearly all of them alive until the
step returns. Each of the collector's full passes walks *every* live object, so on a
graph of 100,000 nodes the collector, not the work, dominates, and the time per node
grows with the graph (measured: 10x the nodes cost 15-33x the time). Paused for the
call, the work stays linear; the few cycles a step leaves behind (erased nodes) are
collected at the collector's next pass after it.

``paused()`` is the same as a ``with`` block (a copy, an unpickling).

>>> import gc
>>> with paused():
...     gc.isenabled()
False
>>> @gc_paused
... def enabled_inside():
...     return gc.isenabled()
>>> enabled_inside(), gc.isenabled()
(False, True)
"""
from __future__ import annotations

import contextlib
import functools
import gc
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic garbage collection inside; the collector is re-enabled after (also on an exception)
    if it was enabled before, so nested pauses leave it to the outermost."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def gc_paused(fn: F) -> F:
    """Decorator: run ``fn`` inside :func:`paused`."""

    @functools.wraps(fn)
    def run_paused(*args, **kwargs):
        with paused():
            return fn(*args, **kwargs)

    return run_paused  # type: ignore[return-value]


__all__ = ["paused", "gc_paused"]
