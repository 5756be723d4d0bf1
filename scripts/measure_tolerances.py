#!/usr/bin/env python3
"""Measure what fusion and export change in YOLOv9 outputs: the numbers behind fxrewrite.yolov9.tolerances.

    python3 scripts/measure_tolerances.py                     # yolov9-t,c,e; float32 at 640; float16 at 320
    python3 scripts/measure_tolerances.py --models t --dtype float16 --imgsz 640

For each model (built from its shipped config, seed 0, every BatchNorm's weight, bias,
running mean and variance randomised), it converts, fuses, exports to ONNX and to a
torch.export program, runs everything on one random image and prints, per comparison,
the largest absolute and relative difference, the smallest ``atol`` that would pass
with a few ``rtol`` values, and the share of the stated tolerance the worst value uses.
float16 runs PyTorch's CPU float16 kernels: slow (minutes per model at 640x640).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch


def flat(outputs) -> torch.Tensor:
    from torch.utils._pytree import tree_flatten

    return torch.cat([t.double().flatten() for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor)])


def report(case: str, expected, actual, stated) -> dict:
    from fxrewrite.verify import compare

    result = compare(expected, actual, stated)
    e, d = flat(expected), (flat(actual) - flat(expected)).abs()
    finite = d.isfinite()
    e, d = e[finite], d[finite]
    return {"case": case, "max_abs": result.max_abs_diff, "max_rel": result.max_rel_diff,
            "nonfinite": result.nonfinite, "verdict": result.verdict, "stated": str(stated),
            "used": float((d / (stated.atol + stated.rtol * e.abs())).max()) if d.numel() else 0.0,
            "atol_needed": {f"rtol={r:g}": float((d - r * e.abs()).clamp(min=0).max()) for r in (0, 1e-5, 1e-2)}}


def measure(name: str, dtype: torch.dtype, size: int) -> list[dict]:
    from fxrewrite.yolov9 import DetectionModel, convert
    from fxrewrite.yolov9.cli import randomise_batchnorm
    from fxrewrite.yolov9.deploy import fuse
    from fxrewrite.yolov9.export import onnx_bytes, pt2_bytes, reference_outputs, run_onnx, run_pt2
    from fxrewrite.yolov9.tolerances import export_tolerance, fusion_tolerance

    torch.manual_seed(0)
    training = DetectionModel(f"yolov9-{name}")
    randomise_batchnorm(training, 1, affine=True)  # what `--config` models get
    converted = convert(training.eval()).model.eval()
    fused = fuse(converted).model.eval()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dtype)
    half = dtype == torch.float16
    rows = []
    unfused = reference_outputs(converted, x)
    rows.append(report(f"yolov9-{name} {size} {dtype}: fused vs unfused", unfused, reference_outputs(fused, x),
                       fusion_tolerance(dtype)))
    for which, model in (("unfused", converted), ("fused", fused)):
        expected = reference_outputs(model, x)
        onnx_model = onnx_bytes(model, imgsz=size, half=half)
        rows.append(report(f"yolov9-{name} {size} {dtype}: ONNX Runtime vs PyTorch ({which})", expected,
                           run_onnx(onnx_model, x), export_tolerance(dtype)))
        program = pt2_bytes(model, imgsz=size, half=half)
        rows.append(report(f"yolov9-{name} {size} {dtype}: torch.export vs PyTorch ({which})", expected,
                           run_pt2(program, x), export_tolerance(dtype)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="t,c,e", help="yolov9 sizes, comma-separated (default t,c,e)")
    parser.add_argument("--dtype", choices=["float32", "float16", "both"], default="both")
    parser.add_argument("--imgsz", type=int, help="image size (default: 640 for float32, 320 for float16)")
    args = parser.parse_args(argv)
    dtypes = [torch.float32, torch.float16] if args.dtype == "both" else [getattr(torch, args.dtype)]
    warnings.filterwarnings("ignore")
    for name in args.models.split(","):
        for dtype in dtypes:
            size = args.imgsz or (640 if dtype == torch.float32 else 320)
            for row in measure(name.strip(), dtype, size):
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
