"""``fxrewrite convert``: a YOLOv9 training checkpoint (or a shipped config) -> GELAN inference checkpoint.

Why this module is long: it holds the ``convert`` and ``draw`` commands and the option helpers
and checks ``export`` shares (image sizes, verification, safe model loading).

Writes ``OUT.pt`` (official layout, loads in the official detect.py/val.py/export.py),
``OUT.yaml`` (the derived config) and ``OUT.params.json`` (new tensor name -> original
name; with ``--fuse``, a fused tensor maps to the list of tensors it was computed from),
and with ``--safetensors`` also ``OUT.safetensors``. Nothing is written on
``--dry-run``, on any error, or when ``--verify`` fails (unless ``--keep-on-mismatch``);
no output is ever one of the inputs.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from ..errors import FxRewriteError
from ..io import OutputError, atomic_writes, check_output
from ..verify import VerifyReport
from .convert import Conversion, ConversionError, convert
from .inputs import MAX_IMAGE_SIZE, example_input

DEFAULT_VERIFY_SIZE = 640
#: --seed is a torch generator seed: an unsigned 64-bit integer.
MAX_SEED = 2**64 - 1
#: --nc: at most one class per output channel the config builder allows (model.MAX_CHANNELS).
MAX_CLASSES = 65_536


class OptionError(FxRewriteError, ValueError):
    """A command-line option's value does not fit the model (``--imgsz`` not a multiple of its stride)."""


class VerificationFailed(FxRewriteError, ValueError):
    """``--verify`` found outputs outside the tolerance (or NaN/Inf); the command exits non-zero."""


# -- options shared by the commands -------------------------------------------------------
def bounded_int(low: int, high: int):
    """An argparse ``type``: an integer from ``low`` to ``high``; argparse names the option in its error."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text}")
        return value

    parse.__name__ = "int"  # argparse's fallback message says "invalid int value"
    return parse


class _ImageSize(argparse.Action):
    """``--imgsz N`` or ``--imgsz H W``: one or two sides, each checked by the type."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) not in (1, 2):
            parser.error(f"argument --imgsz: takes N or H W (1 or 2 numbers), got {len(values)}")
        setattr(namespace, self.dest, list(values))


def add_image_size(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--imgsz", type=bounded_int(1, MAX_IMAGE_SIZE), nargs="+", action=_ImageSize,
                        default=[DEFAULT_VERIFY_SIZE], metavar="N",
                        help=f"{help}: N or H W, each a multiple of the model's largest stride, at most "
                             f"{MAX_IMAGE_SIZE} (default {DEFAULT_VERIFY_SIZE})")


def add_random_weight_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=0,
                        help="seed of the random weights with --config, 0 to 2**64-1 (default 0)")
    parser.add_argument("--nc", type=bounded_int(1, MAX_CLASSES),
                        help=f"class count with --config, 1 to {MAX_CLASSES:,} (default: the config's)")


def add_keep_on_mismatch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep-on-mismatch", action="store_true",
                        help="write the outputs even when --verify fails (the command still exits 1)")


def image_size(model: torch.nn.Module, imgsz: list[int]) -> tuple[int, int]:
    """``--imgsz`` as (H, W), checked against the model's largest stride before any work is done."""
    h, w = (imgsz[0], imgsz[0]) if len(imgsz) == 1 else (imgsz[0], imgsz[1])
    stride = int(torch.as_tensor(getattr(model, "stride", 32)).max().item())
    if h % stride or w % stride:
        fitting = [max(stride, round(side / stride) * stride) for side in imgsz]
        raise OptionError(f"--imgsz {' '.join(map(str, imgsz))}: each side must be a multiple of the model's largest "
                          f"stride ({stride}), e.g. --imgsz {' '.join(map(str, fitting))}")
    return h, w


def input_files(args: argparse.Namespace) -> list[Path]:
    """Every file a command reads: the one list the output checks compare every output with
    (an output may never be one of them, ``--force`` or not). A new input option adds its files here."""
    from ..rule_file import shipped_rules_dir
    from .config import resolve_config_path

    files = []
    if getattr(args, "input", None):
        files.append(Path(args.input))
    if getattr(args, "config", None):
        files.append(resolve_config_path(args.config))  # a shipped name is read from the package
    if getattr(args, "code", None):
        files.append(Path(args.code))  # a folder: no output may be inside the trusted source tree
    for name in getattr(args, "rules", None) or ():
        path = Path(name)
        shipped = shipped_rules_dir() / f"{name}.yaml"
        files.append(path if path.exists() or not shipped.is_file() else shipped)
    return files


def check_verification(reports: list[tuple[str, VerifyReport]], *, written: bool) -> None:
    """Raise :class:`VerificationFailed` naming every comparison that failed."""
    failed = [f"{what}: {report.summary()}" for what, report in reports if not report.passed]
    if failed:
        outcome = ("the outputs were written anyway (--keep-on-mismatch)" if written else
                   "nothing written (--keep-on-mismatch writes the outputs anyway)")
        raise VerificationFailed(f"--verify failed: {'; '.join(failed)}; {outcome}")


def verification_image(model: torch.nn.Module, size: tuple[int, int], batch: int = 1, *, seed: int = 0,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """The seeded random image batch ``--verify`` runs, in the model's input channels and weight dtype."""
    dtype = dtype or next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    return example_input(model, (size[0], size[1]), batch, dtype=dtype, generator=torch.Generator().manual_seed(seed))


CODE_EPILOG = (
    "A fork's checkpoint (its own blocks, edited heads, other layouts): --code PATH imports the classes the "
    "checkpoint names from that source tree, by their pickled module paths (models.common.X, models.yolo.Y), "
    "and only the classes the tree defines (never a function, never a name a module of it imports); the "
    "checkpoint itself stays untrusted and is loaded with the same checks. Every class comes from the fork, also "
    "those with an official name (a fork's edited DualDDetect or Conv); the rules build the fork's single-branch "
    "head (its DDetect); OUT.pt pickles the fork's classes at their module paths, so the fork's own detect.py and "
    "val.py load it; lines of the derived config the rules did not replace are kept verbatim (from renumbered). "
    "The tree is imported under its own package names only while the command runs. A head the shipped rules do "
    "not know (another class name) needs one rule: rules/examples/fork-renamed-head.yaml, applied with "
    "--rules FILE yolov9. --fuse is refused with --code (fusion builds fxrewrite's layers).")


# -- the commands ------------------------------------------------------------------------
def register(subparsers) -> None:
    """Add ``convert`` and ``draw``."""
    register_convert(subparsers)
    register_draw(subparsers)


def register_convert(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a YOLOv9 training checkpoint (auxiliary branch) into its GELAN inference model",
        description=__doc__.splitlines()[0], epilog=CODE_EPILOG)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("input", nargs="?", metavar="IN.pt", help="a train.py / train_dual.py checkpoint")
    source.add_argument("--config", metavar="NAME|YAML",
                        help="build the training model from a shipped config (e.g. yolov9-c) or a yaml file, "
                             "with seeded random weights (no download needed)")
    p.add_argument("-o", "--output", metavar="OUT.pt", help="the converted checkpoint (required unless --dry-run)")
    p.add_argument("--rules", nargs="+", metavar="FILE",
                   help="rule files to apply instead of the shipped yolov9 rules (shipped names work: yolov9)")
    p.add_argument("--code", metavar="PATH",
                   help="the trusted source tree IN.pt was trained with (the folder that holds models/, e.g. "
                        "'--code .' inside a fork): every class the checkpoint names is imported from it, the "
                        "rules build its classes, and OUT.pt pickles them at their module paths")
    p.add_argument("--verify", action="store_true",
                   help="before writing, compare the converted model with the training model's main output on a "
                        "random image (must be bitwise equal; with --fuse the fused model must be within the fp32 "
                        "fusion tolerance of docs/cli.md) and check that the derived config builds exactly the "
                        "converted model's tensors; on FAIL nothing is written and the exit status is 1")
    add_keep_on_mismatch(p)
    add_image_size(p, "verification image size")
    p.add_argument("--dry-run", action="store_true", help="print the layer map and write nothing")
    p.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16, as the official code)")
    p.add_argument("--safetensors", action="store_true", help="also write OUT.safetensors")
    p.add_argument("--fuse", action="store_true",
                   help="also fuse for deployment (rules/deploy.yaml, as the official fuse()): fold every BatchNorm "
                        "into its convolution and merge RepConvN branches")
    p.add_argument("--draw", metavar="DIR", help="write before.svg, after.svg and diff.svg to DIR")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    add_random_weight_options(p)
    p.set_defaults(func=run)


def register_draw(subparsers) -> None:
    d = subparsers.add_parser(
        "draw", help="draw a YOLOv9 model's graph before/after conversion, with the difference marked",
        description="Draw the graph of a YOLOv9 training model and what the conversion rules do to it. "
                    "The format follows the output's suffix: .svg, .png, .pdf or .dot.")
    source = d.add_mutually_exclusive_group(required=True)
    source.add_argument("input", nargs="?", metavar="IN.pt", help="a YOLOv9 checkpoint")
    source.add_argument("--config", metavar="NAME|YAML", help="a shipped config (e.g. yolov9-c) or a yaml file")
    d.add_argument("-o", "--output", required=True, metavar="FILE", help="the drawing (.svg, .png, .pdf, .dot)")
    view = d.add_mutually_exclusive_group()
    view.add_argument("--after", dest="view", action="store_const", const="after", help="only the rewritten graph")
    view.add_argument("--before", dest="view", action="store_const", const="before", help="only the original graph")
    view.add_argument("--side-by-side", dest="view", action="store_const", const="side_by_side",
                      help="before and after side by side")
    d.add_argument("--ops", action="store_true", help="one node per operation instead of one per layer")
    d.add_argument("--rules", nargs="+", metavar="FILE", help="rule files instead of the shipped yolov9 rules")
    d.add_argument("--param-table", action="store_true", help="add the parameter map (one row per module)")
    d.add_argument("--force", action="store_true", help="replace an existing output file")
    d.set_defaults(func=run_draw, view="overlay", seed=0, nc=None)


def _rule_set(files):
    if not files:
        return None
    from .. import load_rules

    rules = load_rules(files[0])
    for extra in files[1:]:
        rules = rules + load_rules(extra)
    return rules


def run_draw(args: argparse.Namespace) -> int:
    from ..draw import draw_rewrite
    from .convert import trace_and_rewrite
    from .drawing import layer_clusters, layer_rename

    out = Path(args.output)
    inputs = input_files(args)
    check_output(out, force=args.force, inputs=inputs)
    if out.suffix.lower() not in (".dot", ".gv"):  # without Graphviz the DOT source goes to OUT.dot instead
        check_output(out.with_suffix(".dot"), force=True, inputs=inputs)
    rules = _rule_set(args.rules)
    model, origin = load_model(args)
    result = trace_and_rewrite(model, rules, ops=args.ops)
    drawing = draw_rewrite(result, view=args.view, clusters=layer_clusters(result, model.yaml),
                           title=f"{Path(args.input).name if args.input else args.config}: {args.view.replace('_', ' ')}"
                                 f"{' (operations)' if args.ops else ''}",
                           param_table="module" if args.param_table else False, rename=layer_rename(result))
    drawing.save(out)
    print(f"source: {origin}")
    print(result.summary())
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    if not args.dry_run and not args.output:
        raise ValueError("convert: -o/--output is required (or use --dry-run)")
    inputs = input_files(args)
    outputs = _outputs(args)
    _check_outputs(outputs, args, inputs)  # refuse before doing any work; nothing is created yet
    started = time.perf_counter()
    if args.code and args.config:
        raise OptionError("--code goes with a checkpoint (IN.pt), not with --config")
    if args.code and args.fuse:  # the deployment rules build fxrewrite's layers, not the fork's
        raise OptionError("--fuse with --code: fusion would put fxrewrite's own layers into the fork's model; "
                          "convert without --fuse, then fuse with the fork's code (model.fuse())")
    classes = None
    if args.code:
        from .fork import CodeTree, fork_classes_of

        tree = CodeTree(args.code)
        model, origin = load_model(args, tree)
        classes = fork_classes_of(model, tree)
        from ..registry import using

        with using(classes.registry()):  # a rule file may name the fork's own classes
            rules = _rule_set(args.rules)
    else:
        rules = _rule_set(args.rules)
        model, origin = load_model(args, stored_precision=not (args.verify or args.fuse or args.safetensors))
    size = image_size(model, args.imgsz)  # before the conversion
    try:
        conversion = convert(model, rules, classes=classes)
    except ConversionError as exc:
        if "nothing to convert" in str(exc):
            print(f"{args.input or args.config}: {exc}; nothing written")
            return 0
        raise ConversionError(f"{args.input or args.config}: {exc}") from exc
    _print_summary(conversion, origin)
    reports: list[tuple[str, VerifyReport]] = []
    if args.verify:
        x = verification_image(model, size)
        report = conversion.verify(x)
        print(f"verify: {size[0]}x{size[1]} random image, converted vs training main output: {report.summary()}")
        reports.append(("converted vs training main output", report))
        notes = conversion.check_config()
        print(f"verify: the derived config builds exactly the converted model's "
              f"{len(conversion.model.state_dict()):,} tensors (names and shapes)")
        for note in notes:  # settings a config cannot say: the converted model keeps the checkpoint's
            print(f"verify: note: the converted model keeps its own settings where the derived config would "
                  f"build others: {note}")
    if args.fuse:
        conversion, fused_report = _fused(conversion, args, size)
        if fused_report is not None:
            reports.append(("fused vs converted", fused_report))
    if args.dry_run:
        check_verification(reports, written=False)
        print("dry run: nothing written")
        return 0
    if not args.keep_on_mismatch:
        check_verification(reports, written=False)
    written = _write_all(conversion, outputs, args, inputs)
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - started:.1f} s")
    check_verification(reports, written=True)
    return 0


def _check_outputs(outputs: dict[str, Path], args, inputs: list[Path]) -> None:
    """Every output checked against every input and for existence, creating nothing: a ``--draw``
    folder that does not exist yet is only made once the outputs are about to be written."""
    if args.draw and not args.dry_run:
        folder = Path(args.draw)
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"--draw {folder}: exists and is not a folder")
    for key, path in outputs.items():
        if key.startswith("draw-") and not path.parent.is_dir():
            continue  # a new folder: nothing in it can exist, nor be an input
        check_output(path, force=args.force, inputs=inputs)


def _write_all(c: Conversion, outputs: dict[str, Path], args, inputs: list[Path]) -> list[Path]:
    """The drawings (first: the likelier to fail, Graphviz), then the checkpoint files as one transaction;
    when the checkpoint cannot be written, the drawings and any folder made for them are removed."""
    drawn: list[Path] = []
    made: list[Path] = []
    existed: set[Path] = set()
    try:
        if args.draw:
            folder = Path(args.draw)
            made = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
            folder.mkdir(parents=True, exist_ok=True)
            existed = {p for key, p in outputs.items() if key.startswith("draw-") and p.exists()}
            drawn = _draw(c, folder, args.force, inputs)
        return _write(c, outputs, args, inputs) + drawn
    except BaseException:
        for path in drawn:  # no output at all when the checkpoint could not be written
            if Path(path) not in existed:
                Path(path).unlink(missing_ok=True)
        for folder in reversed(made):  # innermost first; only folders this run made, and only if empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _fused(c: Conversion, args, size: tuple[int, int]) -> tuple[Conversion, VerifyReport | None]:
    """The conversion with its model fused (rules/deploy.yaml); the parameter map then leads from the
    fused tensors to the training model's (a fused weight lists every tensor it was computed from)."""
    import dataclasses

    from .deploy import compose_param_maps, fuse, unfused_blocks

    fusion = fuse(c.model)
    print("fuse: " + "; ".join(str(entry) for entry in fusion.result.log))
    print(f"fuse: parameters {fusion.params_before:,} -> {fusion.params_after:,}")
    left = unfused_blocks(fusion.model)
    if left:
        print(f"fuse: WARNING: {len(left)} block(s) not reached by the rules: {', '.join(left[:5])}")
    report = None
    if args.verify:
        x = verification_image(c.model, size)
        report = fusion.verify(x)
        print(f"verify: {size[0]}x{size[1]} random image, fused vs converted: {report.summary()}")
    fused = dataclasses.replace(c, model=fusion.model, param_map=compose_param_maps(fusion.param_map, c.param_map))
    return fused, report


def _outputs(args) -> dict[str, Path]:
    if args.dry_run or not args.output:
        return {}
    out = Path(args.output)
    stem = out.with_suffix("")
    found = {"pt": out, "yaml": stem.with_suffix(".yaml"), "params": Path(f"{stem}.params.json")}
    if args.safetensors:
        found["safetensors"] = stem.with_suffix(".safetensors")
    if args.draw:
        found.update({f"draw-{name}": Path(args.draw) / f"{name}.svg" for name in ("before", "after", "diff")})
    return found


def load_model(args, code=None, *, stored_precision: bool = False) -> tuple[torch.nn.Module, str]:
    """The model a command reads: built from ``--config`` with random weights (seed ``--seed``), or
    loaded safely from the input checkpoint (fp32; with ``code``: that trusted source tree's classes);
    returns it in eval mode and a line saying where it came from.

    With ``stored_precision`` a checkpoint's weights stay as stored (fp16 for a ``best.pt``): for a
    command that only rearranges and writes them. Converting to fp32 and back is exact, so it would
    only copy every weight twice; verification, fusion and safetensors (which keeps the model's
    dtype) need fp32. The data is then read into memory rather than mapped: the outputs are written
    from it at the end, and a mapping would follow later changes of the input file.
    """
    if args.config:
        from .config import ConfigError, load_config
        from .model import model_class_for

        cfg = load_config(args.config)
        torch.manual_seed(args.seed)
        try:
            head = cfg["head"][-1][2]
        except (KeyError, IndexError, TypeError):  # a malformed config: the builder says what is wrong
            head = None
        cls = model_class_for(head if isinstance(head, (str, type)) else None)
        try:
            model = cls(cfg, nc=args.nc)
        except ConfigError as exc:  # built from a dict: name the file the dict came from
            raise ConfigError(exc.problem, source=exc.source or str(args.config), layer=exc.layer) from None
        randomise_batchnorm(model, args.seed, affine=True)
        return model.eval(), f"random weights (seed {args.seed}) built from config {args.config}"
    from .checkpoint import load_checkpoint

    if stored_precision:
        loaded = load_checkpoint(args.input, dtype=None, code=code)
    else:  # tensor data is read once, while converting to fp32
        loaded = load_checkpoint(args.input, mmap=True, code=code)
    stored = str(loaded.stored_dtype).replace("torch.", "") if loaded.stored_dtype else "unknown dtype"
    return loaded.model.eval(), f"{args.input}: '{loaded.weights}' weights ({stored}, epoch {loaded.epoch})"


def randomise_batchnorm(model: torch.nn.Module, seed: int, *, affine: bool = False) -> None:
    """Give every BatchNorm non-trivial running statistics, and with ``affine`` non-trivial weights and biases
    too, as training leaves them: so verification means something (a fold that dropped any of them
    changes the output). ``--config`` models get all four."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                shape = m.running_mean.shape
                m.running_mean.copy_(torch.randn(shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(shape, generator=gen) + 0.5)
                if affine and m.weight is not None:
                    m.weight.copy_(torch.rand(shape, generator=gen) + 0.5)
                if affine and m.bias is not None:
                    m.bias.copy_(torch.randn(shape, generator=gen) * 0.1)


def _print_summary(c: Conversion, origin: str) -> None:
    kept = len(c.model.model)
    print(f"source: {origin}")
    print(f"head: {c.head} -> {type(c.model.model[-1]).__name__}")
    print(f"layers: {len(c.source.model)} -> {kept} kept; pruned {_ranges(c.pruned) or 'none'}; "
          f"collapsed {_ranges(c.collapsed) or 'none'}")
    moved = {new: old for new, old in c.layer_map.items() if new != old}
    print(f"layer map (new <- old): {_layer_map_text(c.layer_map) if moved else 'unchanged'}")
    applied = [f"{log.rule} ({log.rewrites})" for log in c.result.log if log.rewrites]
    print(f"rules applied (rewrites): {', '.join(applied) or 'none'}")
    print(f"parameters: {c.params_before:,} -> {c.params_after:,}")


def _ranges(indices: list[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(indices):
        if start is None:
            start = v
        if i + 1 == len(indices) or indices[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}..{v}")
            start = None
    return ", ".join(parts)


def _layer_map_text(layer_map: dict[int, int]) -> str:
    groups, run = [], []
    for new, old in layer_map.items():
        if run and (new != run[-1][0] + 1 or old - new != run[-1][1] - run[-1][0]):
            groups.append(run)
            run = []
        run.append((new, old))
    groups.append(run)
    text = []
    for g in groups:
        (n0, o0), (n1, o1) = g[0], g[-1]
        text.append(f"{n0} <- {o0}" if n0 == n1 else f"{n0}..{n1} <- {o0}..{o1}")
    return ", ".join(text)


def _write(c: Conversion, outputs: dict[str, Path], args, inputs: list) -> list[Path]:
    """Write OUT.pt, (OUT.safetensors,) OUT.yaml and OUT.params.json as one transaction: every file goes
    to a temporary file first and all are renamed into place only once all were written, so a failure
    leaves no output (and, with --force, the previous outputs as they were)."""
    from .checkpoint import checkpoint_writer, safetensors_payload

    extra = {"fxrewrite": {"converted_from": str(args.input or args.config), "layer_map": c.layer_map,
                           "fused": bool(getattr(args, "fuse", False))}}
    contents: dict[str, object] = {
        "pt": checkpoint_writer(c.model, str(outputs["pt"]), half=not args.fp32, classes=c.classes, **extra),
        "yaml": yaml.safe_dump(c.config, sort_keys=False).encode(),
    }
    if "safetensors" in outputs:  # OUT.yaml is then the config the safetensors file is described by
        contents["safetensors"], contents["yaml"] = safetensors_payload(c.model, outputs["safetensors"].with_suffix(""))
    contents["params"] = json.dumps(c.param_map, indent=1).encode()
    keys = [k for k in ("pt", "safetensors", "yaml", "params") if k in outputs]
    with atomic_writes([outputs[k] for k in keys], force=args.force, inputs=inputs) as handles:
        for key, handle in zip(keys, handles):
            content = contents[key]
            if callable(content):
                content(handle)
            else:
                handle.write(content)
    return [outputs[k] for k in keys]


def _draw(c: Conversion, folder: Path, force: bool, inputs: list[Path]) -> list[Path]:
    from .drawing import write_conversion_drawings

    for name in ("before", "after", "diff"):  # the folder may be new: checked again now that it exists
        check_output(folder / f"{name}.svg", force=force, inputs=inputs)
    return write_conversion_drawings(c, folder, force=force)
