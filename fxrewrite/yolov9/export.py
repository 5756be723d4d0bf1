"""``fxrewrite export``: a YOLOv9 checkpoint -> ONNX (and/or a ``torch.export`` program, ``.pt2``).

The input is a training checkpoint (converted on the fly: only the main branch
is exported), an already converted or fused one, or ``--config NAME`` (random
weights, no download). With ``--fuse`` the deployment rules (``rules/deploy.yaml``)
fold BatchNorms and merge RepConvN branches first.

As the official ``export.py``: the head's ``export`` flag makes it return only
its decoded predictions, ``dynamic`` rebuilds the anchor grid from the input
shape, and the ONNX graph (TorchScript-based exporter, constant folding) has one
input ``images`` and one output ``output0`` of shape ``[batch, 4 + nc, anchors]``
(segmentation heads add ``output1``). Every output is written atomically.
Needs the optional packages ``onnx`` (export) and ``onnxruntime`` (``--verify``):
``pip install 'fxrewrite[export]'``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..errors import FxRewriteError
from ..io import atomic_write, check_output

__all__ = ["ExportError", "Prepared", "prepare", "export_onnx", "export_pt2", "export_mode", "run_onnx",
           "DEFAULT_OPSET", "SINGLE_HEADS"]

DEFAULT_OPSET = 17
#: Heads of inference models (one branch): exported as they are. Any other head is converted first.
SINGLE_HEADS = ("Detect", "DDetect", "Segment", "DSegment")
INSTALL_HINT = "pip install 'fxrewrite[export]'"


class ExportError(FxRewriteError, ValueError):
    """The model cannot be exported as asked (missing optional package, bad image size, ...)."""


@dataclass
class Prepared:
    """The model to export and how it was obtained from the input."""

    model: nn.Module
    converted: bool = False
    fused: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def stride(self) -> int:
        return int(torch.as_tensor(self.model.stride).max().item())


def prepare(model: nn.Module, *, fuse: bool = False) -> Prepared:
    """The inference model to export from ``model``: converted if it has a multi-branch (training) head,
    fused with ``rules/deploy.yaml`` when ``fuse``; in eval mode. ``model`` itself is not modified."""
    from .convert import convert
    from .deploy import fuse as fuse_model, unfused_blocks

    notes = []
    head = type(model.model[-1]).__name__
    converted = head not in SINGLE_HEADS
    if converted:
        conversion = convert(model)
        model = conversion.model
        notes.append(f"converted: {conversion.head} -> {type(model.model[-1]).__name__}, "
                     f"{len(conversion.source.model)} -> {len(model.model)} layers, "
                     f"parameters {conversion.params_before:,} -> {conversion.params_after:,}")
    if fuse:
        fusion = fuse_model(model)
        model = fusion.model
        notes.append("fused: " + "; ".join(str(entry) for entry in fusion.result.log)
                     + f"; parameters {fusion.params_before:,} -> {fusion.params_after:,}")
        left = unfused_blocks(model)
        if left:
            notes.append(f"WARNING: {len(left)} block(s) not fused: {', '.join(left[:5])}")
    return Prepared(model.eval(), converted, fuse, notes)


_HEAD_STATE = ("export", "dynamic", "shape", "anchors", "strides")


def _heads(model: nn.Module) -> list[nn.Module]:
    """The detection heads (modules with the official ``export`` switch and pyramid levels)."""
    return [m for m in model.modules() if hasattr(type(m), "export") and hasattr(m, "nl")]


@contextlib.contextmanager
def export_mode(model: nn.Module, *, dynamic: bool = False) -> Iterator[nn.Module]:
    """Set the heads' ``export`` (and ``dynamic``) flags as the official export does; restore them, and
    the anchor cache an export may have overwritten (``torch.export`` leaves fake tensors), after."""
    heads = _heads(model)
    saved = [(m, {k: m.__dict__[k] for k in _HEAD_STATE if k in m.__dict__}) for m in heads]
    for m in heads:
        m.export, m.dynamic = True, dynamic
    try:
        yield model
    finally:
        for m, state in saved:
            for key in _HEAD_STATE:
                if key in state:
                    setattr(m, key, state[key])
                elif key in m.__dict__:
                    delattr(m, key)


def example_image(model: nn.Module, imgsz: Sequence[int], batch: int = 1, *, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random image batch of the model's input channels; ``imgsz`` is ``[N]`` or ``[H, W]``."""
    h, w = _size(imgsz)
    ch = int(getattr(model, "yaml", {}).get("ch", 3))
    return torch.rand(batch, ch, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _size(imgsz: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(imgsz, int):
        return imgsz, imgsz
    if len(imgsz) not in (1, 2):
        raise ExportError(f"--imgsz takes N or H W, not {len(imgsz)} numbers")
    return (imgsz[0], imgsz[0]) if len(imgsz) == 1 else (imgsz[0], imgsz[1])


def _check_size(model: nn.Module, imgsz) -> tuple[int, int]:
    h, w = _size(imgsz)
    stride = int(torch.as_tensor(model.stride).max().item())
    if h <= 0 or w <= 0 or h % stride or w % stride:
        raise ExportError(f"image size {h}x{w} must be positive multiples of the model's largest stride ({stride})")
    return h, w


def _need(package: str, what: str) -> Any:
    try:
        return __import__(package)
    except ImportError:
        raise ExportError(f"{what} needs the optional package '{package}' ({INSTALL_HINT})") from None


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence what the TorchScript tracer says about the anchor cache (it is constant per shape, or
    rebuilt from the traced shape with ``dynamic``) and the legacy exporter's deprecation notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        yield


def _output_names(model: nn.Module, x: torch.Tensor) -> list[str]:
    with torch.no_grad():
        y = model(x)
    count = len(y) if isinstance(y, (tuple, list)) else 1
    return [f"output{i}" for i in range(count)]


def export_onnx(model: nn.Module, path: str | Path, *, imgsz: Sequence[int] | int = 640, batch: int = 1,
                dynamic: bool = False, half: bool = False, opset: int = DEFAULT_OPSET, force: bool = False,
                inputs: Sequence[str | Path] = ()) -> Path:
    """Write ``model`` (an inference model: see :func:`prepare`) as ONNX to ``path``, atomically.

    ``dynamic`` makes batch, height and width dynamic; ``half`` exports fp16
    weights and input. The model is left as it was (flags, dtype, anchor cache).
    """
    onnx = _need("onnx", "ONNX export")
    check_output(path, force=force, inputs=inputs)
    h, w = _check_size(model, imgsz)
    work = _as_dtype(model, torch.float16 if half else None)
    x = example_image(work, [h, w], batch, dtype=torch.float16 if half else torch.float32)
    with export_mode(work, dynamic=dynamic), _quiet_tracing():
        with torch.no_grad():
            for _ in range(2):  # dry runs, as the official export (fills the anchor cache)
                work(x)
        names = _output_names(work, x)
        axes = None
        if dynamic:
            axes = {"images": {0: "batch", 2: "height", 3: "width"}, names[0]: {0: "batch", 2: "anchors"}}
            axes.update({n: {0: "batch"} for n in names[1:]})
        buffer = io.BytesIO()
        try:
            torch.onnx.export(work, (x,), buffer, dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=["images"], output_names=names, dynamic_axes=axes)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"{path}: ONNX export failed: {first}") from exc
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    for key, value in (("stride", int(torch.as_tensor(work.stride).max().item())),
                       ("names", getattr(work, "names", None))):
        if value is not None:
            meta = proto.metadata_props.add()
            meta.key, meta.value = key, str(value)
    with atomic_write(path, force=force, inputs=inputs) as handle:
        handle.write(proto.SerializeToString())
    return Path(path).resolve()


def export_pt2(model: nn.Module, path: str | Path, *, imgsz: Sequence[int] | int = 640, batch: int = 1,
               dynamic: bool = False, half: bool = False, force: bool = False,
               inputs: Sequence[str | Path] = ()) -> Path:
    """Write ``model`` as a ``torch.export`` ExportedProgram (``torch.export.save``) to ``path``, atomically.

    With ``dynamic``, the batch and the image height and width (as multiples of
    the largest stride) are dynamic; the head then rebuilds its anchors from the
    input shape (``dynamic`` flag), otherwise the anchors are constants of the program.
    """
    check_output(path, force=force, inputs=inputs)
    h, w = _check_size(model, imgsz)
    work = _as_dtype(model, torch.float16 if half else None)
    dtype = torch.float16 if half else torch.float32
    stride = int(torch.as_tensor(work.stride).max().item())
    # A dynamic dimension must not be traced at size 1 (torch.export specialises 0/1 sizes).
    x = example_image(work, [h, w], max(batch, 2) if dynamic else batch, dtype=dtype)
    shapes = None
    if dynamic:
        dim = torch.export.Dim
        shapes = {"x": {0: dim("batch", min=1, max=1024),
                        2: stride * dim("height", min=1, max=max(4096 // stride, h // stride)),
                        3: stride * dim("width", min=1, max=max(4096 // stride, w // stride))}}
    with export_mode(work, dynamic=dynamic), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")
        with torch.no_grad():
            work(x)  # fill the anchor cache, so a static export does not assign it
        for head in _heads(work):  # constants of the program: stored whole, not as transposed views
            for key in ("anchors", "strides"):
                if isinstance(head.__dict__.get(key), torch.Tensor):
                    setattr(head, key, head.__dict__[key].contiguous())
        try:
            program = torch.export.export(work, (x,), dynamic_shapes=shapes)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"{path}: torch.export failed: {first}") from exc
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with atomic_write(path, force=force, inputs=inputs) as handle:
        handle.write(buffer.getvalue())
    return Path(path).resolve()


def _as_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """``model``, or an fp16 copy of it (the caller's tensors stay as they are)."""
    if dtype is None:
        return model
    return copy.deepcopy(model).to(dtype)


def run_onnx(path: str | Path, x: torch.Tensor, *, threads: int | None = None) -> list[torch.Tensor]:
    """Run an exported model in ONNX Runtime (CPU) on ``x``; the outputs as tensors."""
    ort = _need("onnxruntime", "running the ONNX model (--verify)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return [torch.from_numpy(o) for o in outputs]


# -- the command ----------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a YOLOv9 model (training or converted) to ONNX / torch.export",
                              description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("input", nargs="?", metavar="IN.pt",
                        help="a training checkpoint (converted on the fly) or a converted one")
    source.add_argument("--config", metavar="NAME|YAML",
                        help="build the model from a shipped config (e.g. yolov9-c, gelan-c) or a yaml file, "
                             "with seeded random weights (no download needed)")
    p.add_argument("--onnx", metavar="OUT.onnx", help="write the ONNX model here")
    p.add_argument("--pt2", metavar="OUT.pt2", help="write a torch.export ExportedProgram here")
    p.add_argument("--fuse", action="store_true",
                   help="fuse for deployment first (rules/deploy.yaml): fold BatchNorms, merge RepConvN branches")
    p.add_argument("--imgsz", type=int, nargs="+", default=[640], metavar="N", help="image size: N or H W (default 640)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input (default 1)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--half", action="store_true", help="fp16 weights and input")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--verify", action="store_true",
                   help="run the exported model (ONNX Runtime / the loaded program) on a random image and "
                        "compare with PyTorch")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights with --config (default 0)")
    p.add_argument("--nc", type=int, help="class count with --config (default: the config's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .cli import _load

    outputs = [Path(p) for p in (args.onnx, args.pt2) if p]
    if not outputs:
        raise ExportError("export: give --onnx OUT.onnx and/or --pt2 OUT.pt2")
    if args.onnx:
        _need("onnx", "ONNX export")
    if args.verify and args.onnx:
        _need("onnxruntime", "--verify of an ONNX export")
    inputs = [args.input] if args.input else []
    for path in outputs:
        check_output(path, force=args.force, inputs=inputs)  # refuse before doing any work
    started = time.perf_counter()
    model, origin = _load(args)
    _check_size(model, args.imgsz)  # before the (slower) conversion
    prepared = prepare(model, fuse=args.fuse)
    print(f"source: {origin}")
    for note in prepared.notes:
        print(note)
    kw = dict(imgsz=args.imgsz, batch=args.batch, dynamic=args.dynamic, half=args.half, force=args.force,
              inputs=inputs)
    written = []
    if args.onnx:
        written.append(export_onnx(prepared.model, args.onnx, opset=args.opset, **kw))
        if args.verify:
            _verify_onnx(prepared.model, args.onnx, args)
    if args.pt2:
        written.append(export_pt2(prepared.model, args.pt2, **kw))
        if args.verify:
            _verify_pt2(prepared.model, args.pt2, args)
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - started:.1f} s")
    return 0


def _reference(model: nn.Module, x: torch.Tensor, half: bool) -> torch.Tensor:
    work = _as_dtype(model, torch.float16 if half else None)
    with export_mode(work), torch.no_grad():
        y = work(x)
    return (y[0] if isinstance(y, (tuple, list)) else y).float()


def _verify_onnx(model: nn.Module, path: str, args) -> None:
    x = example_image(model, args.imgsz, args.batch, seed=1, dtype=torch.float16 if args.half else torch.float32)
    got = run_onnx(path, x)[0].float()
    diff = (got - _reference(model, x, args.half)).abs().max().item()
    h, w = x.shape[2:]
    print(f"verify: {h}x{w} random image, ONNX Runtime vs PyTorch: max abs diff {diff:.3g}")


def _verify_pt2(model: nn.Module, path: str, args) -> None:
    x = example_image(model, args.imgsz, args.batch, seed=1, dtype=torch.float16 if args.half else torch.float32)
    program = torch.export.load(path)
    with torch.no_grad():
        y = program.module()(x)
    got = (y[0] if isinstance(y, (tuple, list)) else y).float()
    diff = (got - _reference(model, x, args.half)).abs().max().item()
    h, w = x.shape[2:]
    print(f"verify: {h}x{w} random image, loaded ExportedProgram vs PyTorch: max abs diff {diff:.3g}")
