"""``fxrewrite rewrite``: apply rule files to any torch model, given as ``package.module:factory``.

.. code-block:: text

    fxrewrite rewrite mypkg.models:resnet18 --rules fuse-conv-bn -o fused.pt \\
        --example-input 1,3,224,224 --verify --draw drawings/

``MODULE_SPEC`` names code the user trusts, as ``--code`` does: ``package.module:factory``
(imported like any module on ``sys.path``; the current folder is searched first) or
``path/to/file.py:factory``. ``factory`` is a function or class called with no arguments,
or an ``nn.Module`` instance; dots reach into attributes (``models:Zoo.small``). The model
is put in eval mode (folding a BatchNorm needs it) and traced at op granularity
(:func:`fxrewrite.trace`), with ``--example-input`` shapes (seeded random inputs) when
given; the rules (``--rules``, repeatable: a file or a shipped rule set) are applied in order.

The output (``-o OUT.pt``) is a ``torch.save`` of ``{"module": GraphModule, "param_map":
{tensor: origin}}`` (with ``--state-dict``: ``{"state_dict": ..., "param_map": ...}``, which
``torch.load(weights_only=True)`` reads; a GraphModule is pickled by reference to the model's
classes and loads with ``weights_only=False``, so only from where you trust it). It is written
all-or-nothing and never over an input (the module file, the rule files).

``--verify`` runs the model and the rewritten module on the example inputs and compares the
outputs (``fxrewrite.verify``): bitwise when no tensor was computed, within ``--rtol`` /
``--atol`` (default 1e-5 / 1e-6 times the largest output) when one was (a folded BatchNorm).
On a mismatch nothing is written and the exit status is 1. ``--draw DIR`` writes
``before.svg``, ``after.svg`` and ``diff.svg`` in the same output set as ``OUT.pt``: all are
published, or none (and ``DIR`` is made only then).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from .errors import FxRewriteError


class ModuleSpecError(FxRewriteError, ValueError):
    """A ``MODULE_SPEC`` that cannot be imported or does not give a module."""


class VerificationFailed(FxRewriteError, ValueError):
    """``--verify`` found outputs that differ."""


def register(subparsers) -> None:
    p = subparsers.add_parser("rewrite", help="apply rule files to any torch model (package.module:factory)",
                              description=__doc__.splitlines()[0])
    p.add_argument("spec", metavar="MODULE_SPEC", help="package.module:factory or path/to/file.py:factory")
    p.add_argument("--rules", action="append", required=True, metavar="FILE",
                   help="a rule file or a shipped rule set (fuse-conv-bn, ...); repeat to apply several in order")
    p.add_argument("-o", "--output", required=True, metavar="OUT.pt", help="where to save the rewritten module")
    p.add_argument("--example-input", action="append", metavar="SHAPE", default=[],
                   help="shape of an example input, e.g. 1,3,224,224 (repeat for several inputs); "
                        "records shapes and is what --verify runs")
    p.add_argument("--state-dict", action="store_true",
                   help="save the state_dict and parameter map instead of the pickled GraphModule")
    p.add_argument("--verify", action="store_true", help="compare outputs with the model's; exit 1 on a mismatch")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance of --verify")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance of --verify")
    p.add_argument("--draw", metavar="DIR", help="write before.svg, after.svg and diff.svg to DIR")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (never an input)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .engine import rewrite
    from .rule_file import load_rules
    from .tracing import trace
    from .io import atomic_writes, check_output
    from .verify import BITWISE, Tolerance, verify

    shapes = [parse_shape(s) for s in args.example_input]
    if args.verify and not shapes:
        raise ValueError("--verify needs --example-input (the inputs both models run on)")
    rule_files = [Path(r) for r in args.rules if Path(r).is_file()]
    ruleset = load_rules(args.rules[0])
    for more in args.rules[1:]:
        ruleset = ruleset + load_rules(more)
    model, source = load_module(args.spec)
    inputs = [p for p in (source, *rule_files) if p is not None]
    out = Path(args.output)
    check_output(out, force=args.force, inputs=inputs)  # before any work: a bad -o fails fast
    drawings = _drawing_folder(args.draw)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(*shape, generator=generator) for shape in shapes)
    try:
        gm = trace(model, *example)
    except Exception as exc:  # a model fx cannot trace: its message, not a traceback
        raise ModuleSpecError(f"{args.spec}: cannot trace the model: {type(exc).__name__}: "
                              f"{_first_line(exc)}") from None
    result = rewrite(gm, ruleset)
    print(result.summary())
    if args.verify:
        computed = any(isinstance(origin, tuple) for origin in result.param_map.values())
        tolerance = _tolerance(model, example, args, computed, BITWISE, Tolerance)
        report = verify(model, result.module, example, tolerance=tolerance)
        print(f"verify: {report.summary()}")
        if not report.passed:
            raise VerificationFailed(f"--verify failed: {report.summary()}; nothing was written")
    if args.state_dict:
        payload: dict[str, Any] = {"state_dict": result.module.state_dict(), "param_map": result.param_map}
    else:
        payload = {"module": result.module, "param_map": result.param_map}
    pictures = _render_drawings(result) if drawings is not None else {}
    paths = [out, *(drawings / name for name in pictures)]
    made = drawings is not None and not drawings.exists()
    if made:
        drawings.mkdir(parents=True)
    try:
        # The model and its drawings are one output set: all of them are published, or none.
        with atomic_writes(paths, force=args.force, inputs=inputs) as handles:
            torch.save(payload, handles[0])
            for handle, data in zip(handles[1:], pictures.values()):
                handle.write(data)
    except BaseException:
        if made and not any(drawings.iterdir()):
            drawings.rmdir()
        raise
    print("wrote", ", ".join(str(p) for p in paths))
    return 0


def _render_drawings(result) -> dict[str, bytes]:
    """``before``, ``after`` and ``diff`` as SVG, rendered in memory (as DOT source when Graphviz's
    ``dot`` is missing, said on stderr) so that they are written with the model, all or nothing."""
    from .draw import GraphvizMissing, draw_rewrite

    pictures = {stem: draw_rewrite(result, view=view) for stem, view in
                (("before", "before"), ("after", "after"), ("diff", "overlay"))}
    try:
        return {f"{stem}.svg": drawing.pipe("svg") for stem, drawing in pictures.items()}
    except GraphvizMissing as exc:
        print(f"fxrewrite: {exc}; writing the DOT sources instead", file=sys.stderr)
        return {f"{stem}.dot": drawing.source.encode() for stem, drawing in pictures.items()}


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``; a clear error otherwise."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape) or _numel(shape) > 2**28:
        raise ValueError(f"--example-input {text!r}: expected positive dimensions such as 1,3,224,224 "
                         f"(at most {2**28:,} values)")
    return shape


def load_module(spec: str):
    """The ``nn.Module`` a ``MODULE_SPEC`` gives, and the file it came from (an input of the run)."""
    from torch import nn

    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ModuleSpecError(f"{spec}: expected package.module:factory or path/to/file.py:factory")
    try:
        if where.endswith(".py") or "/" in where or "\\" in where:
            path = Path(where)
            if not path.is_file():
                raise ModuleSpecError(f"{spec}: no such file {where}")
            loader = importlib.util.spec_from_file_location(f"_fxrewrite_user_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[loader.name] = module
            loader.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # python -m does the same: modules of the current folder import
            module = importlib.import_module(where)
    except ModuleSpecError:
        raise
    except Exception as exc:
        raise ModuleSpecError(f"{spec}: cannot import {where}: {type(exc).__name__}: {_first_line(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModuleSpecError(f"{spec}: {where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise ModuleSpecError(f"{spec}: {attr} is neither an nn.Module nor callable")
        try:
            obj = obj()
        except Exception as exc:
            raise ModuleSpecError(f"{spec}: calling {attr}() failed: {type(exc).__name__}: {_first_line(exc)}") from None
        if not isinstance(obj, nn.Module):
            raise ModuleSpecError(f"{spec}: {attr}() returned a {type(obj).__name__}, not an nn.Module")
    source = getattr(module, "__file__", None)
    return obj, Path(source) if source else None


def _drawing_folder(folder: str | None) -> Path | None:
    """The ``--draw`` folder (made only once there is something to draw in it)."""
    if folder is None:
        return None
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--draw {folder}: exists and is not a folder")
    return path


def _tolerance(model, example, args, computed: bool, bitwise, tolerance_cls):
    if args.rtol is None and args.atol is None and not computed:
        return bitwise
    import torch
    from torch.utils._pytree import tree_flatten

    with torch.no_grad():
        values = [t for t in tree_flatten(model(*example))[0] if isinstance(t, torch.Tensor)]
    scale = max((float(t.abs().max()) for t in values if t.numel()), default=1.0)
    return tolerance_cls(atol=args.atol if args.atol is not None else 1e-6 * max(scale, 1.0),
                         rtol=args.rtol if args.rtol is not None else 1e-5)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""
