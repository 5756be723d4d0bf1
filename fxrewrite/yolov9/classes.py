"""Which pickled names a YOLOv9 checkpoint may contain, and what they load as.

A training checkpoint of the reference code (WongKinYiu/yolov9) pickles whole
model objects, so it names classes by their import path in that code base:
``models.common.Conv``, ``models.yolo.DualDDetect``, ``models.yolo.DetectionModel``
... We never import that code. Instead:

* :func:`official_aliases` maps each official dotted name to *our*
  re-implementation (``fxrewrite.yolov9.blocks`` / ``heads`` / ``model``); the
  saver writes our classes back under the official names. The names come from the
  block catalogue (:mod:`fxrewrite.yolov9.catalogue`, re-exported here), as does
  :func:`register_block`, which adds a user-written class for a custom block.
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
"""
from __future__ import annotations

import collections
import os
import pathlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .catalogue import official_aliases, official_name_of, register_block, unregister_block

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
