"""Checking everything a pickle built, before any of it is returned.

The unpickler only hands out allowed names; what the pickle *builds* from them
still has to be plain data. :func:`check_loaded` walks the whole result, without
recursion, and refuses (naming the place, e.g. ``ema.model.3.cv1.conv.weight``):

* anything that is not data: numbers, strings, bytes, ``None``, tuples, lists,
  dicts, sets, tensors, dtypes, devices, ``torch.Size``, numpy arrays and
  scalars (not of object dtype), paths, and layers of allowed classes. A
  callable from the allow-list stored as a value, a storage, a class: refused;
* layers whose instance attributes override a method or descriptor of their
  class (``forward = <something>``), except the references the allow-list's
  tables permit (``forward`` bound to the layer's own ``forward_fuse``;
  ``detect`` holding the ``forward`` function of one of its classes), which are
  turned into the real bound method or function here, after everything was
  checked, and plain data under the names of ``data_overrides`` (a string ``type`` label);
* layers with hooks, parameters that are not Parameters, children that are not layers;
* nesting deeper than the allow-list's ``max_depth`` (a file with 100,000 nested
  dicts would crash any recursive consumer -- ``copy.deepcopy``, ``repr``,
  YAML -- with a RecursionError), and more than :data:`MAX_NODES` objects
  counted along every path (shared containers count each time they are
  reached, so a tiny file of doubly-shared lists cannot expand into 2**100);
* tensor views outside their storage or repeating its elements, and views that
  together cover more than twice the tensor bytes the file holds (so any later
  copy of the tensors is bounded by the file's size);
* tensors whose storage record failed its checks: the message names the tensor
  and the record.
"""
from __future__ import annotations

import collections
import pathlib
import re
from typing import Any

import torch
from torch import nn

from .allowlist import Deferred, Refused
from .archive import RecordProblem
from .standard import BadTensor, check_view

__all__ = ["check_loaded", "MAX_NODES", "VIEW_BYTES_FACTOR"]

#: Containers, layers and tensors (counted along every path) a loaded file may hold; a yolov9-e training
#: checkpoint holds about 70,000.
MAX_NODES = 2_000_000
#: Tensor views may cover at most this many times the tensor bytes stored in the file (plus 1 MiB).
VIEW_BYTES_FACTOR = 2

_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device,
                    torch.Size})
_DICTS = (dict, collections.OrderedDict)
_SEQUENCES = (list, tuple)
_SETS = (set, frozenset)
_TENSORS = (torch.Tensor, nn.Parameter)
_IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")

_MODULE_STATE = frozenset(vars(nn.Module()))  # what nn.Module.__init__ sets (training, _parameters ... _modules)
_HOOK_DICTS = frozenset(name for name in _MODULE_STATE if "hook" in name and name != "_is_full_backward_hook")
# What every pickled layer has (nn.Module.__setstate__ fills in the others for files of older torch versions).
_REQUIRED_STATE = frozenset({"training", "_parameters", "_buffers", "_modules"})
# What each of a layer's child dicts may hold (None: a layer of an allowed class).
_CHILDREN: dict[str, Any] = {"_parameters": frozenset({nn.Parameter}), "_buffers": frozenset(_TENSORS),
                             "_modules": None}


class _Failure(Exception):
    """A problem found at ``path`` (a linked tuple), reported by :func:`check_loaded`."""

    def __init__(self, path: Any, message: str, corrupt: bool = False):
        self.path, self.message, self.corrupt = path, message, corrupt


def _methods(cls: type, cache: dict[type, frozenset[str]]) -> frozenset[str]:
    """Names under which ``cls`` (or a base) defines a method, property or other descriptor."""
    found = cache.get(cls)
    if found is None:
        found = frozenset(name for klass in cls.__mro__ for name, value in vars(klass).items()
                          if callable(value) or hasattr(type(value), "__get__"))
        cache[cls] = found
    return found


def render_path(path: Any, nested: bool = False) -> str:
    """``ema.model.3.cv1.conv.weight``, ``opt['epochs']``, ``optimizer['state'][0]`` ..."""
    parts = []
    while path is not None:
        path, tag, key = path
        parts.append((tag, key))
    parts.reverse()
    if len(parts) > 12:  # a deeply nested place: its start, its end and how deep it is
        return f"{render_path(_linked(parts[:6]))}...{render_path(_linked(parts[-3:]), nested=True)} " \
               f"({len(parts)} levels down)"
    return _render(parts, nested)


def _linked(parts: list) -> Any:
    path = None
    for tag, key in parts:
        path = (path, tag, key)
    return path


def _render(parts: list, nested: bool) -> str:
    text = ""
    for tag, key in parts:
        if tag == "attr":
            text += f".{key}" if text or nested else str(key)
        elif tag == "item" and not text and not nested and isinstance(key, str) and _IDENTIFIER.match(key):
            text = key
        elif tag in ("item", "index"):
            text += f"[{key!r:.60}]"
        elif tag == "key":
            text += f" (a key {key!r:.60})"
        else:
            text += " (a set member)"
    return text or ("" if nested else "the pickled object")


class _Walk:
    def __init__(self, loader, track: bool):
        self.loader = loader
        self.allow = loader.allow
        self.modules = loader.allow.module_classes
        self.track = track
        self.methods: dict[type, frozenset[str]] = {}
        self.tensors: dict[int, torch.Tensor] = {}
        self.view_bytes = 0
        self.fixes: list[tuple[nn.Module, str, Any]] = []

    def fail(self, path, message, corrupt=False):
        raise _Failure(path, message, corrupt)

    def run(self, root: Any) -> None:
        max_depth, max_nodes = self.allow.max_depth, MAX_NODES
        atoms, track = _ATOMS, self.track
        stack: list[tuple[Any, int, Any]] = [(root, 0, None)]
        push = stack.append
        nodes = 0
        while stack:
            obj, depth, path = stack.pop()
            nodes += 1
            if depth > max_depth:
                self.fail(path, f"nests more than {max_depth} levels deep (or contains itself); refused before a "
                                "recursive copy or print overflows the stack")
            if nodes > max_nodes:
                self.fail(path, f"the file holds more than {max_nodes:,} objects counted along every path (shared "
                                "containers repeated over and over?)")
            kind = type(obj)
            depth += 1
            # children are pushed last first, so that they are checked (and a problem found) in their order
            if kind in _DICTS:
                for key, value in reversed(obj.items()):
                    if type(value) not in atoms:
                        push((value, depth, (path, "item", key) if track else None))
                    if type(key) not in atoms:
                        push((key, depth, (path, "key", key) if track else None))
            elif kind in _SEQUENCES:
                for index in range(len(obj) - 1, -1, -1):
                    if type(obj[index]) not in atoms:
                        push((obj[index], depth, (path, "index", index) if track else None))
            elif kind in _TENSORS:
                self.tensor(obj, depth, path, push)
            elif kind in self.modules:
                self.module(obj, depth, path, push)
            elif kind in _SETS:
                for value in obj:
                    if type(value) not in atoms:
                        push((value, depth, (path, "member", None) if track else None))
            else:
                self.other(obj, path)
        limit = VIEW_BYTES_FACTOR * self.loader.storage_bytes + (1 << 20)
        if self.view_bytes > limit:
            self.fail(None, f"its tensors view {self.view_bytes:,} bytes of the {self.loader.storage_bytes:,} bytes "
                            f"of tensor data the file holds (overlapping views: copying them would take far more "
                            "memory than the file's size)")

    def other(self, obj: Any, path: Any) -> None:
        kind = type(obj)
        if kind is BadTensor:
            self.fail(path, f"{obj.problem}", corrupt=True)
        if kind is Deferred:
            self.fail(path, f"holds {obj!r}; {self.allow.what} may only refer to {self.allow.getattr_rule()}, as "
                            "layer attributes")
        if isinstance(obj, pathlib.PurePath):
            try:
                text = str(obj)
                if type(text) is str and type(obj)(text) == obj:
                    return
            except Exception:  # noqa: BLE001 - a path whose internals were overwritten
                pass
            self.fail(path, "is a damaged path object")
        numpy = _numpy()
        if numpy is not None:
            if kind is numpy.ndarray:
                if obj.dtype.hasobject or (obj.itemsize == 0 and obj.size > 0):
                    self.fail(path, f"is a numpy array of dtype {obj.dtype}, not plain data")
                return
            if isinstance(obj, (numpy.generic, numpy.dtype)) and not getattr(obj, "hasobject", False):
                return
        shown = repr(obj) if kind.__module__.startswith("fxrewrite.serialization") else kind.__qualname__
        self.fail(path, f"is {_article(shown)}, not data")

    def tensor(self, tensor: torch.Tensor, depth: int, path: Any, push) -> None:
        key = id(tensor)
        if key in self.tensors:
            return
        self.tensors[key] = tensor
        size = tensor.element_size()
        if key not in self.loader.built:  # made some other way than the checked rebuilders (a legacy BUILD ...)
            storage = tensor.untyped_storage()
            try:
                check_view(storage.nbytes() // size, tensor.storage_offset(), tuple(tensor.shape),
                           tuple(tensor.stride()))
            except Refused as exc:
                self.fail(path, str(exc))
        self.view_bytes += tensor.numel() * size
        if tensor._backward_hooks:
            self.fail(path, "carries backward hooks; hooks are code, not data")
        extra = tensor.__dict__
        if extra:
            methods = _methods(type(tensor), self.methods)
            for name, value in extra.items():
                if type(name) is not str or name in methods:
                    self.fail(path, f"has an attribute {name!r:.60} that overrides a tensor method")
                if type(value) not in _ATOMS:
                    push((value, depth, (path, "attr", name) if self.track else None))

    def module(self, module: nn.Module, depth: int, path: Any, push) -> None:
        cls, track, atoms = type(module), self.track, _ATOMS
        methods = self.methods.get(cls) or _methods(cls, self.methods)
        state = module.__dict__
        if not _REQUIRED_STATE.issubset(state.keys()):
            missing = ", ".join(sorted(_REQUIRED_STATE - state.keys()))
            self.fail(path, f"{_Layer(module, path)} lacks {missing}: not the saved state of a layer")
        for name, value in reversed(state.items()):
            if type(name) is not str:
                self.fail(path, f"{_Layer(module, path)} has an attribute named by a {type(name).__name__}")
            if name in _MODULE_STATE:
                kind = type(value)
                if name in _HOOK_DICTS:
                    if kind not in _DICTS or value:
                        self.fail(path, f"{_Layer(module, path)} has hooks in {name}; hooks are code, not data")
                elif name in _CHILDREN:
                    if kind not in _DICTS:
                        self.fail(path, f"{_Layer(module, path)}: its {name} is a {kind.__name__}, not a dict")
                    allowed = _CHILDREN[name] or self.modules
                    for key, item in reversed(value.items()):
                        if item is None:
                            continue
                        if type(key) is not str or type(item) not in allowed:
                            self.bad_child(module, name, key, item, path)
                        push((item, depth, (path, "attr", key) if track else None))
                elif name == "_non_persistent_buffers_set":
                    if kind is not set or not all(type(v) is str for v in value):
                        self.fail(path, f"{_Layer(module, path)}: its {name} is not a set of names")
                elif name == "_is_full_backward_hook":
                    if value is not None and kind is not bool:
                        self.fail(path, f"{_Layer(module, path)}: its {name} is not None or a bool")
                elif kind is not bool:  # training
                    self.fail(path, f"{_Layer(module, path)}: its {name} flag is a {kind.__name__}, not a bool")
            elif name in methods or type(value) is Deferred:
                self.reference(module, name, value, methods, path)
            elif type(value) not in atoms:
                push((value, depth, (path, "attr", name) if track else None))

    def bad_child(self, module: nn.Module, name: str, key: Any, item: Any, path: Any) -> None:
        if type(key) is not str:
            self.fail(path, f"{_Layer(module, path)}: its {name} has a key that is a {type(key).__name__}")
        if type(item) is BadTensor:
            return  # reported with the tensor's name when it is reached
        what = {"_parameters": "a Parameter", "_buffers": "a tensor", "_modules": "a layer"}[name]
        self.fail(path, f"{_Layer(module, path)}: {key!r:.60} in its {name} is a {type(item).__qualname__}, "
                        f"not {what}")

    def reference(self, module: nn.Module, name: str, value: Any, methods: frozenset[str], path: Any) -> None:
        """An instance attribute named like a method of the class, or holding a getattr reference."""
        allow = self.allow
        layer = _Layer(module, path)
        if type(value) is Deferred:
            if allow.bound_methods.get(name) == value.name and value.target is module:
                self.fixes.append((module, name, getattr(module, value.name)))
                return
            if allow.class_functions.get(name) == value.name and isinstance(value.target, type) \
                    and isinstance(module, value.target):
                self.fixes.append((module, name, getattr(value.target, value.name)))
                return
            self.fail(path, f"{layer}: its attribute {name!r} holds {value!r}; {allow.what} may only refer to "
                            f"{allow.getattr_rule()}, each on its own layer")
        if type(value) in allow.data_overrides.get(name, ()):
            return  # plain data the allow-list expects under this name (YOLOv9's `type` label)
        self.fail(path, f"{layer}: its instance attribute {name!r:.60} overrides the {name:.60} of its class "
                        "(the layer would not run the code its class defines)")


class _Layer:
    """Names a layer in a message; the path is rendered only when a message is made."""

    __slots__ = ("module", "path")

    def __init__(self, module: nn.Module, path: Any):
        self.module, self.path = module, path

    def __str__(self) -> str:
        return f"layer {render_path(self.path)} ({type(self.module).__name__})"

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


def _article(text: str) -> str:
    return text if text.startswith("<") else f"{'an' if text[:1].lower() in 'aeiou' else 'a'} {text}"


def _numpy():
    import sys

    return sys.modules.get("numpy")  # arrays can only exist if numpy was imported by the pickle's loading


def check_loaded(root: Any, loader, shown: str) -> None:
    """Refuse ``root`` (what the pickle built) unless all of it is data; then resolve the permitted references.

    Raises :class:`~fxrewrite.serialization.errors.LoadError` naming the file and the place.
    """
    from .errors import LoadError

    try:
        walk = _Walk(loader, track=False)
        walk.run(root)
    except _Failure:
        walk = _Walk(loader, track=True)  # again, naming the place (the first pass keeps no paths: it is faster)
        try:
            walk.run(root)
        except _Failure as failure:
            where = render_path(failure.path) if failure.path is not None else None
            if failure.corrupt:
                text = f"{failure.message}, read for {where}" if where else failure.message
                raise LoadError(f"{shown}: truncated or corrupt zip archive ({text})") from None
            text = f"{where} {failure.message}" if where and not failure.message.startswith("layer ") else failure.message
            raise LoadError(f"{shown}: refused to load: {text}; nothing from the file was executed") from None
        raise AssertionError("the checks disagree between passes")  # pragma: no cover
    if loader.problems:  # a damaged record was read, but its tensor is nowhere in the result: still refuse
        problem: RecordProblem = loader.problems[0]
        raise LoadError(f"{shown}: truncated or corrupt zip archive ({problem})")
    for module, name, value in walk.fixes:
        module.__dict__[name] = value
