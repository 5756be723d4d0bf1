"""Reading and writing YOLOv9 training/inference checkpoints -- safely.

Why this module is long: loading and saving are the two halves of one file format (the same
pickled names, the same layer checks), kept together so that what is written is what is read.

A checkpoint of the reference code is a ``torch.save`` zip whose ``data.pkl``
pickles the whole model object (``models.yolo.DetectionModel`` made of
``models.common.*`` blocks). Unpickling arbitrary files runs arbitrary code,
so :func:`load_checkpoint` never uses plain pickle and never imports the
reference code. It reads the file with the core safe loader
(:func:`fxrewrite.serialization.load`: the C unpickler restricted to
:func:`~fxrewrite.yolov9.classes.checkpoint_allow_list`, every record's size
and CRC-32 checked, no constructor calls, bounded memory, data-only results),
which binds every official class name to our own re-implementation. When a
name is refused, every global the pickle references is listed without running
anything, so the message can say what is wrong: an unknown block (and how to
register it), an Ultralytics file, or a code-execution gadget such as
``os.system`` or ``models.common.os.system``. The loaded model's layer graph is
then checked (:func:`check_layers`): every layer's ``i`` is its position, its
``f`` points to earlier layers whose outputs the model keeps, and its config
lists the same layers.

:func:`save_checkpoint` writes the reference layout back, naming our classes
by their official names, so the file also loads in the reference code.

>>> import tempfile, torch
>>> from fxrewrite.yolov9 import DetectionModel
>>> torch.manual_seed(0) and None
>>> path = save_checkpoint(DetectionModel("gelan-t"), tempfile.mkdtemp() + "/gelan-t.pt")
>>> loaded = load_checkpoint(path)
>>> loaded.weights, loaded.stored_dtype, type(loaded.model).__name__
('model', torch.float16, 'DetectionModel')
"""
from __future__ import annotations

import _compat_pickle
import contextlib
import io
import json
import os
import pickle
import pickletools
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import torch
from torch import nn

from ..errors import FxRewriteError
from ..rebind import clone_module
from ..io import ErrorRecordingFile, PathLike, atomic_writes, check_output
from ..gcpause import paused
from ..serialization import LoadError, RefusedGlobal, load as safe_load, pickle_globals, standard_globals
from .classes import checkpoint_allow_list, official_aliases

__all__ = ["CheckpointError", "LoadedCheckpoint", "load_checkpoint", "save_checkpoint", "save_safetensors",
           "check_layers", "pickle_globals"]

#: Largest data.pkl record read (the pickle of the objects; tensor data lives in other records). A
#: yolov9-e training checkpoint's is about 1.2 MB.
MAX_PICKLE_BYTES = 100_000_000
_REGISTER_HINT = "fxrewrite.yolov9.register_block"
# Names that, as a middle part of a dotted name under models.*, show a module reached *through* the model's
# code (models.common.os.system) rather than a block class of it.
_NOT_MODEL_CODE = frozenset(getattr(sys, "stdlib_module_names", ())) | {"torch", "numpy", "yaml", "cv2", "PIL"}


class CheckpointError(FxRewriteError, ValueError):
    """A checkpoint cannot be read or written; the message names the file and the problem."""


@dataclass
class LoadedCheckpoint:
    """A loaded checkpoint: the model plus everything else that was stored beside it."""

    path: Path
    model: nn.Module
    #: which top-level entry the model came from: "ema" (preferred, as the reference loader does) or "model"
    weights: str
    #: the remaining top-level entries (epoch, opt, optimizer, best_fitness, git, date, ...)
    entries: dict[str, Any] = field(default_factory=dict)
    #: floating-point dtype of the weights as stored (fp16 for train.py/train_dual.py files)
    stored_dtype: torch.dtype | None = None
    #: the trusted source tree the classes came from (``load_checkpoint(code=...)``), else None
    code: Any = None

    @property
    def epoch(self) -> Any:
        return self.entries.get("epoch")


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
def _plural(names: list[str]) -> str:
    return "is" if len(names) == 1 else "are"


def _torch_default_globals() -> set[str]:
    """The torch-format names the loader accepts besides the YOLOv9 classes (tensors, storages, dtypes ...)."""
    return set(standard_globals())


def _is_block_name(name: str) -> bool:
    """``models.common.Conv`` could be a block class of the model's code; ``models.common.os.system`` cannot."""
    parts = name.split(".")
    last, middle = parts[-1], parts[1:-1]
    return (last[:1].isupper() and last.isidentifier() and "__" not in last
            and all(p.isidentifier() and p.islower() and p not in _NOT_MODEL_CODE for p in middle))


def _vet_globals(found: set[str], shown: str, allowed: Iterable[str] | None = None, code: Any = None) -> None:
    """Explain a refusal from every global the pickle names (raises; returns if nothing is wrong).

    ``allowed``: the names the loader accepted (default: the official ones); ``code``: the trusted
    source tree they came from (``--code``), if any."""
    allowed = set(checkpoint_allow_list().names() if allowed is None else allowed)
    ultralytics = sorted(n for n in found if n.startswith("ultralytics."))
    if ultralytics:
        raise CheckpointError(
            f"{shown}: an Ultralytics checkpoint (it references {ultralytics[0]}); that is a different "
            "format from WongKinYiu/yolov9 checkpoints and is not supported"
        )
    unknown = found - allowed
    unknown_blocks = sorted(n for n in unknown if n.startswith("models.") and _is_block_name(n))
    gadgets = sorted(n for n in unknown if n.startswith("models.") and not _is_block_name(n))
    refused = sorted(n for n in unknown if not n.startswith("models."))
    if refused:
        raise CheckpointError(
            f"{shown}: refused to load: the pickle references {', '.join(refused + gadgets)}, which "
            f"{_plural(refused + gadgets)} not allowed in a YOLOv9 checkpoint; nothing from the file was executed"
        )
    if gadgets:
        raise CheckpointError(
            f"{shown}: refused to load: the pickle references {', '.join(gadgets)}, which {_plural(gadgets)} not "
            f"{'a block class' if len(gadgets) == 1 else 'block classes'} of the model's code but "
            "something reached through it (a function, a module or an attribute); refused as unsafe; "
            "nothing from the file was executed"
        )
    if unknown_blocks and code is not None:
        raise CheckpointError(
            f"{shown}: the model uses {'a class' if len(unknown_blocks) == 1 else 'classes'} that the source tree "
            f"{code.shown} does not define: {', '.join(unknown_blocks)}; give --code the root of the tree the "
            "checkpoint was trained with (the folder that holds models/)"
        )
    if unknown_blocks:
        example = unknown_blocks[0]
        raise CheckpointError(
            f"{shown}: the model uses block classes unknown to fxrewrite: {', '.join(unknown_blocks)}; "
            "if you trust the code they come from, rerun with --code PATH_TO_THAT_REPO (the folder that holds "
            "models/; from Python: load_checkpoint(path, code=PATH)); library users may instead implement each "
            f"as an nn.Module and register it before loading, e.g. "
            f"{_REGISTER_HINT}({example.rsplit('.', 1)[1]}, {example!r})"
        )


def _explain_refusal(exc: RefusedGlobal, shown: str, allowed: Iterable[str] | None = None,
                     code: Any = None) -> CheckpointError:
    """The loader refused a name: list every global the pickle names (nothing runs) and say what is wrong."""
    try:
        found = pickle_globals(exc.pickle) | {exc.name}
    except Exception:  # noqa: BLE001 - genops on a truncated or garbage opcode stream: the first name is enough
        found = {exc.name}
    if code is None:
        _vet_globals(found, shown)  # the official names
    else:
        _vet_globals(found, shown, allowed, code)
    return CheckpointError(str(exc))


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _pick_model(obj: Any, shown: str) -> tuple[nn.Module, str, dict[str, Any]]:
    if _is_tensor_dict(obj):
        first = next(iter(obj))
        raise CheckpointError(
            f"{shown}: a bare state_dict ({len(obj)} tensors, e.g. {first!r}), not a checkpoint with a "
            "pickled model; build the model from its config and use load_state_dict instead"
        )
    if not isinstance(obj, dict):
        raise CheckpointError(f"{shown}: expected a checkpoint dict, found a {type(obj).__name__}")
    if "model" not in obj and "ema" not in obj:
        keys = ", ".join(map(str, obj)) or "none"
        raise CheckpointError(f"{shown}: checkpoint has no 'model' or 'ema' entry (top-level keys: {keys})")
    # The reference loader prefers the EMA weights whenever they were kept.
    which = "ema" if obj.get("ema") is not None else "model"
    model = obj.get(which)
    if model is None:
        raise CheckpointError(f"{shown}: checkpoint's 'model' entry is empty (None) and it has no 'ema' weights")
    if _is_tensor_dict(model):
        raise CheckpointError(
            f"{shown}: the {which!r} entry is a bare state_dict, not a pickled model; build the model "
            "from its config and use load_state_dict instead"
        )
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{shown}: the {which!r} entry is a {type(model).__name__}, not a pickled model")
    entries = {k: v for k, v in obj.items() if k not in ("model", "ema")}
    return model, which, entries


def check_layers(model: nn.Module, shown: str, which: str = "model") -> None:
    """Refuse a YOLOv9 model whose layer graph contradicts itself; say which layer, which index and why.

    The model runs layer after layer, each reading the outputs its ``f`` names
    (-1: the previous layer; other negative numbers count back from it; others
    are absolute indices), and keeps a layer's output only if its ``i`` is in
    ``model.save``. So every ``i`` must equal its position, every ``f`` must name
    an earlier layer whose output is kept, and the config (``model.yaml``) must
    list the same layers with the same ``from`` entries. Models that are not
    YOLOv9 layer graphs (no ``yaml``, no ``model`` layer list) are not checked.
    """
    state = model.__dict__
    config = state.get("yaml")
    layers = state.get("_modules", {}).get("model")
    if config is None and not isinstance(layers, nn.Sequential):
        return  # not a YOLOv9 layer graph (a custom block saved alone, ...)

    def inconsistent(problem: str) -> CheckpointError:
        return CheckpointError(f"{shown}: the checkpoint's {which!r} model is inconsistent: {problem}")

    if not isinstance(layers, nn.Sequential) or not len(layers):
        raise inconsistent(f"it has a config but no layer list (its 'model' is a {type(layers).__name__})")
    if not isinstance(config, dict) or not isinstance(config.get("backbone"), list) \
            or not isinstance(config.get("head"), list):
        raise inconsistent("its config (yaml) is not a mapping with 'backbone' and 'head' lists of layers")
    rows = config["backbone"] + config["head"]
    if len(rows) != len(layers):
        raise inconsistent(f"its config (yaml) lists {len(rows)} layers but the model has {len(layers)}; "
                           "the config does not describe these weights")
    save = state.get("save")
    if not isinstance(save, (list, tuple, set)) or not all(type(j) is int for j in save):
        raise inconsistent("its list of kept layer outputs (save) is missing or not a list of layer indices")
    kept = set(save)
    for position, layer in enumerate(layers):
        name = f"layer {position} ({type(layer).__name__})"
        index, source = layer.__dict__.get("i"), layer.__dict__.get("f")
        if type(index) is not int or index != position:
            raise inconsistent(f"{name} says it is layer {index!r} (its 'i'); the model would keep the wrong outputs")
        sources = [source] if type(source) is int else source if type(source) in (list, tuple) else None
        if not sources or not all(type(j) is int for j in sources):
            raise inconsistent(f"{name} reads {source!r:.40} (its 'f'), which is not a layer index or a list of them")
        for j in sources:
            if j == -1:
                continue
            target = position + j if j < 0 else j
            if target < 0:
                raise inconsistent(f"{name} reads layer {j} (its 'f'), which would be before the first layer")
            if target >= position:
                raise inconsistent(f"{name} reads layer {j} (its 'f'), which is not before it; a layer can only read "
                                   "the outputs of earlier layers")
            if target not in kept:
                raise inconsistent(f"{name} reads layer {target}, whose output the model does not keep "
                                   "(it is not in model.save)")
        row = rows[position]
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise inconsistent(f"config row {position} is not [from, number, module, args]")
        if row[0] != source and list(row[0] if isinstance(row[0], (list, tuple)) else [row[0]]) != sources:
            raise inconsistent(f"{name} reads {source!r} (its 'f') but its config row says from {row[0]!r:.40}")


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def load_checkpoint(path: PathLike, *, dtype: torch.dtype | None = torch.float32,
                    mmap: bool = False, code: Any = None) -> LoadedCheckpoint:
    """Load a YOLOv9 checkpoint (train.py / train_dual.py layout) into our classes.

    Nothing from the file is executed and the reference code is not needed.
    The EMA weights are used when present (``weights == "ema"``), else
    ``model``. Floating-point weights are converted to ``dtype`` (float32 by
    default, as the reference loader does); ``dtype=None`` keeps them as stored.
    ``mmap=True`` maps tensor data from the file instead of reading it (copy on
    write: the file is never modified; it must not be changed in place while the
    tensors are in use). Every tensor's record is checked (size, CRC-32) either
    way. Raises :class:`CheckpointError` naming the file and the problem.

    ``code``: the root of the trusted source tree the checkpoint was trained with (a path
    or a :class:`~fxrewrite.yolov9.fork.CodeTree`): every class the file names is then the
    class that tree defines at that module path (fxrewrite's twins are never used), and
    only those classes, torch's layers and plain data are accepted
    (:mod:`fxrewrite.yolov9.fork`).
    """
    shown = os.fspath(path)
    file = Path(shown)
    tree = None
    allow = checkpoint_allow_list()
    if code is not None:
        from .fork import as_code_tree

        tree = as_code_tree(code)
        allow = tree.allow_list(_named_globals(file, shown))
    try:
        obj = safe_load(file, allow, mmap=mmap, shown=shown, max_pickle_bytes=MAX_PICKLE_BYTES)
    except RefusedGlobal as exc:
        raise _explain_refusal(exc, shown, allow.names(), tree) from None
    except LoadError as exc:
        raise CheckpointError(str(exc)) from None
    model, which, entries = _pick_model(obj, shown)
    check_layers(model, shown, which)
    try:  # walks every module and tensor: a model unpickled from a crafted or damaged file may be malformed
        stored = _float_dtype(model)
        if dtype is not None:
            model = model.to(dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{shown}: the pickled model is malformed ({type(exc).__name__}"
                              f"{': ' + first if first else ''})") from None
    return LoadedCheckpoint(path=file, model=model, weights=which, entries=entries, stored_dtype=stored, code=tree)


def _named_globals(file: Path, shown: str) -> set[str]:
    """Every global the checkpoint's pickle names, found without unpickling (the tree's classes among
    them are imported: only those are offered to the loader)."""
    from ..serialization.archive import TorchArchive

    try:
        with TorchArchive(file, shown=shown, max_pickle_bytes=MAX_PICKLE_BYTES) as archive:
            data = archive.pickle_bytes()
    except LoadError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        return pickle_globals(data)
    except Exception:  # noqa: BLE001 - a malformed opcode stream: the loader then says what is wrong
        return set()


# --------------------------------------------------------------------------- #
# Saving
# --------------------------------------------------------------------------- #
class _UnsaveableGlobal(Exception):
    """Raised inside the pickler; turned into a CheckpointError naming the output."""


def _pickle_module(official_names: dict[type, str], loadable: set[str]) -> types.ModuleType:
    """A stand-in ``pickle`` module for ``torch.save`` whose Pickler writes our classes under official names.

    torch.save subclasses nothing: it instantiates ``pickle_module.Pickler`` on a
    buffer, sets ``persistent_id`` (for tensor storages) and calls ``dump``. Our
    Pickler is the fast C pickler writing to a private buffer; ``dump`` then
    walks the opcodes once (``pickletools.genops``, no object is rebuilt) and
    rewrites every ``GLOBAL`` that names one of our classes to its official name.
    Any other global must be one the loader accepts, so a saved file always
    loads back. (A pure-Python pickler overriding ``save_global`` does the same
    but is several times slower on a large model.)
    """
    renames = {f"{cls.__module__}.{cls.__qualname__}": official for cls, official in official_names.items()}

    class Pickler(pickle.Pickler):
        def __init__(self, file, protocol=None, **kwargs):
            self._target = file
            self._buffer = io.BytesIO()
            super().__init__(self._buffer, protocol, **kwargs)
            if protocol is None or protocol > 3:  # GLOBAL opcodes only exist up to protocol 3
                raise ValueError("the official checkpoint layout is pickled with protocol 2 or 3")

        def dump(self, obj):
            super().dump(obj)
            data = self._buffer.getvalue()
            with paused():  # copying the memo makes a tuple per pickled object: no collections meanwhile
                renamed = _official_globals_by_memo(data, self.memo.copy(), renames, loadable)
            self._target.write(renamed if renamed is not None else _official_globals(data, renames, loadable))

    module = types.ModuleType("fxrewrite_official_pickle")
    module.Pickler = Pickler
    return module


def _official_globals_by_memo(data: bytes, memo: dict, renames: dict[str, str], loadable: set[str]) -> bytes | None:
    """:func:`_official_globals` without walking every opcode, or None when it cannot be sure.

    The C pickler memoizes every class and function it writes as a global, right after
    writing it: ``GLOBAL module\\nname\\n`` then ``BINPUT k`` (``LONG_BINPUT`` past 255),
    with ``k`` the object's index in ``memo``. So each class to rename is located by
    that exact byte sequence, which it writes once. When the sequence is not found
    exactly once (a string value might spell it out), when a global is neither renamed
    nor plainly loadable, or when a renamed class's name is left anywhere in GLOBAL
    form, the opcode walk decides instead.
    """
    edits = []
    for index, obj in memo.values():
        if not isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            continue
        module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if not isinstance(module, str) or not isinstance(qual, str):
            return None
        if "." in qual:  # a nested name is written as getattr(parent, name): both are memo entries of their own
            continue
        official = renames.get(f"{module}.{qual}")
        if official is None:
            if f"{module}.{qual}" not in loadable:
                return None  # the walk names it (or finds the pickle wrote it under another name)
            continue
        put = b"q" + bytes([index]) if index < 256 else b"r" + index.to_bytes(4, "little")
        written = b"c" + module.encode() + b"\n" + qual.encode() + b"\n"
        at = data.find(written + put)
        if at < 0 or data.find(written + put, at + 1) >= 0:
            return None
        o_module, _, o_qual = official.rpartition(".")
        edits.append((at, at + len(written), b"c" + o_module.encode() + b"\n" + o_qual.encode() + b"\n"))
    pieces, last = [], 0
    for start, end, replacement in sorted(edits):
        pieces += [data[last:start], replacement]
        last = end
    pieces.append(data[last:])
    result = b"".join(pieces)
    for dotted in renames:
        module, _, qual = dotted.rpartition(".")
        if b"c" + module.encode() + b"\n" + qual.encode() + b"\n" in result:
            return None
    return result


def _official_globals(data: bytes, renames: dict[str, str], loadable: set[str]) -> bytes:
    """``data`` with every GLOBAL opcode naming a renamed class rewritten; refuse unloadable globals."""
    pieces, last = [], 0
    for opcode, arg, pos in pickletools.genops(data):
        if opcode.name in ("STACK_GLOBAL", "INST", "OBJ"):
            raise _UnsaveableGlobal(f"a {opcode.name} opcode")
        if opcode.name != "GLOBAL":
            continue
        module, qual = arg.split(" ", 1)
        # Protocols < 3 write Python 2 names for builtins (__builtin__.set); compare the Python 3 ones.
        module, qual = _compat_pickle.NAME_MAPPING.get((module, qual), (module, qual))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        dotted = f"{module}.{qual}"
        official = renames.get(dotted)
        if official is None:
            if dotted not in loadable:
                raise _UnsaveableGlobal(dotted)
            continue
        end = data.index(b"\n", data.index(b"\n", pos + 1) + 1) + 1  # GLOBAL is c<module>\n<name>\n
        o_module, _, o_qual = official.rpartition(".")
        pieces += [data[last:pos], b"c" + o_module.encode() + b"\n" + o_qual.encode() + b"\n"]
        last = end
    pieces.append(data[last:])
    return b"".join(pieces)


def _fp16_copy(model: nn.Module, official_names: dict[type, str], half: bool = True) -> nn.Module:
    """fp16 (or fp32 with ``half=False``), frozen deep copy; the caller's module and tensors stay untouched.

    Layers carry an informational ``type`` label (their class path); on the copy
    it is rewritten to the official path, as the reference builder would set it.
    """
    dtype = torch.float16 if half else torch.float32

    def frozen_tensor(t: torch.Tensor) -> torch.Tensor:
        # New Parameter objects over the same storage when the dtype already matches: no tensor data is
        # copied except by the fp16 cast (integer buffers are shared too: pickling only reads them).
        if isinstance(t, nn.Parameter):
            return nn.Parameter(t.detach().to(dtype) if t.is_floating_point() else t.detach(), requires_grad=False)
        return t.to(dtype) if t.is_floating_point() else t

    frozen = clone_module(model, tensor_fn=frozen_tensor)  # new modules: the caller's are never touched
    frozen = frozen.half() if half else frozen.float()  # also the head's plain stride/anchor tensors
    stride = frozen.__dict__.get("stride")
    if isinstance(stride, torch.Tensor) and stride.is_floating_point() and stride.dtype != torch.float32:
        # The official layout: half() converts the head's strides, the model's own stays fp32 (a model
        # loaded in fp16 shares one stride tensor between the two).
        frozen.stride = stride.float()
    for p in frozen.parameters():
        p.requires_grad_(False)
    for m in frozen.modules():
        cls = type(m)
        label = m.__dict__.get("type")
        if cls in official_names and label == f"{cls.__module__}.{cls.__qualname__}":
            m.type = official_names[cls]
    return frozen


def _check_saveable(model: nn.Module, official_names: dict[type, str], loadable: set[str], shown: str) -> None:
    """Name every layer class that has no official name, before any work is done."""
    if type(model) not in official_names:
        raise CheckpointError(
            f"{shown}: cannot save a {type(model).__qualname__}: only models whose classes have official "
            "names (fxrewrite.yolov9 DetectionModel / SegmentationModel) can be saved in the YOLOv9 format"
        )
    missing = sorted({
        f"{type(m).__module__}.{type(m).__qualname__}"
        for m in model.modules()
        if type(m) not in official_names and f"{type(m).__module__}.{type(m).__qualname__}" not in loadable
    })
    if missing:
        raise CheckpointError(
            f"{shown}: cannot save: the model contains {', '.join(missing)}, which {_plural(missing)} neither an "
            f"official YOLOv9 class nor an allowed torch layer; register custom blocks with {_REGISTER_HINT}"
        )


def save_checkpoint(
    model: nn.Module,
    path: PathLike,
    *,
    force: bool = False,
    inputs: Iterable[PathLike] = (),
    half: bool = True,
    **extra: Any,
) -> Path:
    """Write ``model`` as a reference-layout inference checkpoint, atomically.

    Weights are stored in fp16 like the official code does (``half=False``: fp32).

    The file holds ``{'model': <fp16 model>, 'ema': None, 'optimizer': None,
    'updates': None, 'best_fitness': None, 'epoch': -1, **extra}`` (the layout
    the reference ``strip_optimizer`` produces). Our classes are pickled under
    their official names, so the pickle refers only to ``models.yolo.*``,
    ``models.common.*``, torch and standard-library names and loads both with
    :func:`load_checkpoint` and in the reference code. The caller's model is
    not modified. ``force`` allows replacing an existing file; ``inputs`` are
    paths the output must never overwrite. Returns the resolved output path.
    """
    shown = os.fspath(path)
    if {"model", "ema"} & set(extra):
        checkpoint_writer(model, shown, half=half, **extra)  # raises the TypeError
    check_output(path, force=force, inputs=inputs)  # fail before the (slow) copy and pickling
    write = checkpoint_writer(model, shown, half=half, **extra)
    with atomic_writes([path], force=force, inputs=inputs) as (handle,):
        write(handle)
    return Path(shown).expanduser().resolve()


def checkpoint_writer(model: nn.Module, shown: str, *, half: bool = True, classes: Any = None,
                      **extra: Any) -> Callable[[BinaryIO], None]:
    """What :func:`save_checkpoint` writes, as a function of a binary file; nothing is written yet.

    The model is checked (every class must have an official name) and frozen
    (fp16 copy) now, so most errors come before any output is opened; the
    returned function pickles the checkpoint into the file it is given. Lets a
    caller write the checkpoint together with other files in one
    :func:`fxrewrite.io.atomic_writes` transaction. ``shown`` names the output in errors.

    ``classes``: a fork's model (:class:`fxrewrite.yolov9.fork.ForkClasses`): its classes are
    pickled at their own module paths, with the fork's modules in place while pickling, so
    the fork's own code loads the file.
    """
    clash = {"model", "ema"} & set(extra)
    if clash:
        raise TypeError(f"save_checkpoint: {', '.join(sorted(clash))} cannot be passed as an extra entry")
    if classes is not None:
        official_names: dict[type, str] = {}
        pickle_module, saving = pickle, classes.active
    else:
        official_names = {cls: name for name, cls in official_aliases().items()}
        loadable = set(checkpoint_allow_list().names())
        _check_saveable(model, official_names, loadable, shown)
        pickle_module, saving = _pickle_module(official_names, loadable), contextlib.nullcontext

    ckpt = {
        "model": _fp16_copy(model, official_names, half),
        "ema": None,
        "optimizer": None,
        "updates": None,
        "best_fitness": None,
        "epoch": -1,
        **extra,
    }

    def write(handle: BinaryIO) -> None:
        recorder = handle if isinstance(handle, ErrorRecordingFile) else ErrorRecordingFile(handle, shown)
        try:
            with saving():
                torch.save(ckpt, recorder, pickle_module=pickle_module)
        except _UnsaveableGlobal as exc:
            raise CheckpointError(
                f"{shown}: cannot save: the checkpoint would reference {exc}, which load_checkpoint does not "
                "allow; nothing was written"
            ) from None
        except BaseException:
            # When writing fails (disk full, Ctrl-C), torch's zip writer fails again while closing the
            # archive and raises an "enforce fail ... unexpected pos" RuntimeError instead: report the cause.
            if recorder.error is not None:
                raise recorder.error from None
            raise

    return write


def save_safetensors(
    model: nn.Module,
    path_without_ext: PathLike,
    *,
    force: bool = False,
    inputs: Iterable[PathLike] = (),
) -> tuple[Path, Path]:
    """Write ``<path>.safetensors`` (the state_dict) and ``<path>.yaml`` (the model config).

    The tensors keep the model's dtype. ``nc``, ``names`` and ``stride`` go
    into the safetensors metadata (as JSON strings). Both files are written as
    one unit: either both appear or neither does. Needs the optional
    ``safetensors`` package.
    """
    base = os.fspath(path_without_ext)
    st_path, yaml_path = f"{base}.safetensors", f"{base}.yaml"
    for p in (st_path, yaml_path):
        check_output(p, force=force, inputs=inputs)
    payload, config_text = safetensors_payload(model, base)
    with atomic_writes([st_path, yaml_path], force=force, inputs=inputs) as (st_file, yaml_file):
        st_file.write(payload)
        yaml_file.write(config_text)
    return Path(st_path).resolve(), Path(yaml_path).resolve()


def safetensors_payload(model: nn.Module, path_without_ext: PathLike) -> tuple[bytes, bytes]:
    """The bytes :func:`save_safetensors` writes: ``(<path>.safetensors, <path>.yaml)``; nothing is written."""
    try:
        from safetensors.torch import save as safetensors_save
    except ImportError:
        raise CheckpointError(
            f"{os.fspath(path_without_ext)}: writing safetensors needs the optional package 'safetensors' "
            "(pip install 'fxrewrite[safetensors]')"
        ) from None
    import yaml

    st_path = f"{os.fspath(path_without_ext)}.safetensors"
    config = getattr(model, "yaml", None)
    if not isinstance(config, dict):
        raise CheckpointError(f"{st_path}: the model has no 'yaml' config dict to write beside the weights")

    # clone(): safetensors refuses tensors that share memory, and it must not see caller storage anyway
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    names = getattr(model, "names", None)
    stride = getattr(model, "stride", None)
    metadata = {"format": "pt", "config": json.dumps(config)}
    nc = getattr(model, "nc", None)  # set by training; a freshly built model only has it in its config
    nc = config.get("nc") if nc is None else nc
    if nc is not None:
        metadata["nc"] = json.dumps(int(nc))
    if names is not None:
        metadata["names"] = json.dumps(names if isinstance(names, (list, dict)) else list(names))
    if isinstance(stride, torch.Tensor):
        metadata["stride"] = json.dumps([float(s) for s in stride.tolist()])
    payload = safetensors_save(tensors, metadata=metadata)
    return payload, yaml.safe_dump(config, sort_keys=False).encode("utf-8")
