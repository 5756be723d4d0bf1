"""Models shared by test_deploy.py and test_export.py, built once per test session."""
from __future__ import annotations

import functools

import torch

from fxrewrite.yolov9 import DetectionModel, convert
from fxrewrite.yolov9.cli import randomise_batchnorm
from fxrewrite.yolov9.deploy import fuse

# Official fuse() on the GELAN models (nc=80): facts of the reference implementation.
OFFICIAL_FUSED_PARAMETERS = {"t": 2_407_632, "s": 7_105_888, "m": 19_978_672, "c": 25_288_768, "e": 57_345_920}

# Tolerance of fp32 outputs computed two ways (fused vs unfused, ONNX Runtime vs PyTorch): 1e-4
# absolute, plus 1e-6 relative (8 float32 ulps) because the box coordinates are pixels up to the
# image size, where float32 values are 6.1e-5 apart: there the official fuse() itself differs from
# the unfused model by 1.5e-4 (2.5 ulps) and the unfused fp32 model from an fp64 one by 1e-4.
ATOL, RTOL = 1e-4, 1e-6


@functools.lru_cache(maxsize=None)
def training(name: str = "yolov9-t") -> torch.nn.Module:
    """A seeded training model with non-trivial BatchNorms (weight, bias, running mean and variance), in eval mode."""
    torch.manual_seed(0)
    model = DetectionModel(name)
    randomise_batchnorm(model, seed=1, affine=True)
    return model.eval()


@functools.lru_cache(maxsize=None)
def converted(name: str = "yolov9-t"):
    return convert(training(name))


@functools.lru_cache(maxsize=None)
def fused(name: str = "yolov9-t"):
    return fuse(converted(name).model)


@functools.lru_cache(maxsize=None)
def image(size: int = 640, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def predictions(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The main decoded predictions [batch, 4 + nc, anchors] of an inference model in eval mode."""
    with torch.no_grad():
        return model(x)[0]


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
    # The class scores are probabilities: there 1e-4 absolute holds on its own.
    torch.testing.assert_close(actual[:, 4:], expected[:, 4:], atol=ATOL, rtol=0)
