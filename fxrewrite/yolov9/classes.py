"""Which pickled names a YOLOv9 checkpoint may contain, and what they load as.

A training checkpoint of the reference code (WongKinYiu/yolov9) pickles whole
model objects, so it names classes by their import path in that code base:
``models.common.Conv``, ``models.yolo.DualDDetect``, ``models.yolo.DetectionModel``
... We never import that code. Instead:

* :func:`official_aliases` maps each official dotted name to *our*
  re-implementation (``fxrewrite.yolov9.blocks`` / ``heads`` / ``model``); the
  saver writes our classes back under the official names.
* :func:`register_block` adds a user-written class for a custom block.
* :func:`checkpoint_allow_list` is what the loader accepts, as data for the
  core safe loader (:mod:`fxrewrite.serialization`): the official names (and
  the torch layers the blocks are made of) as layer classes, which a file can
  only rebuild, never call; torch's tensor-rebuilding names, ``OrderedDict``,
  ``set``, numpy scalars and paths as checked functions; and the two method
  references real checkpoints hold (``forward = forward_fuse`` of a fused
  block, ``detect = <Head>.forward`` of a segmentation head). Everything else
  is refused without being executed.
* :func:`allowed_globals` lists the same non-YOLO names as the real objects
  (torch's own ``weights_only`` loader takes them as ``safe_globals``; tests
  compare the two loaders on the same files).

>>> allow = checkpoint_allow_list()
>>> "models.common.Conv" in allow.names(), "os.system" in allow.names()
(True, False)
>>> dict(allow.bound_methods), dict(allow.class_functions)
({'forward': 'forward_fuse'}, {'detect': 'forward'})

(Not to be confused with ``fxrewrite.yolov9.model.register_block``, which
teaches the *config builder* a module name; a custom block usually needs both.)
"""
from __future__ import annotations

import collections
import os
import pathlib
import re
import threading
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ..serialization import AllowList

__all__ = [
    "official_aliases",
    "official_name_of",
    "register_block",
    "unregister_block",
    "allowed_globals",
    "fused_forward",
    "checkpoint_allow_list",
    "torch_layers",
    "OFFICIAL_MODULES",
]

#: Modules of the reference code base whose classes may appear in a checkpoint.
OFFICIAL_MODULES = ("models.common", "models.yolo")

# Official location -> (our module, class name). Names are facts of the
# checkpoint format; the official file layout puts layers (and DFL/Proto) in
# models.common, heads and whole models in models.yolo.
_BUILTIN_ALIASES = [
    ("models.common", "blocks",
     ["Conv", "AConv", "ADown", "ELAN1", "RepConvN", "RepNBottleneck", "RepNCSP", "RepNCSPELAN4",
      "SP", "SPPELAN", "CBLinear", "CBFuse", "Silence", "Concat"]),
    ("models.common", "heads", ["DFL", "Proto"]),
    ("models.yolo", "heads",
     ["Detect", "DDetect", "DualDetect", "DualDDetect", "TripleDetect", "TripleDDetect",
      "Segment", "DSegment", "DualDSegment"]),
    ("models.yolo", "model", ["DetectionModel", "SegmentationModel"]),
]

_lock = threading.Lock()
_registered: dict[str, type] = {}  # official name -> user class (register_block)
_builtin_cache: dict[str, type] | None = None

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _builtin_aliases() -> dict[str, type]:
    # Imported lazily: the model modules import heavy pieces of fxrewrite and
    # this table is only needed when a checkpoint is actually read or written.
    global _builtin_cache
    if _builtin_cache is None:
        import importlib

        table: dict[str, type] = {}
        for official_module, ours, names in _BUILTIN_ALIASES:
            module = importlib.import_module(f"fxrewrite.yolov9.{ours}")
            for name in names:
                table[f"{official_module}.{name}"] = getattr(module, name)
        _builtin_cache = table
    return _builtin_cache


def official_aliases() -> dict[str, type]:
    """Official dotted name -> our class, including blocks added with :func:`register_block`."""
    with _lock:
        table = dict(_builtin_aliases())
        table.update(_registered)
    return table


def official_name_of(cls: type) -> str | None:
    """The official dotted name our class is saved under, or None if it has none."""
    for name, ours in official_aliases().items():
        if ours is cls:
            return name
    return None


def register_block(cls: type, official_name: str) -> None:
    """Teach the loader and saver a custom block class.

    ``official_name`` is the dotted name the training code pickles the block
    under, e.g. ``register_block(MyBlock, "models.common.MyBlock")``. ``cls``
    must be an ``nn.Module`` subclass whose attribute names match the pickled
    instances (the pickled ``__dict__`` is restored onto it without running
    ``__init__``). Registering the same pair twice is a no-op; reusing a name
    or a class for something else raises ``ValueError``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_block: {cls!r} is not an nn.Module subclass")
    if not isinstance(official_name, str) or not _DOTTED.match(official_name):
        raise ValueError(f"register_block: {official_name!r} is not a dotted name like 'models.common.MyBlock'")
    table = official_aliases()
    if table.get(official_name, cls) is not cls:
        raise ValueError(
            f"register_block: {official_name} already loads as {table[official_name].__qualname__}"
        )
    for name, ours in table.items():
        if ours is cls and name != official_name:
            raise ValueError(f"register_block: {cls.__qualname__} is already registered as {name}")
    with _lock:
        _registered[official_name] = cls


def unregister_block(official_name: str) -> None:
    """Undo :func:`register_block` (built-in aliases cannot be removed)."""
    with _lock:
        _registered.pop(official_name, None)


def _numpy_globals() -> dict[str, Any]:
    """numpy pieces that a plain ndarray/scalar needs (e.g. ``best_fitness`` in train_dual).

    Pickles made with numpy 1.x say ``numpy.core.multiarray``; numpy 2 says
    ``numpy._core.multiarray``. Both names are mapped to the functions we have.
    The per-dtype classes are listed because torch checks the *type* of each
    object it restores state into (a dtype's type is e.g. Float64DType).
    """
    try:
        import numpy as np
    except ImportError:  # numpy is optional; a checkpoint that needs it then fails with a clear name
        return {}
    try:
        multiarray = np._core.multiarray  # numpy >= 2
    except AttributeError:
        multiarray = np.core.multiarray
    found: dict[str, Any] = {
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
    }
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found[f"{prefix}._reconstruct"] = multiarray._reconstruct
        found[f"{prefix}.scalar"] = multiarray.scalar
    dtypes = getattr(np, "dtypes", None)
    for name in dir(dtypes) if dtypes is not None else ():
        obj = getattr(dtypes, name)
        if isinstance(obj, type) and name.endswith("DType"):
            found[f"numpy.dtypes.{name}"] = obj
    return found


def fused_forward(obj: Any, name: str) -> Any:
    """What ``builtins.getattr`` loads as: ``getattr`` limited to the two methods YOLOv9 pickles.

    The official ``fuse()`` sets ``block.forward = block.forward_fuse`` on each fused
    block (an instance attribute holding a bound method), and pickle writes such a
    method as ``getattr(block, "forward_fuse")``. The segmentation heads keep the
    detection head's forward function (``self.detect = DDetect.forward``), which
    pickle writes as ``getattr(DDetect, "forward")``. Such checkpoints reference
    ``builtins.getattr``; loading them calls this instead, which refuses any other
    name and any object that is not one of the YOLOv9 blocks (or, for ``forward``,
    block classes).
    """
    import pickle

    blocks = set(official_aliases().values())
    fused = name == "forward_fuse" and type(obj) in blocks and callable(getattr(type(obj), name, None))
    head_function = name == "forward" and isinstance(obj, type) and obj in blocks
    if not (fused or head_function):
        shown = obj.__name__ if isinstance(obj, type) else type(obj).__name__
        raise pickle.UnpicklingError(
            f"refused getattr({shown}, {name!r}): a YOLOv9 checkpoint may only refer to "
            "the forward_fuse method of its blocks and the forward function of their classes")
    return getattr(obj, name)


def torch_layers() -> dict[str, type]:
    """The torch layers YOLOv9 blocks and heads are made of, by their pickled names."""
    layers = [
        # containers and layers the official blocks and heads are made of
        nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.Upsample,
        nn.SyncBatchNorm,  # left in place by `train_dual.py --sync-bn` (DDP) checkpoints
        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
        nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Dropout,
        # activations a config may select (``activation: nn.ReLU()`` etc.)
        nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Sigmoid, nn.Mish, nn.GELU,
    ]
    return {f"{cls.__module__}.{cls.__qualname__}": cls for cls in layers}


def checkpoint_allow_list(aliases: dict[str, type] | None = None) -> "AllowList":
    """What :func:`fxrewrite.yolov9.checkpoint.load_checkpoint` accepts (see the module docstring).

    Built from the current registrations (:func:`register_block`) on each call;
    a later caller can widen it with ``.with_globals({...})``. ``aliases`` replaces
    the official names (and their twins) altogether: a trusted source tree's own
    classes (:meth:`fxrewrite.yolov9.fork.CodeTree.allow_list`).
    """
    from ..serialization import AllowList, standard_globals

    names: dict[str, Any] = standard_globals()
    names.update(torch_layers())
    names.update(official_aliases() if aliases is None else aliases)
    # Official layers carry their class path as a string label `type`, which shadows nn.Module.type.
    return AllowList(names, bound_methods={"forward": "forward_fuse"}, class_functions={"detect": "forward"},
                     data_overrides={"type": (str,)}, what="a YOLOv9 checkpoint")


def allowed_globals() -> dict[str, Any]:
    """Non-YOLO globals a reference checkpoint may reference, beyond torch's defaults, as the real objects.

    Only data-like classes are listed: constructing them (without ``__init__``)
    and restoring their ``__dict__`` runs no user code. (The loader itself uses
    :func:`checkpoint_allow_list`, which hands out checked stand-ins.)
    """
    allowed: dict[str, Any] = dict(torch_layers())
    # Standard-library containers and values in train_dual's top-level entries
    # ('opt' may carry paths on some code paths).
    allowed.update({
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        "pathlib.PosixPath": pathlib.PosixPath,
        "pathlib.PurePosixPath": pathlib.PurePosixPath,
        "pathlib.PureWindowsPath": pathlib.PureWindowsPath,
        # A WindowsPath cannot exist on POSIX: read it as its pure counterpart.
        "pathlib.WindowsPath": pathlib.WindowsPath if os.name == "nt" else pathlib.PureWindowsPath,
        "torch.Size": torch.Size,
        # fused blocks (official fuse()): forward = forward_fuse, pickled as getattr(block, "forward_fuse")
        "builtins.getattr": fused_forward,
    })
    allowed.update(_numpy_globals())
    return allowed
