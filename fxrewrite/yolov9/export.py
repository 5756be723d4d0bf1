"""``fxrewrite export``: a YOLOv9 checkpoint -> ONNX (and/or a ``torch.export`` program, ``.pt2``).

Why this module is long: the two export formats share preparation, size checks and
verification, and the ``export`` command runs them; one file keeps that path readable.

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
from ..io import atomic_write, atomic_writes, check_output
from ..verify import VerifyReport, compare
from .inputs import MAX_IMAGE_SIZE, example_input
from .tolerances import export_tolerance

__all__ = ["ExportError", "Prepared", "prepare", "export_onnx", "export_pt2", "onnx_bytes", "pt2_bytes",
           "export_mode", "run_onnx", "run_pt2", "verify_export", "DEFAULT_OPSET", "SINGLE_HEADS"]

DEFAULT_OPSET = 17
#: Opsets ``--opset`` accepts. Below 11, ONNX's Resize does not follow PyTorch's interpolation (torch warns; 7 and
#: 8 cannot export the upsampling layers at all); above 20 torch's TorchScript-based exporter is unsupported.
MIN_OPSET, MAX_OPSET = 11, 20
#: Largest ``--batch``: the example batch is traced, and run twice more with ``--verify`` (about 20 MB of
#: activations per 640x640 image for yolov9-c; ``--batch 1025`` at 640 needed more than 21 GB).
MAX_BATCH = 64
#: Largest example batch in pixels (``--batch`` x H x W): 64 images of 640x640.
MAX_EXAMPLE_PIXELS = 64 * 640 * 640
#: Upper bound of a dynamic ``.pt2`` program's batch dimension (the exported program, not the example).
MAX_DYNAMIC_BATCH = 1024
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
    conversion: Any = None  # the Conversion when the input had a training head
    fusion: Any = None  # the Fusion with fuse=True

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
    conversion = fusion = None
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
    return Prepared(model.eval(), converted, fuse, notes, conversion, fusion)


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
    return example_input(model, _size(imgsz), batch, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _size(imgsz: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(imgsz, int):
        return imgsz, imgsz
    if len(imgsz) not in (1, 2):
        raise ExportError(f"--imgsz takes N or H W, not {len(imgsz)} numbers")
    return (imgsz[0], imgsz[0]) if len(imgsz) == 1 else (imgsz[0], imgsz[1])


def _check_size(model: nn.Module, imgsz) -> tuple[int, int]:
    h, w = _size(imgsz)
    stride = int(torch.as_tensor(model.stride).max().item())
    if h <= 0 or w <= 0 or h % stride or w % stride or max(h, w) > MAX_IMAGE_SIZE:
        raise ExportError(f"image size {h}x{w} must be positive multiples of the model's largest stride ({stride}), "
                          f"at most {MAX_IMAGE_SIZE}")
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


def onnx_bytes(model: nn.Module, *, imgsz: Sequence[int] | int = 640, batch: int = 1, dynamic: bool = False,
               half: bool = False, opset: int = DEFAULT_OPSET, shown: str = "ONNX export") -> bytes:
    """``model`` (an inference model: see :func:`prepare`) as a checked ONNX model, serialised.

    ``dynamic`` makes batch, height and width dynamic; ``half`` exports fp16
    weights and input. The model is left as it was (flags, dtype, anchor cache).
    """
    onnx = _need("onnx", "ONNX export")
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
            raise ExportError(f"{shown}: ONNX export failed: {first}") from exc
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    for key, value in (("stride", int(torch.as_tensor(work.stride).max().item())),
                       ("names", getattr(work, "names", None))):
        if value is not None:
            meta = proto.metadata_props.add()
            meta.key, meta.value = key, str(value)
    return proto.SerializeToString()


def export_onnx(model: nn.Module, path: str | Path, *, imgsz: Sequence[int] | int = 640, batch: int = 1,
                dynamic: bool = False, half: bool = False, opset: int = DEFAULT_OPSET, force: bool = False,
                inputs: Sequence[str | Path] = ()) -> Path:
    """Write ``model`` (an inference model: see :func:`prepare`) as ONNX to ``path``, atomically
    (see :func:`onnx_bytes`)."""
    _need("onnx", "ONNX export")
    check_output(path, force=force, inputs=inputs)
    data = onnx_bytes(model, imgsz=imgsz, batch=batch, dynamic=dynamic, half=half, opset=opset, shown=str(path))
    with atomic_write(path, force=force, inputs=inputs) as handle:
        handle.write(data)
    return Path(path).resolve()


def pt2_bytes(model: nn.Module, *, imgsz: Sequence[int] | int = 640, batch: int = 1, dynamic: bool = False,
              half: bool = False, shown: str = "torch.export") -> bytes:
    """``model`` as a ``torch.export`` ExportedProgram, serialised (``torch.export.save``).

    With ``dynamic``, the batch and the image height and width (as multiples of
    the largest stride) are dynamic; the head then rebuilds its anchors from the
    input shape (``dynamic`` flag), otherwise the anchors are constants of the program.
    """
    h, w = _check_size(model, imgsz)
    work = _as_dtype(model, torch.float16 if half else None)
    dtype = torch.float16 if half else torch.float32
    stride = int(torch.as_tensor(work.stride).max().item())
    # A dynamic dimension must not be traced at size 1 (torch.export specialises 0/1 sizes).
    x = example_image(work, [h, w], max(batch, 2) if dynamic else batch, dtype=dtype)
    shapes = None
    if dynamic:
        dim = torch.export.Dim
        shapes = {"x": {0: dim("batch", min=1, max=MAX_DYNAMIC_BATCH),
                        2: stride * dim("height", min=1, max=MAX_IMAGE_SIZE // stride),
                        3: stride * dim("width", min=1, max=MAX_IMAGE_SIZE // stride)}}
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
            raise ExportError(f"{shown}: torch.export failed: {first}") from exc
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def export_pt2(model: nn.Module, path: str | Path, *, imgsz: Sequence[int] | int = 640, batch: int = 1,
               dynamic: bool = False, half: bool = False, force: bool = False,
               inputs: Sequence[str | Path] = ()) -> Path:
    """Write ``model`` as a ``torch.export`` ExportedProgram to ``path``, atomically (see :func:`pt2_bytes`)."""
    check_output(path, force=force, inputs=inputs)
    data = pt2_bytes(model, imgsz=imgsz, batch=batch, dynamic=dynamic, half=half, shown=str(path))
    with atomic_write(path, force=force, inputs=inputs) as handle:
        handle.write(data)
    return Path(path).resolve()


def _as_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """``model``, or an fp16 copy of it (the caller's tensors stay as they are)."""
    if dtype is None:
        return model
    return copy.deepcopy(model).to(dtype)


def run_onnx(model: str | Path | bytes, x: torch.Tensor, *, threads: int | None = None) -> list[torch.Tensor]:
    """Run an exported model (a path, or the serialised model) in ONNX Runtime (CPU) on ``x``; the outputs
    as tensors."""
    ort = _need("onnxruntime", "running the ONNX model (--verify)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return [torch.from_numpy(o) for o in outputs]


def run_pt2(program: str | Path | bytes, x: torch.Tensor) -> Any:
    """Load a saved ExportedProgram (a path, or the serialised program) and run it on ``x``."""
    loaded = torch.export.load(io.BytesIO(program) if isinstance(program, bytes) else program)
    with torch.no_grad():
        return loaded.module()(x)


def reference_outputs(model: nn.Module, x: torch.Tensor) -> Any:
    """What the exported model must compute: ``model`` in export mode (fp16 copy for an fp16 ``x``)."""
    work = _as_dtype(model, torch.float16 if x.dtype == torch.float16 else None)
    with export_mode(work), torch.no_grad():
        return work(x)


def verify_export(model: nn.Module, exported: bytes, kind: str, x: torch.Tensor) -> VerifyReport:
    """Run the serialised export (``kind``: "onnx" or "pt2") and ``model`` on ``x``; compare every output
    with the stated export tolerance of ``x``'s dtype (:mod:`fxrewrite.yolov9.tolerances`)."""
    got = run_onnx(exported, x) if kind == "onnx" else run_pt2(exported, x)
    return compare(reference_outputs(model, x), got, export_tolerance(x.dtype))


# -- the command ----------------------------------------------------------------------
def register(subparsers) -> None:
    from .cli import add_image_size, add_keep_on_mismatch, add_random_weight_options, bounded_int

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
    add_image_size(p, "image size")
    p.add_argument("--batch", type=bounded_int(1, MAX_BATCH), default=1,
                   help=f"batch size of the example input, 1 to {MAX_BATCH} (default 1)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--half", action="store_true", help="fp16 weights and input")
    p.add_argument("--opset", type=bounded_int(MIN_OPSET, MAX_OPSET), default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    p.add_argument("--verify", action="store_true",
                   help="before writing, run each export (ONNX Runtime / the saved program) and the PyTorch model "
                        "on a random image and compare every output within the stated export tolerance of its "
                        "dtype (docs/cli.md); a training model's conversion must be bitwise and its fusion within "
                        "the fusion tolerance; on FAIL nothing is written and the exit status is 1")
    add_keep_on_mismatch(p)
    p.add_argument("--force", action="store_true", help="replace existing output files")
    add_random_weight_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .cli import check_verification, image_size, input_files, load_model, verification_image

    outputs = {kind: Path(p) for kind, p in (("onnx", args.onnx), ("pt2", args.pt2)) if p}
    if not outputs:
        raise ExportError("export: give --onnx OUT.onnx and/or --pt2 OUT.pt2")
    if args.onnx:
        _need("onnx", "ONNX export")
    if args.verify and args.onnx:
        _need("onnxruntime", "--verify of an ONNX export")
    h, w = args.imgsz if len(args.imgsz) == 2 else args.imgsz * 2
    if args.batch * h * w > MAX_EXAMPLE_PIXELS:
        raise ExportError(f"--batch {args.batch} --imgsz {' '.join(map(str, args.imgsz))}: {args.batch * h * w:,} "
                          f"pixels per example batch, at most {MAX_EXAMPLE_PIXELS:,} (64 images of 640x640): "
                          f"give a smaller batch or image size")
    inputs = input_files(args)
    for path in outputs.values():
        check_output(path, force=args.force, inputs=inputs)  # refuse before doing any work
    if len({p.resolve() for p in outputs.values()}) != len(outputs):
        raise ExportError(f"export: --onnx and --pt2 name the same file {args.onnx}")
    started = time.perf_counter()
    model, origin = load_model(args)
    size = image_size(model, args.imgsz)  # before the (slower) conversion
    prepared = prepare(model, fuse=args.fuse)
    print(f"source: {origin}")
    for note in prepared.notes:
        print(note)
    kw = dict(imgsz=list(size), batch=args.batch, dynamic=args.dynamic, half=args.half)
    payloads = {}
    if args.onnx:
        payloads["onnx"] = onnx_bytes(prepared.model, opset=args.opset, shown=args.onnx, **kw)
    if args.pt2:
        payloads["pt2"] = pt2_bytes(prepared.model, shown=args.pt2, **kw)
    reports = []
    if args.verify:
        h, w = size
        reports += _verify_preparation(prepared, model, size)
        x = verification_image(prepared.model, size, args.batch, seed=1,
                               dtype=torch.float16 if args.half else torch.float32)
        for kind, data in payloads.items():
            report = verify_export(prepared.model, data, kind, x)
            what = "ONNX Runtime vs PyTorch" if kind == "onnx" else "loaded ExportedProgram vs PyTorch"
            print(f"verify: {h}x{w} random image{f', batch {args.batch}' if args.batch > 1 else ''}, "
                  f"{'fp16' if args.half else 'fp32'}, {what}: {report.summary()}")
            reports.append((what, report))
        if not args.keep_on_mismatch:
            check_verification(reports, written=False)
    kinds = list(payloads)
    with atomic_writes([outputs[k] for k in kinds], force=args.force, inputs=inputs) as handles:
        for kind, handle in zip(kinds, handles):
            handle.write(payloads[kind])
    written = [outputs[k].resolve() for k in kinds]
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - started:.1f} s")
    check_verification(reports, written=True)
    return 0


def _verify_preparation(prepared: Prepared, model: nn.Module, size: tuple[int, int]) -> list:
    """The steps between the input model and the exported one: a conversion must be bitwise, a fusion
    within the fusion tolerance (fp32: the model is exported from its fp32 weights)."""
    from .cli import verification_image

    reports = []
    x = verification_image(model, size)
    h, w = size
    if prepared.conversion is not None:
        report = prepared.conversion.verify(x)
        print(f"verify: {h}x{w} random image, converted vs training main output: {report.summary()}")
        reports.append(("converted vs training main output", report))
    if prepared.fusion is not None:
        report = prepared.fusion.verify(x)
        print(f"verify: {h}x{w} random image, fused vs unfused: {report.summary()}")
        reports.append(("fused vs unfused", report))
    return reports
