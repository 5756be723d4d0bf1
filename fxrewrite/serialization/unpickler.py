"""Unpickling ``data.pkl`` at C speed, restricted to an allow-list.

:class:`Loader` runs the C ``pickle.Unpickler`` (the one plain ``torch.load``
uses; torch's ``weights_only`` unpickler is a pure-Python re-implementation and
several times slower) with two hooks:

* ``find_class`` hands out only what the :class:`~fxrewrite.serialization.allowlist.AllowList`
  holds: guard types for layer classes, bound :class:`~fxrewrite.serialization.allowlist.Checked`
  functions, inert values. Any other name raises :class:`GlobalNotAllowed`
  before anything is imported or called. Nothing else in a pickle can reach a
  callable: opcodes only call what ``find_class`` returned (``REDUCE``, ``NEWOBJ``,
  ``OBJ``, ``INST``) or a ``__setstate__`` of an object built that way, and the
  objects handed out refuse ``BUILD``.
* ``persistent_load`` turns a ``('storage', type, key, location, size)`` reference
  into the checked bytes of record ``data/<key>``: the record must hold exactly
  ``size`` elements, be stored or deflated, and pass its CRC-32
  (:meth:`~fxrewrite.serialization.archive.TorchArchive.storage`). A record that
  fails becomes a :class:`~fxrewrite.serialization.standard.BadStorage`: loading
  goes on so the refusal can name the tensor that uses it, and no tensor is
  ever built on its bytes.

The pickle is fed to the unpickler through a stream that checks the memory
budget (:mod:`fxrewrite.serialization.memory`) every chunk.
"""
from __future__ import annotations

import pickle
from typing import Any

import torch

from .allowlist import AllowList, Checked, Inert, Refused
from .archive import RecordProblem, TorchArchive
from .memory import MemoryBudget
from .scan import python3_name
from .standard import BadStorage, LoadedStorage, StorageType

__all__ = ["Loader", "GlobalNotAllowed"]

_PREFETCH = 1 << 17  # what the C unpickler asks peek() for


class GlobalNotAllowed(Refused):
    """The pickle names a global the allow-list does not hold."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _BudgetedStream:
    """The pickle's bytes as a file, checking the memory budget each time the unpickler takes a chunk."""

    def __init__(self, data: bytes, budget: MemoryBudget):
        self._data, self._view, self._pos, self._budget = data, memoryview(data), 0, budget

    def peek(self, n: int = 1) -> memoryview:
        self._budget.check()
        return self._view[self._pos: self._pos + max(n, 1)]

    def read(self, n: int = -1) -> memoryview:
        end = len(self._data) if n is None or n < 0 else self._pos + n
        if end - self._pos >= _PREFETCH:
            self._budget.check()
        chunk = self._view[self._pos: end]
        self._pos += len(chunk)
        return chunk

    def readinto(self, buffer) -> int:
        chunk = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(chunk)] = chunk
        return len(chunk)

    def readline(self) -> memoryview:
        end = self._data.find(b"\n", self._pos)
        return self.read((len(self._data) if end < 0 else end + 1) - self._pos)


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream: _BudgetedStream, loader: "Loader"):
        super().__init__(stream)
        self._loader = loader

    def find_class(self, module: str, name: str) -> Any:
        return self._loader.find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return self._loader.persistent_load(pid)


class Loader:
    """One load of one archive: hands out allowed globals and checked storages, and remembers what it built."""

    def __init__(self, archive: TorchArchive, allow: AllowList):
        self.archive = archive
        self.allow = allow
        self.storages: dict[str, LoadedStorage | BadStorage] = {}
        self.storage_bytes = 0
        #: tensors and parameters made (and checked) by the rebuild functions, by id (kept alive while loading)
        self.built: dict[int, torch.Tensor] = {}
        #: storage records that failed their checks
        self.problems: list[RecordProblem] = []
        self._handed_out: dict[str, Any] = {}

    def unpickle(self, data: bytes, budget: MemoryBudget) -> Any:
        return _Unpickler(_BudgetedStream(data, budget), self).load()

    def find_class(self, module: Any, name: Any) -> Any:
        if type(module) is not str or type(name) is not str:
            raise Refused("a global's module and name must be text")
        dotted = python3_name(module, name)
        found = self._handed_out.get(dotted)
        if found is not None:
            return found
        entry = self.allow.entry(dotted)
        if entry is None:
            raise GlobalNotAllowed(dotted)
        if isinstance(entry, Checked):
            found = entry.bind(self)
        elif isinstance(entry, Inert):
            found = entry.value
        else:
            found = self.allow.guard(dotted)
        self._handed_out[dotted] = found
        return found

    def persistent_load(self, pid: Any) -> LoadedStorage | BadStorage:
        if type(pid) is not tuple or len(pid) != 5:
            raise Refused(f"a persistent reference must be ('storage', type, key, location, size), got a "
                          f"{type(pid).__name__}")
        kind, storage_type, key, location, numel = (v.decode("ascii", "replace") if type(v) is bytes else v
                                                    for v in pid)
        if kind != "storage" or type(storage_type) is not StorageType or type(key) is not str \
                or type(location) is not str or type(numel) is not int or numel < 0:
            raise Refused(f"a persistent reference must be ('storage', type, key, location, size), got "
                          f"({', '.join(type(v).__name__ for v in pid)})")
        dtype = storage_type.dtype
        known = self.storages.get(key)
        if known is not None:
            if type(known) is LoadedStorage and (known.dtype != dtype or known.numel != numel):
                raise Refused(f"storage record data/{key} is used as {known.numel:,} x {known.dtype} and as "
                              f"{numel:,} x {dtype}")
            return known
        try:
            untyped = self.archive.storage(key, numel * dtype.itemsize)
        except RecordProblem as problem:
            self.problems.append(problem)
            loaded: LoadedStorage | BadStorage = BadStorage(problem)
        else:
            loaded = LoadedStorage(untyped, dtype, numel, f"{self.archive.prefix}data/{key}")
            self.storage_bytes += untyped.nbytes()
        self.storages[key] = loaded
        return loaded
