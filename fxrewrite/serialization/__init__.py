"""Loading ``torch.save`` files without running code from them, at the speed of plain ``torch.load``.

A torch checkpoint is a zip whose ``data.pkl`` is a pickle: unpickling it can
call anything it names. :func:`load` reads it with guarantees that plain
``torch.load`` (and even ``torch.load(weights_only=True)``) does not give:

* **nothing runs that the caller did not allow**: every global the pickle names
  must be in an :class:`AllowList` (data: dotted name -> class, checked
  function or value); layer classes are rebuilt from their saved state and can
  never be *called* from the file; ``getattr`` reaches only the methods the
  list names (:mod:`.allowlist`, :mod:`.standard`);
* **the tensors are the file's bytes**: every record's size, compression and
  CRC-32 are checked before a tensor is built on it, duplicated or overlapping
  records are refused, and a damaged record is reported with the tensor that
  uses it (:mod:`.archive`);
* **a small file cannot take much memory**: constructor calls are refused,
  tensor views must stay inside their storage without repeating it, views
  together cover at most twice the file's tensor bytes, and loading may grow
  memory by at most the larger of 512 MiB and 3x the file's size (:mod:`.memory`);
* **what comes back is data**: no callables, no hooks, no layer attribute that
  overrides a method, nesting bounded (no RecursionError later), every layer
  child a layer (:mod:`.graph`).

It uses the C unpickler (:mod:`.unpickler`), so a model loads about as fast as
with plain ``torch.load(weights_only=False)`` (and cyclic garbage collection is
paused meanwhile: nothing it builds is garbage).

Nothing here knows about YOLO: the YOLOv9 plug-in passes its classes in its
allow-list (:func:`fxrewrite.yolov9.classes.checkpoint_allow_list`).

>>> import os, tempfile, torch
>>> from torch import nn
>>> path = os.path.join(tempfile.mkdtemp(), "conv.pt")
>>> torch.save({"model": nn.Conv2d(1, 2, 1), "epoch": 3}, path)
>>> allow = AllowList({**standard_globals(), "torch.nn.modules.conv.Conv2d": nn.Conv2d}, what="a test file")
>>> loaded = load(path, allow)
>>> type(loaded["model"]).__name__, loaded["model"].weight.shape, loaded["epoch"]
('Conv2d', torch.Size([2, 1, 1, 1]), 3)
>>> load(path, AllowList(standard_globals(), what="a test file"))
Traceback (most recent call last):
...
fxrewrite.serialization.errors.RefusedGlobal: ...: refused to load: the pickle references torch.nn.modules.conv.Conv2d, which is not allowed in a test file; nothing from the file was executed
"""
from __future__ import annotations

import os
from typing import Any, Union

from ..gcpause import paused
from .allowlist import AllowList, Checked, Deferred, Inert, Refused
from .archive import DEFAULT_MAX_PICKLE_BYTES, Record, RecordProblem, TorchArchive
from .errors import LoadError, RefusedGlobal
from .graph import check_loaded
from .memory import MemoryBudget, MemoryBudgetExceeded, default_budget
from .scan import pickle_globals
from .standard import standard_globals
from .unpickler import GlobalNotAllowed, Loader

__all__ = ["load", "AllowList", "Checked", "Inert", "Deferred", "Refused", "LoadError", "RefusedGlobal",
           "TorchArchive", "Record", "RecordProblem", "standard_globals", "pickle_globals", "MemoryBudget"]

PathLike = Union[str, "os.PathLike[str]"]


def load(path: PathLike, allow: AllowList, *, mmap: bool = False, shown: str | None = None,
         max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES, memory_budget: int | None = None) -> Any:
    """Load a ``torch.save`` file with the guarantees above; tensors stay on the CPU, as stored.

    ``allow`` says which names the pickle may use. ``mmap=True`` maps tensor data
    copy-on-write from the file instead of reading it (the file must not be
    changed in place while the tensors are used; replacing it is fine).
    ``shown`` names the file in messages (default: ``path`` as given);
    ``memory_budget`` overrides how much loading may grow memory (bytes).
    Raises :class:`LoadError` (:class:`RefusedGlobal` for a name that is not
    allowed) naming the file and the problem; nothing from the file was executed.
    """
    shown = os.fspath(path) if shown is None else shown
    with TorchArchive(path, shown=shown, mmap=mmap, max_pickle_bytes=max_pickle_bytes) as archive:
        data = archive.pickle_bytes()
        budget = MemoryBudget(default_budget(archive.size) if memory_budget is None else memory_budget)
        loader = Loader(archive, allow)
        try:
            with paused():
                obj = loader.unpickle(data, budget)
        except GlobalNotAllowed as exc:
            raise RefusedGlobal(f"{shown}: refused to load: the pickle references {exc.name}, which is not allowed "
                                f"in {allow.what}; nothing from the file was executed", exc.name, data) from None
        except (Refused, MemoryBudgetExceeded) as exc:
            raise LoadError(f"{shown}: refused to load: {exc}; nothing from the file was executed") from None
        except Exception as exc:  # noqa: BLE001 - whatever a malformed opcode stream provokes; nothing ran
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise LoadError(f"{shown}: corrupt or malformed pickle in data.pkl ({type(exc).__name__}"
                            f"{': ' + first if first else ''}); nothing from the file was executed") from None
    with paused():  # walking what was built: nothing is garbage
        check_loaded(obj, loader, shown)
    return obj
