"""The globals ordinary torch files need, each checked before it runs.

``torch.save`` pickles a tensor as ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, requires_grad, hooks)``, a parameter through
``_rebuild_parameter``, an ``OrderedDict`` as ``OrderedDict()`` plus items, a
set as ``set([...])``, bytes as ``_codecs.encode(text, 'latin1')``, a numpy
scalar as ``numpy.core.multiarray.scalar(dtype, bytes)``. :func:`standard_globals`
maps each of these names to a :class:`~fxrewrite.serialization.allowlist.Checked`
replacement that accepts exactly the arguments such files hold:

* a tensor view must lie inside its storage, and may not have more elements
  than its storage (a stride-0 view of a small storage "expands" into gigabytes
  once copied);
* hooks must be empty (a hook is a callable);
* containers are built only from lists and tuples (``set(tensor)`` would turn
  a small tensor into millions of Python objects);
* numpy arrays start empty, as numpy's own pickles start them (``ndarray((10**10,))``
  would allocate).

>>> from fxrewrite.serialization.allowlist import Refused
>>> size = standard_globals()["torch.Size"]
>>> size.function(None, [2, 3])
torch.Size([2, 3])
>>> size.function(None, "abc")
Traceback (most recent call last):
...
fxrewrite.serialization.allowlist.Refused: torch.Size(...) takes a list of integers, got a str
"""
from __future__ import annotations

import codecs
import collections
import math
import os
import pathlib
from typing import Any

import torch
from torch import nn

from .allowlist import Checked, Deferred, Frozen, Inert, Refused

__all__ = ["standard_globals", "StorageType", "LoadedStorage", "BadStorage", "BadTensor", "restricted_getattr",
           "check_view"]


class StorageType(Frozen):
    """What ``torch.HalfStorage`` & co. load as: the element type of a storage record."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self) -> str:
        return f"<storage type {self.dtype}>"


class LoadedStorage(Frozen):
    """A storage record of the file, checked and read; only the tensor rebuilders accept it."""

    __slots__ = ("untyped", "dtype", "numel", "record")

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype, numel: int, record: str):
        for name, value in (("untyped", untyped), ("dtype", dtype), ("numel", numel), ("record", record)):
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"<storage {self.record} ({self.numel} x {self.dtype})>"


class BadStorage(Frozen):
    """A storage record that failed its checks; any tensor built on it becomes a :class:`BadTensor`."""

    __slots__ = ("problem",)

    def __init__(self, problem: Exception):
        object.__setattr__(self, "problem", problem)

    def __repr__(self) -> str:
        return f"<unreadable storage: {self.problem}>"


class BadTensor(BadStorage):
    """Stands where a tensor of a damaged record would be; the loader reports it with the tensor's name."""

    __slots__ = ()


def _is_int(value: Any) -> bool:
    return type(value) is int


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if type(value) not in (tuple, list, torch.Size) or not all(type(v) is int and v >= 0 for v in value):
        raise Refused(f"{what} must be a tuple of non-negative integers, got {type(value).__name__}")
    return tuple(value)


def _no_hooks(hooks: Any, where: str) -> None:
    if hooks is None or (type(hooks) in (dict, collections.OrderedDict) and not hooks):
        return
    raise Refused(f"{where} carries backward hooks ({type(hooks).__name__}); hooks are code, not data")


def check_view(storage_numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
    """Refuse a view that reaches outside its storage, or that repeats storage elements (stride 0)."""
    numel = math.prod(size)
    if numel == 0:
        if offset > storage_numel:
            raise Refused(f"a tensor view starts at element {offset:,} of a {storage_numel:,}-element storage")
        return
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if extent > storage_numel:
        raise Refused(f"a tensor of size {list(size)}, stride {list(stride)} at offset {offset:,} reaches element "
                      f"{extent:,} of its {storage_numel:,}-element storage")
    if numel > storage_numel:
        raise Refused(f"a tensor of size {list(size)}, stride {list(stride)} has {numel:,} elements over a "
                      f"{storage_numel:,}-element storage (repeated elements: copying it would take "
                      f"{numel // max(storage_numel, 1):,}x the memory the file holds)")


def rebuild_tensor(context, storage, offset, size, stride, requires_grad, hooks, metadata=None) -> Any:
    """``torch._utils._rebuild_tensor_v2``, checked: a view of one of the file's storages, inside it."""
    if type(storage) is BadStorage:
        return BadTensor(storage.problem)
    if type(storage) is not LoadedStorage:
        raise Refused(f"torch._utils._rebuild_tensor_v2 expects a storage of the file, got a {type(storage).__name__}")
    if not _is_int(offset) or offset < 0:
        raise Refused(f"a tensor's storage offset must be a non-negative integer, got {offset!r:.40}")
    size, stride = _int_tuple(size, "a tensor's size"), _int_tuple(stride, "a tensor's stride")
    if len(size) != len(stride):
        raise Refused(f"a tensor has {len(size)} sizes but {len(stride)} strides")
    if type(requires_grad) is not bool:
        raise Refused(f"a tensor's requires_grad must be True or False, got {type(requires_grad).__name__}")
    _no_hooks(hooks, "a tensor")
    if metadata is not None and (type(metadata) is not dict or metadata):
        raise Refused("a tensor carries metadata (conjugate/negative bits), which a checkpoint's weights never do")
    check_view(storage.numel, offset, size, stride)
    tensor = torch.empty(0, dtype=storage.dtype).set_(storage.untyped, offset, size, stride)
    if requires_grad:
        tensor.requires_grad_(True)
    context.built[id(tensor)] = tensor
    return tensor


def rebuild_parameter(context, data, requires_grad, hooks) -> Any:
    """``torch._utils._rebuild_parameter``, checked: a Parameter around a tensor of the file."""
    if type(data) is BadTensor:
        return data
    if type(data) is not torch.Tensor:
        raise Refused(f"a Parameter must wrap a tensor, got a {type(data).__name__}")
    if type(requires_grad) is not bool:
        raise Refused(f"a Parameter's requires_grad must be True or False, got {type(requires_grad).__name__}")
    _no_hooks(hooks, "a Parameter")
    param = nn.Parameter(data, requires_grad)
    context.built[id(param)] = param
    return param


def rebuild_parameter_with_state(context, data, requires_grad, hooks, state) -> Any:
    """``torch._utils._rebuild_parameter_with_state``: a Parameter with plain instance attributes."""
    param = rebuild_parameter(context, data, requires_grad, hooks)
    if type(param) is BadTensor:
        return param
    attributes, slots = state if type(state) is tuple and len(state) == 2 else (state, None)
    if slots:
        raise Refused("a Parameter carries slot state, which plain Parameters do not have")
    if attributes:
        if type(attributes) is not dict or not all(type(k) is str and not k.startswith("__") for k in attributes):
            raise Refused("a Parameter's extra attributes must be a dict of plain names")
        param.__dict__.update(attributes)  # values and names are checked with the rest of the file
    return param


def _ordered_dict(context, *args) -> collections.OrderedDict:
    if not args:
        return collections.OrderedDict()
    if len(args) == 1 and type(args[0]) in (list, tuple) and all(
            type(p) in (list, tuple) and len(p) == 2 for p in args[0]):
        return collections.OrderedDict(args[0])
    raise Refused("collections.OrderedDict(...) takes nothing or a list of key-value pairs")


def _collection(kind: type):
    def build(context, *args):
        if not args:
            return kind()
        if len(args) == 1 and type(args[0]) in (list, tuple, set, frozenset):
            return kind(args[0])
        raise Refused(f"{kind.__name__}(...) takes a list, got {', '.join(type(a).__name__ for a in args)}")

    return build


def _complex(context, real=0.0, imag=0.0) -> complex:
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise Refused("complex(...) takes two numbers")
    return complex(real, imag)


def _latin1(encoding: Any) -> bool:
    return type(encoding) is str and encoding.lower().replace("-", "").replace("_", "") in ("latin1", "iso88591")


def _encode(context, text, encoding="utf-8") -> bytes:
    """``_codecs.encode``: how protocol-2 pickles spell bytes; only the latin-1 text form is accepted."""
    if type(text) is not str or not _latin1(encoding):
        raise Refused("_codecs.encode(...) is only accepted as pickle writes bytes: (text, 'latin1')")
    return codecs.encode(text, "latin1")


def _bytearray(context, *args) -> bytearray:
    if not args:
        return bytearray()
    if len(args) == 1 and type(args[0]) is bytes:
        return bytearray(args[0])
    if len(args) == 2 and type(args[0]) is str and _latin1(args[1]):
        return bytearray(args[0], "latin1")
    raise Refused("bytearray(...) takes bytes")


def _size(context, dims=()) -> torch.Size:
    if type(dims) not in (list, tuple) or not all(type(d) is int for d in dims):
        raise Refused(f"torch.Size(...) takes a list of integers, got a {type(dims).__name__}")
    return torch.Size(dims)


def _device(context, kind, index=None) -> torch.device:
    if type(kind) is not str or not (index is None or type(index) is int):
        raise Refused("torch.device(...) takes a device name and an optional index")
    return torch.device(kind) if index is None else torch.device(kind, index)


def _path(kind: type):
    def build(context, *parts):
        if not all(type(p) is str for p in parts):
            raise Refused(f"a {kind.__name__} is built from strings")
        return kind(*parts)

    return build


def restricted_getattr(context, target, name, *default) -> Deferred:
    """``builtins.getattr``, limited to the references the allow-list's tables permit.

    ``getattr(layer, "forward_fuse")`` for a name in ``bound_methods``, and
    ``getattr(LayerClass, "forward")`` for a name in ``class_functions``; the
    result is a :class:`~fxrewrite.serialization.allowlist.Deferred` reference
    that nothing can call while the file loads.
    """
    allow = context.allow
    cls = allow.guarded_class(target)
    if not default and type(name) is str:
        if type(target) in allow.module_classes and name in allow.bound_methods.values() \
                and callable(getattr(type(target), name, None)):
            return Deferred(target, name)
        if cls is not None and name in allow.class_functions.values() and callable(getattr(cls, name, None)):
            return Deferred(cls, name)
    shown = (cls or target).__name__ if isinstance(cls or target, type) else type(target).__name__
    raise Refused(f"refused getattr({shown}, {name!r:.60}): {allow.what} may only refer to {allow.getattr_rule()}")


# ---------------------------------------------------------------------------- numpy
class _NumpyArrayClass(Frozen):
    """What ``numpy.ndarray`` loads as: the argument numpy's array pickles pass, never callable."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<numpy.ndarray>"


_NDARRAY = _NumpyArrayClass()


def _numpy_reconstruct(context, cls, shape, dtype):
    """numpy pickles an array as ``_reconstruct(ndarray, (0,), b'b')`` and then its state; only that start is accepted."""
    import numpy as np

    if cls is not _NDARRAY or shape != (0,) or dtype not in (b"b", "b"):
        raise Refused("numpy's _reconstruct(...) is only accepted as numpy pickles arrays: (ndarray, (0,), b'b')")
    return np.ndarray.__new__(np.ndarray, (0,), np.dtype("b"))


def _numpy_scalar(context, dtype, data=None):
    import numpy as np

    if type(dtype) is not np.dtype and not isinstance(dtype, np.dtype):
        raise Refused("numpy's scalar(...) takes a dtype")
    if dtype.hasobject or type(data) is not bytes or len(data) != dtype.itemsize:
        raise Refused("numpy's scalar(...) takes a plain dtype and exactly its bytes")
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return multiarray.scalar(dtype, data)


def _numpy_dtype(context, spec, align=False, copy=False):
    import numpy as np

    if type(spec) is not str or type(align) is not bool or type(copy) is not bool or len(spec) > 16:
        raise Refused("numpy.dtype(...) takes a type code like 'f8'")
    return np.dtype(spec, align, copy)


def _numpy_globals() -> dict[str, Any]:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return {}
    found: dict[str, Any] = {"numpy.ndarray": Inert(_NDARRAY),
                             "numpy.dtype": Checked("numpy.dtype", _numpy_dtype)}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x spellings
        found[f"{module}._reconstruct"] = Checked(f"{module}._reconstruct", _numpy_reconstruct)
        found[f"{module}.scalar"] = Checked(f"{module}.scalar", _numpy_scalar)
    return found


_cache: dict[str, Any] | None = None


def _all_dtypes() -> dict[str, torch.dtype]:
    return {f"torch.{name}": value for name in dir(torch) if isinstance(value := getattr(torch, name), torch.dtype)
            and str(value) == f"torch.{name}"}


def standard_globals() -> dict[str, Any]:
    """Every name an ordinary ``torch.save`` file uses, mapped to its checked replacement (a fresh dict)."""
    global _cache
    if _cache is None:
        table: dict[str, Any] = {}
        checked = {
            "torch._utils._rebuild_tensor_v2": rebuild_tensor,
            "torch._utils._rebuild_parameter": rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": rebuild_parameter_with_state,
            "torch.Size": _size,
            "torch.device": _device,
            "collections.OrderedDict": _ordered_dict,
            "builtins.set": _collection(set),
            "builtins.frozenset": _collection(frozenset),
            "builtins.complex": _complex,
            "builtins.bytearray": _bytearray,
            "_codecs.encode": _encode,
            "builtins.getattr": restricted_getattr,
            "pathlib.PosixPath": _path(pathlib.PosixPath if os.name != "nt" else pathlib.PurePosixPath),
            "pathlib.PurePosixPath": _path(pathlib.PurePosixPath),
            "pathlib.PureWindowsPath": _path(pathlib.PureWindowsPath),
            # A WindowsPath cannot exist on POSIX: read it as its pure counterpart.
            "pathlib.WindowsPath": _path(pathlib.WindowsPath if os.name == "nt" else pathlib.PureWindowsPath),
        }
        table.update({name: Checked(name, function) for name, function in checked.items()})
        for dtype, storage_name in torch.storage._dtype_to_storage_type_map().items():
            table[f"torch.{storage_name}"] = Inert(StorageType(dtype))
        table["torch.UntypedStorage"] = table["torch.storage.UntypedStorage"] = Inert(StorageType(torch.uint8))
        table.update({name: Inert(dtype) for name, dtype in _all_dtypes().items()})
        table.update(_numpy_globals())
        _cache = table
    return dict(_cache)
