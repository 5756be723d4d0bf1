"""``fxrewrite convert``: a YOLOv9 training checkpoint (or a shipped config) -> GELAN inference checkpoint.

Writes ``OUT.pt`` (official layout, loads in the official detect.py/val.py/export.py),
``OUT.yaml`` (the derived config) and ``OUT.params.json`` (new tensor name -> original
name; with ``--fuse``, a fused tensor maps to the list of tensors it was computed from),
and with ``--safetensors`` also ``OUT.safetensors``. Nothing is written on
``--dry-run`` or on any error; an input is never overwritten.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from ..io import atomic_writes, check_output
from .convert import Conversion, ConversionError, convert

DEFAULT_VERIFY_SIZE = 640


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a YOLOv9 training checkpoint (auxiliary branch) into its GELAN inference model",
        description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("input", nargs="?", metavar="IN.pt", help="a train.py / train_dual.py checkpoint")
    source.add_argument("--config", metavar="NAME|YAML",
                        help="build the training model from a shipped config (e.g. yolov9-c) or a yaml file, "
                             "with seeded random weights (no download needed)")
    p.add_argument("-o", "--output", metavar="OUT.pt", help="the converted checkpoint (required unless --dry-run)")
    p.add_argument("--rules", nargs="+", metavar="FILE",
                   help="rule files to apply instead of the shipped yolov9 rules (shipped names work: yolov9)")
    p.add_argument("--verify", action="store_true",
                   help="compare the converted model with the training model's main output on random input, "
                        "and check that the derived config builds exactly the converted model's tensors")
    p.add_argument("--imgsz", type=int, nargs="+", default=[DEFAULT_VERIFY_SIZE], metavar="N",
                   help="verification image size: N or H W (default 640)")
    p.add_argument("--dry-run", action="store_true", help="print the layer map and write nothing")
    p.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16, as the official code)")
    p.add_argument("--safetensors", action="store_true", help="also write OUT.safetensors")
    p.add_argument("--fuse", action="store_true",
                   help="also fuse for deployment (rules/deploy.yaml, as the official fuse()): fold every BatchNorm "
                        "into its convolution and merge RepConvN branches")
    p.add_argument("--draw", metavar="DIR", help="write before.svg, after.svg and diff.svg to DIR")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights with --config (default 0)")
    p.add_argument("--nc", type=int, help="class count with --config (default: the config's)")
    p.set_defaults(func=run)

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
    from .drawing import layer_clusters

    out = Path(args.output)
    inputs = [args.input] if args.input else []
    check_output(out, force=args.force, inputs=inputs)
    if out.suffix.lower() not in (".dot", ".gv"):  # without Graphviz the DOT source goes to OUT.dot instead
        check_output(out.with_suffix(".dot"), force=True, inputs=inputs)
    model, origin = _load(args)
    result = trace_and_rewrite(model, _rule_set(args.rules), ops=args.ops)
    drawing = draw_rewrite(result, view=args.view, clusters=layer_clusters(result, model.yaml),
                           title=f"{Path(args.input).name if args.input else args.config}: {args.view.replace('_', ' ')}"
                                 f"{' (operations)' if args.ops else ''}",
                           param_table="module" if args.param_table else False)
    drawing.save(out)
    print(f"source: {origin}")
    print(result.summary())
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    if not args.dry_run and not args.output:
        raise ValueError("convert: -o/--output is required (or use --dry-run)")
    outputs = _outputs(args)
    inputs = [args.input] if args.input else []
    if args.draw and not args.dry_run:
        Path(args.draw).mkdir(parents=True, exist_ok=True)
        outputs.update({f"draw-{name}": Path(args.draw) / f"{name}.svg" for name in ("before", "after", "diff")})
    for path in outputs.values():
        check_output(path, force=args.force, inputs=inputs)  # refuse before doing any work
    started = time.perf_counter()
    model, origin = _load(args)
    try:
        conversion = convert(model, _rule_set(args.rules))
    except ConversionError as exc:
        if "nothing to convert" in str(exc):
            print(f"{args.input or args.config}: {exc}; nothing written")
            return 0
        raise ConversionError(f"{args.input or args.config}: {exc}") from exc
    _print_summary(conversion, origin)
    if args.verify:
        size = args.imgsz if len(args.imgsz) == 2 else args.imgsz * 2
        x = torch.rand(1, int(conversion.config.get("ch", 3)), *size, generator=torch.Generator().manual_seed(0))
        report = conversion.verify(x.to(next(model.parameters()).dtype))
        print(f"verify: {size[0]}x{size[1]} random image, converted vs training main output: {report}")
        if not report.equal and report.max_abs_diff > 0:
            print("verify: WARNING: outputs differ")
        conversion.check_config()
        print(f"verify: the derived config builds exactly the converted model's "
              f"{len(conversion.model.state_dict()):,} tensors (names and shapes)")
    if args.fuse:
        conversion = _fused(conversion, args)
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    drawn: list[Path] = []
    if args.draw:  # drawings first: they are the likelier to fail (Graphviz), and fail before the checkpoint
        existed = {p for key, p in outputs.items() if key.startswith("draw-") and p.exists()}
        drawn = _draw(conversion, Path(args.draw), args.force)
    try:
        written = _write(conversion, outputs, args, inputs)
    except BaseException:
        for path in drawn:  # no output at all when the checkpoint could not be written
            if Path(path) not in existed:
                Path(path).unlink(missing_ok=True)
        raise
    written += drawn
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - started:.1f} s")
    return 0


def _fused(c: Conversion, args) -> Conversion:
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
    if args.verify:
        size = args.imgsz if len(args.imgsz) == 2 else args.imgsz * 2
        x = torch.rand(1, int(c.config.get("ch", 3)), *size, generator=torch.Generator().manual_seed(0))
        report = fusion.verify(x.to(next(c.model.parameters()).dtype))
        print(f"verify: {size[0]}x{size[1]} random image, fused vs converted: {report} (floating-point rounding)")
    return dataclasses.replace(c, model=fusion.model, param_map=compose_param_maps(fusion.param_map, c.param_map))


def _outputs(args) -> dict[str, Path]:
    if args.dry_run or not args.output:
        return {}
    out = Path(args.output)
    stem = out.with_suffix("")
    found = {"pt": out, "yaml": stem.with_suffix(".yaml"), "params": Path(f"{stem}.params.json")}
    if args.safetensors:
        found["safetensors"] = stem.with_suffix(".safetensors")
    return found


def _load(args) -> tuple[torch.nn.Module, str]:
    if args.config:
        from .model import ConfigError, DetectionModel, SegmentationModel
        from .config import load_config

        cfg = load_config(args.config)
        torch.manual_seed(args.seed)
        try:
            head = str(cfg["head"][-1][2])
        except (KeyError, IndexError, TypeError):  # a malformed config: the builder says what is wrong
            head = ""
        cls = SegmentationModel if "Segment" in head else DetectionModel
        try:
            model = cls(cfg, nc=args.nc)
        except ConfigError as exc:  # built from a dict: name the file the dict came from
            raise ConfigError(exc.problem, source=exc.source or str(args.config), layer=exc.layer) from None
        randomise_batchnorm(model, args.seed)
        return model.eval(), f"random weights (seed {args.seed}) built from config {args.config}"
    from .checkpoint import load_checkpoint

    loaded = load_checkpoint(args.input, mmap=True)  # tensor data is read once, while converting to fp32
    stored = str(loaded.stored_dtype).replace("torch.", "") if loaded.stored_dtype else "unknown dtype"
    return loaded.model.eval(), f"{args.input}: '{loaded.weights}' weights ({stored}, epoch {loaded.epoch})"


def randomise_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial running statistics (so verification means something)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _print_summary(c: Conversion, origin: str) -> None:
    kept = len(c.model.model)
    print(f"source: {origin}")
    print(f"head: {c.head} -> {type(c.model.model[-1]).__name__}")
    print(f"layers: {len(c.source.model)} -> {kept} kept; pruned {_ranges(c.pruned) or 'none'}; "
          f"collapsed {_ranges(c.collapsed) or 'none'}")
    moved = {new: old for new, old in c.layer_map.items() if new != old}
    print(f"layer map (new <- old): {_layer_map_text(c.layer_map) if moved else 'unchanged'}")
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
        "pt": checkpoint_writer(c.model, str(outputs["pt"]), half=not args.fp32, **extra),
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


def _draw(c: Conversion, folder: Path, force: bool) -> list[Path]:
    from .drawing import write_conversion_drawings

    return write_conversion_drawings(c, folder, force=force)
