"""Reading and writing YOLOv9 training/inference checkpoints -- safely.

A checkpoint of the reference code is a ``torch.save`` zip whose ``data.pkl``
pickles the whole model object (``models.yolo.DetectionModel`` made of
``models.common.*`` blocks). Unpickling arbitrary files runs arbitrary code,
so :func:`load_checkpoint` never uses plain pickle and never imports the
reference code:

1. the file is checked structurally (exists, non-empty, a zip, has data.pkl);
2. the pickle's global references are listed *without executing anything*
   (``pickletools``) and vetted against :mod:`fxrewrite.yolov9.classes`, so the
   error can name what is wrong (an unknown block, an Ultralytics file, or a
   code-execution gadget such as ``os.system``);
3. only then ``torch.load(weights_only=True)`` restores it, with every official
   class name bound to our own re-implementation through
   ``torch.serialization.safe_globals([(OurClass, "models.common.Conv"), ...])``.

:func:`save_checkpoint` writes the reference layout back, naming our classes
by their official names, so the file also loads in the reference code.
"""
from __future__ import annotations

import _compat_pickle
import io
import json
import os
import pickle
import pickletools
import re
import types
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import torch
from torch import nn

from ..errors import FxRewriteError
from ..rebind import clone_module
from ..io import PathLike, atomic_writes, check_output
from .classes import allowed_globals, official_aliases

__all__ = ["CheckpointError", "LoadedCheckpoint", "load_checkpoint", "save_checkpoint", "save_safetensors"]

# How torch wrote files before the zip format (torch < 1.6): a pickled magic number first.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
#: Largest data.pkl record read (the pickle of the objects; tensor data lives in other records). A
#: yolov9-e training checkpoint's is a few megabytes.
MAX_PICKLE_BYTES = 100_000_000
#: How much more than 4x its size a (re-compressed) checkpoint's records may expand to when read.
MAX_EXPANSION_BYTES = 1 << 30
_REGISTER_HINT = "fxrewrite.yolov9.register_block"


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

    @property
    def epoch(self) -> Any:
        return self.entries.get("epoch")


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
def _plural(names: list[str]) -> str:
    return "is" if len(names) == 1 else "are"


def _check_container(path: Path, shown: str) -> None:
    """File-level problems, decided from the bytes alone."""
    if not path.exists():
        raise CheckpointError(f"{shown}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{shown}: is a directory, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{shown}: file is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if zipfile.is_zipfile(path):
        return
    if head.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"{shown}: truncated or corrupt zip archive (no end-of-archive record)")
    if head == _LEGACY_MAGIC:
        raise CheckpointError(
            f"{shown}: legacy (pre-1.6, non-zip) torch file format; it cannot be loaded safely, "
            "only torch.save zip checkpoints are supported"
        )
    if head[:1] == b"\x80":
        raise CheckpointError(f"{shown}: a plain pickle file, not a torch.save checkpoint; refused (nothing was executed)")
    raise CheckpointError(f"{shown}: not a torch checkpoint (not a zip archive)")


def _read_data_pkl(path: Path, shown: str, *, read: bool = True) -> bytes | None:
    """The checkpoint's pickle record, after refusing zip bombs and oversized pickles from the
    archive's directory; with ``read=False`` only those checks (None)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if not pickles:
                if any(n.endswith("/constants.pkl") for n in names):
                    raise CheckpointError(f"{shown}: a TorchScript archive, not a torch.save checkpoint")
                raise CheckpointError(f"{shown}: a zip archive but not a torch checkpoint (no data.pkl record)")
            declared = sum(info.file_size for info in archive.infolist())
            on_disk = path.stat().st_size
            if declared > 4 * on_disk + MAX_EXPANSION_BYTES:  # torch.save stores records uncompressed
                raise CheckpointError(f"{shown}: refused: its records would expand to {declared:,} bytes from a "
                                      f"{on_disk:,}-byte file (a zip bomb?)")
            size = archive.getinfo(pickles[0]).file_size  # zipfile never reads past it (a zip bomb stops there)
            if size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"{shown}: refused: its data.pkl record is {size:,} bytes, more than the "
                                      f"{MAX_PICKLE_BYTES:,} a model's pickle takes (tensors are stored apart)")
            return archive.read(pickles[0]) if read else None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise CheckpointError(f"{shown}: truncated or corrupt zip archive ({exc})") from None
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - damaged headers: a name that is not UTF-8, an unknown method...
        raise CheckpointError(f"{shown}: truncated or corrupt zip archive ({type(exc).__name__}: {exc})") from None


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def pickle_globals(data: bytes) -> set[str]:
    """Every global (``module.name``) a pickle refers to, found without unpickling it.

    ``GLOBAL``/``INST`` carry the name inline; for ``STACK_GLOBAL`` (protocol 4+)
    the two most recent strings are used, following the memo, which is how
    pickle itself builds them.
    """
    found: set[str] = set()
    strings: list[str] = []
    memo: dict[int, Any] = {}
    last: Any = None
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, qual = arg.partition(" ")
            # Protocol-2 pickles spell some stdlib names the Python 2 way
            # (``__builtin__ set``); pickle maps them back when loading, so do we.
            module, qual = _compat_pickle.NAME_MAPPING.get((module, qual), (module, qual))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            found.add(f"{module}.{qual}")
            last = None
        elif name in _STRING_OPS:
            last = arg.decode("latin-1") if isinstance(arg, bytes) else arg
            strings.append(last)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = last
        elif name == "MEMOIZE":
            memo[len(memo)] = last
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            last = memo.get(arg)
            if isinstance(last, str):
                strings.append(last)
        elif name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]) if len(strings) >= 2 else "<unresolved STACK_GLOBAL>")
            last = None
        else:
            last = None
    return found


def _torch_default_globals() -> set[str]:
    """Names torch's weights-only unpickler accepts on its own (tensors, storages, dtypes ...)."""
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except Exception:  # private API moved: fall back to trusting torch's own check
        return set()


def _vet_globals(found: set[str], shown: str) -> None:
    aliases = official_aliases()
    torch_defaults = _torch_default_globals()
    allowed = set(aliases) | set(allowed_globals()) | torch_defaults
    ultralytics = sorted(n for n in found if n.startswith("ultralytics."))
    if ultralytics:
        raise CheckpointError(
            f"{shown}: an Ultralytics checkpoint (it references {ultralytics[0]}); that is a different "
            "format from WongKinYiu/yolov9 checkpoints and is not supported"
        )
    unknown_blocks = sorted(n for n in found - allowed if n.startswith("models."))
    # If torch's own list is unknown (private API moved), leave torch.* names to torch's check.
    refused = sorted(
        n for n in found - allowed
        if not n.startswith("models.") and (torch_defaults or not n.startswith("torch."))
    )
    if refused:
        raise CheckpointError(
            f"{shown}: refused to load: the pickle references {', '.join(refused)}, which "
            f"{_plural(refused)} not allowed in a YOLOv9 checkpoint; nothing from the file was executed"
        )
    if unknown_blocks:
        example = unknown_blocks[0]
        raise CheckpointError(
            f"{shown}: the model uses block classes unknown to fxrewrite: {', '.join(unknown_blocks)}; "
            f"implement each as an nn.Module and register it before loading, e.g. "
            f"{_REGISTER_HINT}(MyBlock, {example!r})"
        )


def _explain_unpickling_error(exc: Exception, shown: str) -> CheckpointError:
    """Turn torch's weights-only refusal into our message (names the global when torch does)."""
    text = str(exc)
    match = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", text)
    if match:
        name = match.group(1)
        name = name if "." in name else f"builtins.{name}"  # torch strips the builtins prefix
        return CheckpointError(
            f"{shown}: refused to load: the pickle references {name}, which is not allowed in a "
            "YOLOv9 checkpoint; nothing from the file was executed"
        )
    # torch wraps the reason in a preamble about weights_only: report the reason itself
    reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    first = reason.group(1).strip() if reason else text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return CheckpointError(f"{shown}: refused to load: {first}; nothing from the file was executed")


def _safe_global_pairs() -> list[tuple[Any, str]]:
    pairs = [(cls, name) for name, cls in official_aliases().items()]
    pairs += [(obj, name) for name, obj in allowed_globals().items()]
    return pairs


def _torch_load(path: Path, shown: str, *, mmap: bool = False) -> Any:
    try:
        with torch.serialization.safe_globals(_safe_global_pairs()), warnings.catch_warnings():
            # torch warns about protocol-4 pickles on stderr; such a file loads or is refused like any other
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise _explain_unpickling_error(exc, shown) from None
    except RuntimeError as exc:
        # PytorchStreamReader errors (bad CRC, missing tensor record, short file)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise CheckpointError(f"{shown}: truncated or corrupt zip archive ({first})") from None
    except Exception as exc:  # noqa: BLE001
        # A malformed pickle whose names all passed the allow-list: the weights-only unpickler fails on
        # it with whatever its opcodes provoke (a memo key that is not there, an allowed function used as
        # a class, an index out of range...). Nothing was executed; the file is corrupt or crafted.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{shown}: corrupt or malformed pickle in data.pkl ({type(exc).__name__}"
                              f"{': ' + first if first else ''}); nothing from the file was executed") from None


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


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def load_checkpoint(path: PathLike, *, dtype: torch.dtype | None = torch.float32,
                    mmap: bool = False) -> LoadedCheckpoint:
    """Load a YOLOv9 checkpoint (train.py / train_dual.py layout) into our classes.

    Nothing from the file is executed and the reference code is not needed.
    The EMA weights are used when present (``weights == "ema"``), else
    ``model``. Floating-point weights are converted to ``dtype`` (float32 by
    default, as the reference loader does); ``dtype=None`` keeps them as stored.
    ``mmap=True`` maps tensor data from the file instead of reading it (copy on
    write: the file is never modified; it must not be replaced while the
    tensors are in use). Raises :class:`CheckpointError` naming the file and the problem.
    """
    shown = os.fspath(path)
    file = Path(shown)
    _check_container(file, shown)
    _read_data_pkl(file, shown, read=False)  # refuses zip bombs and oversized pickles before torch reads anything
    try:
        obj = _torch_load(file, shown, mmap=mmap)
    except CheckpointError:
        # torch's weights-only unpickler refused the file (it is the safety boundary: nothing ran).
        # Say precisely why: every global the pickle names, found without unpickling it, is vetted
        # (Ultralytics classes, unknown blocks listed with how to register them, refused gadgets).
        # Scanning only on failure keeps a sound file's load at one pass over its pickle.
        data = _read_data_pkl(file, shown)
        try:
            found = pickle_globals(data)
        except Exception as exc:  # genops: truncated or garbage opcode stream
            raise CheckpointError(f"{shown}: corrupt pickle in data.pkl ({exc})") from None
        _vet_globals(found, shown)
        raise
    model, which, entries = _pick_model(obj, shown)
    try:  # walks every module and tensor: a model unpickled from a crafted or damaged file may be malformed
        stored = _float_dtype(model)
        if dtype is not None:
            model = model.to(dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{shown}: the pickled model is malformed ({type(exc).__name__}"
                              f"{': ' + first if first else ''})") from None
    return LoadedCheckpoint(path=file, model=model, weights=which, entries=entries, stored_dtype=stored)


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
        # New Parameter objects over the same storage when the dtype already matches: no tensor
        # data is copied unless a conversion is needed.
        if isinstance(t, nn.Parameter):
            return nn.Parameter(t.detach().to(dtype) if t.is_floating_point() else t.detach(), requires_grad=False)
        return t.to(dtype) if t.is_floating_point() else t.clone()

    frozen = clone_module(model, tensor_fn=frozen_tensor)  # new modules: the caller's are never touched
    frozen = frozen.half() if half else frozen.float()  # also the head's plain stride/anchor tensors
    for p in frozen.parameters():
        p.requires_grad_(False)
    for m in frozen.modules():
        cls = type(m)
        label = m.__dict__.get("type")
        if cls in official_names and label == f"{cls.__module__}.{cls.__qualname__}":
            m.type = official_names[cls]
    return frozen


class _FirstWriteError:
    """A binary file that remembers the first exception its ``write`` raised."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle
        self.error: BaseException | None = None

    def write(self, data) -> int:
        try:
            return self._handle.write(data)
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


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


def checkpoint_writer(model: nn.Module, shown: str, *, half: bool = True, **extra: Any) -> Callable[[BinaryIO], None]:
    """What :func:`save_checkpoint` writes, as a function of a binary file; nothing is written yet.

    The model is checked (every class must have an official name) and frozen
    (fp16 copy) now, so most errors come before any output is opened; the
    returned function pickles the checkpoint into the file it is given. Lets a
    caller write the checkpoint together with other files in one
    :func:`fxrewrite.io.atomic_writes` transaction. ``shown`` names the output in errors.
    """
    clash = {"model", "ema"} & set(extra)
    if clash:
        raise TypeError(f"save_checkpoint: {', '.join(sorted(clash))} cannot be passed as an extra entry")
    official_names = {cls: name for name, cls in official_aliases().items()}
    loadable = set(allowed_globals()) | _torch_default_globals() | set(official_names.values())
    _check_saveable(model, official_names, loadable, shown)

    ckpt = {
        "model": _fp16_copy(model, official_names, half),
        "ema": None,
        "optimizer": None,
        "updates": None,
        "best_fitness": None,
        "epoch": -1,
        **extra,
    }
    pickle_module = _pickle_module(official_names, loadable)

    def write(handle: BinaryIO) -> None:
        recorder = _FirstWriteError(handle)
        try:
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
