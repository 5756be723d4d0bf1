"""What a pickle may name, and what each name loads as: the allow-list is data, not code.

An :class:`AllowList` maps dotted names, as a pickle spells them
(``models.common.Conv``, ``collections.OrderedDict``), to one of three kinds of entry:

* an ``nn.Module`` subclass. ``torch.save`` pickles a module as "new instance of
  the class, then its saved ``__dict__``" (``NEWOBJ`` + ``BUILD``); it never calls
  the class. So the name loads as a *guard type*: its ``__new__`` returns
  ``cls.__new__(cls)`` (what ``NEWOBJ`` asks for), while calling it (``REDUCE``,
  or ``NEWOBJ`` with arguments) raises :class:`Refused` before anything runs. A
  file asking for ``Conv(16384, 16384, 3)`` is refused, not given 9.6 GB. The
  guard cannot be modified either (a pickle could otherwise set attributes on it);
* a :class:`Checked` callable: a function the pickle may call, which checks the
  types and sizes of its arguments before doing anything
  (:mod:`fxrewrite.serialization.standard` holds the ones torch files need:
  tensor rebuilding, ``OrderedDict()``, ``set([...])``, numpy scalars ...);
* an :class:`Inert` value (a dtype, a storage type): handed out as is, never called.

Two more tables keep the references to methods that real checkpoints hold, by
name: ``bound_methods`` (``{"forward": "forward_fuse"}``: a layer's instance
attribute ``forward`` may hold its own ``forward_fuse`` method, as a fused
model pickles it) and ``class_functions`` (``{"detect": "forward"}``: an
instance attribute ``detect`` may hold the ``forward`` function of one of the
layer's allowed classes). ``builtins.getattr`` in a pickle resolves only to
these (see :func:`fxrewrite.serialization.standard.restricted_getattr`). A
third, ``data_overrides``, names instance attributes that may shadow a method
of the class when they hold plain data of the given types: the official YOLOv9
layers carry a label ``type = 'models.common.Conv'``, which shadows
``nn.Module.type`` (``{"type": (str,)}``). Any other instance attribute that
shadows a method, property or other descriptor of its class is refused.

A caller builds the list from whatever classes it trusts: the YOLOv9 plug-in
passes its re-implementations under the official names; a trusted fork's
source tree could pass its own classes the same way.

>>> from torch import nn
>>> allow = AllowList({"torch.nn.modules.conv.Conv2d": nn.Conv2d}, what="a test file")
>>> guard = allow.guard("torch.nn.modules.conv.Conv2d")
>>> type(guard.__new__(guard)).__name__   # what NEWOBJ does: an instance, no __init__
'Conv2d'
>>> guard(1, 1, 1)                       # what REDUCE does: refused
Traceback (most recent call last):
...
fxrewrite.serialization.allowlist.Refused: the pickle calls torch.nn.modules.conv.Conv2d(1, 1, 1), a class constructor: a checkpoint rebuilds its layers without calling them (a call could run code or allocate any amount of memory)
"""
from __future__ import annotations

import functools
import pickle
import re
import reprlib
import threading
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import nn

__all__ = ["AllowList", "Checked", "Inert", "Refused", "Deferred", "Frozen"]

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
#: How deep containers and layers may nest before a file is refused (a yolov9-e training checkpoint: 12).
DEFAULT_MAX_DEPTH = 100

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel, _short.maxargs = 40, 40, 2, 4
_short.maxtuple = _short.maxlist = _short.maxdict = 4


class Refused(pickle.UnpicklingError):
    """The pickle asked for something the allow-list does not allow; the message says what (without the file)."""


class Frozen:
    """Base of the objects a pickle gets from the allow-list: no ``__dict__``, and ``BUILD`` on them is refused.

    (Pickle's ``BUILD`` opcode calls ``__setstate__`` on whatever object the file
    points it at; a shared function or class would otherwise be changed for the
    whole process.)
    """

    __slots__ = ()

    def __setstate__(self, state):
        raise Refused(f"the pickle tries to change {self!r}")


class Inert(Frozen):
    """A value the pickle may name but never call (a dtype, a storage type ...)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        object.__setattr__(self, "value", value)

    def __repr__(self) -> str:
        return f"Inert({self.value!r})"


class Checked(Frozen):
    """A function the pickle may call: ``function(context, *args)`` checks its arguments, then does the work.

    ``context`` is the loader of the file being read (tensor rebuilding needs its
    storages). A checked function raises :class:`Refused` for arguments no real
    file holds.
    """

    __slots__ = ("name", "function")

    def __init__(self, name: str, function: Callable[..., Any]):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "function", function)

    def bind(self, context: Any) -> "Call":
        call = Call(self.function, context)
        call.__dict__["name"] = self.name
        return call

    def __repr__(self) -> str:
        return f"<checked {self.name}>"


class Call(functools.partial):
    """A :class:`Checked` function bound to one load: what the pickle gets for the name.

    A ``functools.partial`` (called at C speed: the pickle calls these tens of
    thousands of times) whose ``__setstate__`` refuses, so ``BUILD`` cannot
    swap its function or arguments. (Pickle opcodes pass no keyword arguments
    to a call, so the checked function sees exactly the pickled tuple.)
    """

    __slots__ = ()

    def __setstate__(self, state):
        raise Refused(f"the pickle tries to change {self!r}")

    def __repr__(self) -> str:
        return f"<checked {self.__dict__.get('name', getattr(self.func, '__qualname__', '?'))}>"


class Deferred(Frozen):
    """What ``getattr(target, name)`` loads as: a reference, not callable while the file loads.

    Placed as a layer's instance attribute that the allow-list's tables permit,
    it becomes the real bound method or function once the whole file was
    checked; anywhere else the file is refused. (Handing out the method itself
    would let the pickle call it, e.g. run a layer on a tensor while loading.)
    """

    __slots__ = ("target", "name")

    def __init__(self, target: Any, name: str):
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "name", name)

    def __call__(self, *args, **kwargs):
        raise Refused(f"the pickle calls {self!r} while loading; a checkpoint may only keep such a reference")

    def __repr__(self) -> str:
        target = self.target.__name__ if isinstance(self.target, type) else type(self.target).__name__
        return f"getattr({target}, {self.name!r})"


class _GuardType(type):
    """Metaclass of guard types: calling one, or changing it, is refused."""

    def __call__(cls, *args, **kwargs):
        raise Refused(f"the pickle calls {_call_text(cls._fxrewrite_name, args, kwargs)}, a class constructor: a "
                      "checkpoint rebuilds its layers without calling them (a call could run code or allocate any "
                      "amount of memory)")

    def __setattr__(cls, name, value):
        raise Refused(f"the pickle tries to change the class {cls._fxrewrite_name}")

    def __delattr__(cls, name):
        raise Refused(f"the pickle tries to change the class {cls._fxrewrite_name}")

    def __repr__(cls) -> str:
        return f"<class {cls._fxrewrite_name} (rebuilt without calling it)>"


def _call_text(name: str, args: tuple, kwargs: dict) -> str:
    shown = [_short.repr(a) for a in args[:4]] + (["..."] if len(args) > 4 else [])
    shown += [f"{k}={_short.repr(v)}" for k, v in list(kwargs.items())[:2]]
    return f"{name}({', '.join(shown)})"


def _make_guard(name: str, cls: type) -> type:
    def __new__(guard, *args, **kwargs):
        if args or kwargs:  # NEWOBJ with arguments: cls.__new__(cls, *args) is a constructor call in disguise
            raise Refused(f"the pickle creates {_call_text(name, args, kwargs)} with arguments; a checkpoint "
                          "rebuilds its layers from their saved state alone")
        return cls.__new__(cls)

    return _GuardType(cls.__name__, (), {"__new__": __new__, "__slots__": (), "_fxrewrite_name": name,
                                         "_fxrewrite_class": cls, "__module__": __name__})


class AllowList:
    """The names a pickle may use and what they load as; see the module docstring.

    ``globals`` maps dotted names to ``nn.Module`` subclasses, :class:`Checked`
    callables or :class:`Inert` values (a ``torch.dtype`` is taken as inert).
    ``what`` names the kind of file in messages ("a YOLOv9 checkpoint");
    ``max_depth`` bounds how deep the loaded containers and layers may nest.
    """

    def __init__(self, globals: Mapping[str, Any], *, bound_methods: Mapping[str, str] | None = None,
                 class_functions: Mapping[str, str] | None = None,
                 data_overrides: Mapping[str, tuple[type, ...]] | None = None, what: str = "a checkpoint",
                 max_depth: int = DEFAULT_MAX_DEPTH):
        entries: dict[str, Any] = {}
        for name, value in globals.items():
            if not isinstance(name, str) or not _DOTTED.match(name):
                raise ValueError(f"allow-list: {name!r} is not a dotted name like 'package.module.Name'")
            if isinstance(value, torch.dtype):
                value = Inert(value)
            elif not (isinstance(value, (Checked, Inert)) or _is_module_class(value)):
                raise TypeError(f"allow-list: {name} is a {type(value).__name__}; an entry is an nn.Module subclass, "
                                "a Checked callable or an Inert value")
            entries[name] = value
        self._entries = MappingProxyType(entries)
        self.module_classes = frozenset(v for v in entries.values() if _is_module_class(v))
        self.bound_methods = MappingProxyType(dict(bound_methods or {}))
        self.class_functions = MappingProxyType(dict(class_functions or {}))
        self.data_overrides = MappingProxyType({k: tuple(v) for k, v in (data_overrides or {}).items()})
        self.what = what
        self.max_depth = max_depth
        self._guards: dict[str, type] = {}
        self._lock = threading.Lock()

    def names(self) -> frozenset[str]:
        """Every dotted name the pickle may use."""
        return frozenset(self._entries)

    def entry(self, name: str) -> Any:
        """The entry for ``name``, or None when it is not allowed."""
        return self._entries.get(name)

    def guard(self, name: str) -> type:
        """The guard type a module class's name loads as (one per name, made on first use)."""
        found = self._guards.get(name)
        if found is None:
            with self._lock:
                found = self._guards.get(name)
                if found is None:
                    found = self._guards[name] = _make_guard(name, self._entries[name])
        return found

    @staticmethod
    def guarded_class(obj: Any) -> type | None:
        """The module class behind a guard type (None for anything else)."""
        return obj._fxrewrite_class if type(obj) is _GuardType else None

    def with_globals(self, more: Mapping[str, Any]) -> "AllowList":
        """A new list with ``more`` entries (e.g. the classes of a trusted source tree); the tables are kept."""
        return AllowList({**self._entries, **more}, bound_methods=self.bound_methods,
                         class_functions=self.class_functions, data_overrides=self.data_overrides, what=self.what,
                         max_depth=self.max_depth)

    def getattr_rule(self) -> str:
        """The getattr references this list permits, in words (for messages)."""
        parts = [f"the {name} method of its layers" for name in sorted(set(self.bound_methods.values()))]
        parts += [f"the {name} function of their classes" for name in sorted(set(self.class_functions.values()))]
        return " and ".join(parts) if parts else "no method or function at all"

    def __repr__(self) -> str:
        return f"AllowList({len(self._entries)} names for {self.what})"


def _is_module_class(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, nn.Module)

