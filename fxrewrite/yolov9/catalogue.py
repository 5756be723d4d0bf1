"""The YOLOv9 block catalogue: every class a YOLOv9 config, checkpoint or rule file may name, once.

One row (:class:`Block`) per name says everything the plug-in needs to know about a class:

* ``name``: how configs (``[-1, 1, RepNCSPELAN4, [256, 128, 64, 1]]``) and rule files
  (``replace: {with: DDetect}``) spell it;
* ``target``: the class, or a lazy ``"module:Class"`` reference inside ``fxrewrite.yolov9``
  (heads are imported only when something asks for them);
* ``role``: how the config planner (:mod:`fxrewrite.yolov9.planner`) reads the layer's
  arguments and derives its channels (:data:`ROLES`); ``None`` for a class no config names
  (the parts ``DFL`` / ``Proto``, the model classes);
* ``official``: the dotted name checkpoints of the official code pickle it under
  (``models.common.Conv``), which the loader accepts and the saver writes; ``None`` for torch's
  own layers (pickled under torch's names);
* ``kind``: ``"block"`` / ``"head"`` / ``"part"`` (YOLOv9 layers: rule files may name them),
  ``"torch"`` (torch layers configs may name), ``"model"`` (whole models in a checkpoint).

The built-in rows are written below; :func:`register_block` adds a user's block everywhere at
once (configs, checkpoints, rule files); :func:`scoped` undoes what a ``with`` block registered.

>>> block("RepNCSPELAN4").role, block("RepNCSPELAN4").official
('scaled', 'models.common.RepNCSPELAN4')
>>> registered_blocks()["DDetect"], official_aliases()["models.yolo.DDetect"].__name__
('detect', 'DDetect')
"""
from __future__ import annotations

import contextlib
import importlib
import re
import threading
from dataclasses import dataclass, replace as with_fields
from typing import Iterator

from torch import nn

from .. import registry
from ..registry import RegistrationError

__all__ = ["Block", "ROLES", "HEAD_ROLES", "KINDS", "blocks", "block", "registered_blocks", "role_of", "names_of",
           "official_aliases", "official_name_of", "register_block", "unregister_block", "register_rule_classes",
           "scoped"]

#: How the config planner treats a block's channels and arguments (the row's ``role``):
ROLES = {
    "same": "output channels = channels of the (first) input; args passed as written",
    "scaled": "args[0] is the output channel count, scaled by width_multiple and rounded up to a "
    "multiple of 8; the input channel count is prepended: cls(c_in, c_out, *args[1:])",
    "scaled_repeated": "like 'scaled', and the repeat count is passed as third argument instead of stacking copies",
    "concat": "output channels = sum of the inputs' channels",
    "cblinear": "args[0] is a list of output channel counts (not width-scaled); cls(c_in, channel_list, *args[1:])",
    "cbfuse": "output channels = channels of the last input",
    "batchnorm": "constructed as cls(c_in)",
    "detect": "a detection head: the list of input channel counts is appended to args",
    "segment": "a segmentation head: like 'detect', and args[2] (prototype width) is width-scaled",
}
#: Roles of a model's last layer that make it a head (the model measures and keeps its strides).
HEAD_ROLES = ("detect", "segment")
KINDS = ("block", "head", "part", "torch", "model")

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


@dataclass
class Block:
    """One catalogue row (see the module docstring)."""

    name: str
    target: type | str
    role: str | None
    official: str | None
    kind: str = "block"

    def resolve(self) -> type:
        """The class (a lazy ``"module:Class"`` target is imported once)."""
        if isinstance(self.target, str):
            module, attr = self.target.split(":")
            self.target = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
        return self.target

    def may_be(self, cls: type) -> bool:
        """Whether this row's class is ``cls`` (imports a lazy target only when the class name matches)."""
        if isinstance(self.target, str):
            return self.target.rpartition(":")[2] == cls.__name__ and self.resolve() is cls
        return self.target is cls


def _builtin_rows() -> list[Block]:
    rows = []

    def add(module: str, names: str, role: str | None, official: str | None, kind: str) -> None:
        for name in names.split():
            rows.append(Block(name, f"{module}:{name}", role, official and f"{official}.{name}", kind))

    # Layers of the official models/common.py (the file layout is a fact of the checkpoint format).
    add("blocks", "Conv AConv ADown ELAN1 RepNCSPELAN4 SPPELAN", "scaled", "models.common", "block")
    add("blocks", "Concat", "concat", "models.common", "block")
    add("blocks", "CBLinear", "cblinear", "models.common", "block")
    add("blocks", "CBFuse", "cbfuse", "models.common", "block")
    # Inner blocks are accepted as the reference accepts them: the config spells out every argument.
    add("blocks", "Silence SP RepConvN RepNBottleneck RepNCSP", "same", "models.common", "block")
    add("heads", "DFL Proto", None, "models.common", "part")
    # Heads and whole models are in the official models/yolo.py.
    add("heads", "Detect DDetect DualDetect DualDDetect TripleDetect TripleDDetect", "detect", "models.yolo", "head")
    add("heads", "Segment DSegment DualDSegment", "segment", "models.yolo", "head")
    add("model", "DetectionModel SegmentationModel", None, "models.yolo", "model")
    torch_layers = {"Upsample": "same", "Identity": "same", "MaxPool2d": "same", "ZeroPad2d": "same",
                    "BatchNorm2d": "batchnorm", "ConvTranspose2d": "scaled"}
    for attr, role in torch_layers.items():
        for prefix in ("nn.", "torch.nn."):
            rows.append(Block(f"{prefix}{attr}", getattr(nn, attr), role, None, "torch"))
    return rows


_lock = threading.RLock()
_ROWS: dict[str, Block] = {row.name: row for row in _builtin_rows()}
_aliases: dict[str, type] | None = None  # official name -> class, rebuilt after a change


# -- reading ----------------------------------------------------------------------------------
def blocks() -> list[Block]:
    """Every row, in registration order (built-ins first)."""
    with _lock:
        return list(_ROWS.values())


def block(name: str) -> Block | None:
    """The row configs and rule files call ``name``, or None."""
    return _ROWS.get(name)


def registered_blocks() -> dict[str, str]:
    """Block names usable in configs, sorted, mapped to their role."""
    return {row.name: row.role for row in sorted(blocks(), key=lambda r: r.name) if row.role is not None}


def names_of(cls: type, *, configurable: bool = True) -> list[str]:
    """The names ``cls`` is registered under (only those configs may use, by default)."""
    return [row.name for row in blocks() if (row.role is not None or not configurable) and row.may_be(cls)]


def role_of(cls: type) -> str | None:
    """The config role ``cls`` is registered with (None: not a config block).

    A class of the official code (``models.yolo.DSegment``, e.g. in a model loaded from the
    official source tree) has the role of its twin here."""
    for row in blocks():
        if row.role is not None and row.may_be(cls):
            return row.role
    twin = official_aliases().get(f"{cls.__module__}.{cls.__qualname__}")
    return role_of(twin) if twin is not None and twin is not cls else None


def official_aliases() -> dict[str, type]:
    """Official dotted name -> our class, every row that has one (imports the plug-in's layers)."""
    global _aliases
    with _lock:
        if _aliases is None:
            _aliases = {row.official: row.resolve() for row in _ROWS.values() if row.official is not None}
        return dict(_aliases)


def official_name_of(cls: type) -> str | None:
    """The official dotted name ``cls`` is saved under, or None if it has none."""
    for name, ours in official_aliases().items():
        if ours is cls:
            return name
    return None


# -- registering ------------------------------------------------------------------------------
def register_block(cls: type, official_name: str | None = None, *, name: str | None = None, role: str = "same",
                   replace: bool = False) -> type:
    """Teach fxrewrite a YOLOv9 block, everywhere it needs to know it (one catalogue row):

    * configs name it ``name`` (default: the class name); ``role`` tells the planner how to
      derive its channels (:data:`ROLES`);
    * checkpoints pickle it as ``official_name`` (default ``models.common.<ClassName>``), so
      :func:`~fxrewrite.yolov9.checkpoint.load_checkpoint` accepts it and saving writes it
      (the pickled ``__dict__`` is restored onto the class without running ``__init__``, so its
      attribute names must be those of the pickled instances);
    * rule files may name it (``replace: {with: ...}``; registered in the current
      :mod:`fxrewrite.registry`).

    A name (config or official) already given to another class is a
    :class:`~fxrewrite.registry.RegistrationError` unless ``replace=True``; registering the
    same row again is a no-op. Returns ``cls``.

    >>> import torch
    >>> class Scale(torch.nn.Module):
    ...     def __init__(self, c1):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.ones(1, c1, 1, 1))
    ...     def forward(self, x):
    ...         return x * self.w
    >>> with scoped():
    ...     register_block(Scale) is Scale, registered_blocks()["Scale"], official_name_of(Scale)
    (True, 'same', 'models.common.Scale')
    >>> block("Scale") is None
    True
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_block: {cls!r} is not an nn.Module subclass")
    if role not in ROLES:
        raise ValueError(f"register_block: unknown role {role!r}; choose one of {', '.join(ROLES)}")
    official = official_name or f"models.common.{cls.__name__}"
    if not isinstance(official, str) or not _DOTTED.match(official):
        raise ValueError(f"register_block: {official!r} is not a dotted name like 'models.common.MyBlock'")
    name = name or cls.__name__
    row = Block(name, cls, role, official)
    global _aliases
    with _lock:
        existing = _ROWS.get(name)
        if existing is not None and (existing.resolve(), existing.role, existing.official) == (cls, role, official):
            registry.register_module_class(cls, name)  # a no-op, or the name in a new scope
            return cls
        if not replace:
            _check_free(row, existing)
        registry.register_module_class(cls, name, replace=replace)  # refuses before the catalogue changes
        for other in _ROWS.values():  # replace=True: the official name moves to this class
            if other.official == official and other.name != name:
                _ROWS[other.name] = with_fields(other, official=None)
        _ROWS[name] = row
        _aliases = None
    return cls


def _check_free(row: Block, existing: Block | None) -> None:
    if existing is not None:
        raise RegistrationError(f"block name {row.name!r} is already registered (as {_shown(existing)}, not "
                                f"{_shown(row)}); pass replace=True to replace it")
    table = official_aliases()
    if table.get(row.official, row.target) is not row.target:
        raise RegistrationError(f"register_block: {row.official} already loads as {table[row.official].__qualname__}")
    for official, ours in table.items():
        if ours is row.target and official != row.official:
            raise RegistrationError(f"register_block: {row.target.__qualname__} is already registered as {official}")


def _shown(row: Block) -> str:
    cls = row.resolve()
    return f"{cls.__module__}.{cls.__qualname__}, role {row.role!r}, saved as {row.official}"


def unregister_block(name: str) -> None:
    """Remove the row configs call ``name`` (or, given a dotted official name, the row saved under it).

    Built-in rows cannot be removed. The rule-file name stays in the registry it was registered
    in: tests register inside :func:`scoped`, which undoes both."""
    global _aliases
    with _lock:
        row = _ROWS.get(name) or next((r for r in _ROWS.values() if r.official == name), None)
        if row is None:
            raise KeyError(f"no block registered under {name!r}")
        if any(row.name == builtin.name for builtin in _builtin_rows()):
            raise ValueError(f"{name!r} is a built-in block and cannot be unregistered")
        del _ROWS[row.name]
        _aliases = None


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """A ``with`` block after which the catalogue and the rule-file registry are as before it."""
    global _aliases
    with _lock:
        saved = dict(_ROWS)
    try:
        with registry.scoped("yolov9 blocks"):
            yield
    finally:
        with _lock:
            _ROWS.clear()
            _ROWS.update(saved)
            _aliases = None


def register_rule_classes() -> None:
    """Register the plug-in's own layers (blocks, heads and their parts) with the current
    :mod:`fxrewrite.registry`, so rule files may name them (done when the plug-in is imported)."""
    for row in blocks():
        if row.kind in ("block", "head", "part"):
            registry.register_module_class(row.resolve(), row.name)
