"""The tolerances ``--verify`` holds YOLOv9 models to, per dtype, and the measurements behind them.

A **conversion** only removes and renames layers: the converted model computes the
training model's main output with the same operations on the same tensors, so it must
be bitwise equal (:data:`CONVERSION`). **Fusion** and **export** change the arithmetic
(a folded BatchNorm rounds differently, ONNX Runtime has kernels of its own), so they
are held to ``|diff| <= atol + rtol * |expected|`` per value (:data:`FUSION`,
:data:`EXPORT`), and NaN or Inf fails whatever the tolerance (see :mod:`fxrewrite.verify`).

>>> import torch
>>> str(fusion_tolerance(torch.float32)), str(export_tolerance(torch.float16))
('|diff| <= 0.0001 + 1e-05 * |expected|', '|diff| <= 0.01 + 0.05 * |expected|')
"""
from __future__ import annotations

import torch

from ..errors import VerifyError
from ..verify import BITWISE, Tolerance

__all__ = ["CONVERSION", "FUSION", "EXPORT", "MEASUREMENTS", "fusion_tolerance", "export_tolerance", "markdown"]

#: A conversion: bitwise, whatever the dtype.
CONVERSION = BITWISE

#: Fused vs unfused model, by the dtype both run in.
FUSION = {
    torch.float32: Tolerance(atol=1e-4, rtol=1e-5),
    torch.float16: Tolerance(atol=1e-2, rtol=5e-2),
}

#: An ONNX model (in ONNX Runtime) or a torch.export program vs the PyTorch model it was exported from,
#: by the dtype of the export (``--half``: float16).
EXPORT = {
    torch.float32: Tolerance(atol=1e-4, rtol=1e-5),
    torch.float16: Tolerance(atol=1e-2, rtol=5e-2),
}

#: How the tolerances were chosen (Markdown; also printed in docs/cli.md).
MEASUREMENTS = """\
Measured with `scripts/measure_tolerances.py` on yolov9-t, -c and -e built from their
configs (seed 0) with every BatchNorm's weight, bias, running mean and variance
randomised, converted, fused and exported (opset 17), on one random image (float32:
640x640; float16, PyTorch's float16 CPU kernels being slow: 640x640 for t, 320x320 for
c and e), on the project's 2-core CPU machine. Largest absolute / relative difference
over every output value, and (float32) in brackets the share of the stated tolerance
the worst value uses, `max(|diff| / (atol + rtol * |expected|))`:

| comparison | dtype | yolov9-t | yolov9-c | yolov9-e |
| --- | --- | --- | --- | --- |
| fused vs unfused | float32 | 1.2e-4 / 2.9e-6 (0.07) | 6.1e-5 / 3.0e-6 (0.06) | 9.2e-5 / 2.9e-6 (0.08) |
| fused vs unfused | float16 | 0.5 / 1.2e-2 | 0.25 / 1.3e-2 | 0.25 / 1.3e-2 |
| ONNX Runtime vs PyTorch | float32 | 1.8e-4 / 1.2e-2 (0.18) | 1.2e-4 / 1.3e-2 (0.11) | 1.5e-4 / 1.3e-2 (0.11) |
| ONNX Runtime vs PyTorch | float16 | 0.5 / 1.3e-2 | 0.25 / 1.3e-2 | 0.5 / 1.3e-2 |
| torch.export program vs PyTorch | both | 0 (bitwise) | 0 (bitwise) | 0 (bitwise) |

The outputs are decoded predictions, `[batch, 4 + nc, anchors]`: box coordinates in
pixels (up to the image size, where neighbouring float32 values are 6e-5 apart and
float16 values 0.5 apart) and class probabilities in [0, 1]; segmentation models add
mask coefficients and prototypes. The large relative differences are on values near
zero, the large absolute ones on the largest box coordinates: `rtol` covers the
rounding of large values, `atol` that of small ones. In every float32 case each value
was within `1e-5 * |expected| + 1.2e-7`, in every float16 case within
`1e-2 * |expected| + 3e-8`: the float32 tolerance is used to at most 0.18 (a margin of
5x), the float16 one to less than 0.2 by that bound. A real error is far outside them:
a BatchNorm left out of a fold moves outputs by more than 1 (tests/yolov9/test_fusion_numerics.py),
and exporting a wrong branch changes whole predictions.
"""


def _for(table: dict, dtype: torch.dtype, what: str) -> Tolerance:
    if dtype == torch.float64:  # more exact than float32: the float32 tolerance is an upper bound
        dtype = torch.float32
    try:
        return table[dtype]
    except KeyError:
        raise VerifyError(f"no stated {what} tolerance for {str(dtype).replace('torch.', '')} "
                          f"(stated: float32, float16); pass one explicitly") from None


def fusion_tolerance(dtype: torch.dtype) -> Tolerance:
    """The stated tolerance of a fused model against the unfused one, running in ``dtype``."""
    return _for(FUSION, dtype, "fusion")


def export_tolerance(dtype: torch.dtype) -> Tolerance:
    """The stated tolerance of an export (ONNX, torch.export) in ``dtype`` against its PyTorch model."""
    return _for(EXPORT, dtype, "export")


def markdown() -> str:
    """The ``--verify`` section of docs/cli.md: what each command compares, the tolerances, the measurements."""
    def cell(tolerance: Tolerance) -> str:  # a pipe inside a table cell is escaped, even in code
        return f"`{tolerance}`".replace("|", "\\|")

    rows = [("converted vs the training model's main output (`convert --verify`; `export --verify` of a "
             "training model)", cell(CONVERSION), cell(CONVERSION)),
            ("fused vs unfused (`convert --fuse --verify`, `export --fuse --verify`)",
             cell(FUSION[torch.float32]), cell(FUSION[torch.float16])),
            ("ONNX Runtime / loaded torch.export program vs PyTorch (`export --verify`; `--half`: float16)",
             cell(EXPORT[torch.float32]), cell(EXPORT[torch.float16]))]
    lines = [
        "## `--verify`: what is compared, and the tolerances", "",
        "Every `--verify` runs before anything is written. It compares every output value of the two models on "
        "a seeded random image (`--imgsz`) and prints one line per comparison: `PASS` or `FAIL`, the largest "
        "absolute and the largest relative difference, and the tolerance required. A value passes when "
        "`|diff| <= atol + rtol * |expected|`; NaN or Inf anywhere in either output fails, except NaN in both "
        "outputs at the same positions. On `FAIL` the command writes nothing and exits with status 1; with "
        "`--keep-on-mismatch` it writes the outputs and still exits with status 1.", "",
        "| comparison | float32 | float16 |", "| --- | --- | --- |",
        *[f"| {what} | {f32} | {f16} |" for what, f32, f16 in rows], "",
        "The tolerances are `fxrewrite.yolov9.tolerances` (`fxrewrite.verify.Tolerance`).", "",
        MEASUREMENTS.rstrip(),
    ]
    return "\n".join(lines) + "\n"
