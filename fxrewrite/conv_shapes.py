"""Convolutions by shape alone: what shape propagation runs when only shapes are wanted.

Propagating shapes through a detector runs every convolution of it on the example
input; on a CPU, and in fp16 (the precision of a ``best.pt``), that arithmetic is most
of a conversion's time, yet only the outputs' shapes are kept. Inside
:func:`convolutions_by_shape`, a plain convolution (``torch.conv1d/2d/3d``, which
``nn.Conv*d`` and ``F.conv*d`` call) returns a zero tensor of the shape, dtype and
device torch would give, after the checks torch makes (channels, groups, bias, dtypes,
devices, an output size of at least 1). Anything it does not recognise as plain (a
subclass or quantized tensor, unbatched or non-contiguous input, a channels-last weight,
``padding="same"`` with a stride, gradients wanted, autocast, a check that fails) runs the
real convolution, so every error is torch's own. Later operations see zeros, not the model's
values: an operation whose output *shape* depends on values (``nonzero``, boolean masks)
records another shape than a computed propagation would.

>>> import torch
>>> conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
>>> with torch.no_grad(), convolutions_by_shape():  # (with gradients wanted, it would be computed)
...     y = conv(torch.randn(1, 3, 32, 32))
>>> tuple(y.shape), bool(y.any())
((1, 8, 16, 16), False)
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["convolutions_by_shape", "convolution_output_shape"]

_DIMS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class _ConvolutionsByShape(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dims = _DIMS.get(func)
        if dims is not None:
            shape = convolution_output_shape(dims, *args, **kwargs)
            if shape is not None:
                x = args[0] if args else kwargs["input"]
                return torch.zeros(shape, dtype=x.dtype, device=x.device)
        return func(*args, **kwargs)


@contextlib.contextmanager
def convolutions_by_shape() -> Iterator[None]:
    """Within the block, plain convolutions are not computed (see the module docstring)."""
    with _ConvolutionsByShape():
        yield


def convolution_output_shape(dims: int, *args: Any, **kwargs: Any) -> tuple[int, ...] | None:
    """The output shape of ``torch.conv{dims}d(*args, **kwargs)`` when the call is plain and valid
    (the real convolution would succeed and return a contiguous tensor of that shape); ``None`` otherwise.

    >>> x, w = torch.zeros(2, 4, 9, 9), torch.zeros(6, 2, 3, 3)
    >>> convolution_output_shape(2, x, w, None, 2, 1, 1, 2)
    (2, 6, 5, 5)
    >>> convolution_output_shape(2, x, torch.zeros(6, 3, 3, 3)) is None  # 4 channels, weight wants 3
    True
    """
    if len(args) > len(_ARG_NAMES) or any(key not in _ARG_NAMES for key in kwargs):
        return None
    bound = dict(zip(_ARG_NAMES, args))
    if any(key in bound for key in kwargs):
        return None
    bound.update(kwargs)
    x, w, bias = bound.get("input"), bound.get("weight"), bound.get("bias")
    tensors = [x, w] + ([bias] if bias is not None else [])
    if not all(type(t) in _PLAIN and t.layout == torch.strided and not t.is_quantized for t in tensors):
        return None
    if any(t.dtype != x.dtype or t.device != x.device for t in tensors) or not x.is_floating_point():
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None  # the output would carry a graph: compute it
    if _autocast(x.device.type):
        return None  # autocast would change the output's dtype
    if x.dim() != dims + 2 or w.dim() != dims + 2 or not x.is_contiguous() or not w.is_contiguous():
        return None  # unbatched input, or a memory format the real kernel might keep
    groups = bound.get("groups", 1)
    if type(groups) is not int or groups < 1:
        return None
    batch, channels, *size = x.shape
    out_channels, group_channels, *kernel = w.shape
    if 0 in x.shape or 0 in w.shape or channels != group_channels * groups or out_channels % groups:
        return None
    if bias is not None and tuple(bias.shape) != (out_channels,):
        return None
    stride, dilation = _ints(bound.get("stride", 1), dims), _ints(bound.get("dilation", 1), dims)
    padding = bound.get("padding", 0)
    if stride is None or dilation is None or min(stride) < 1 or min(dilation) < 1:
        return None
    if isinstance(padding, str) and padding == "valid":
        padding = (0,) * dims
    elif isinstance(padding, str) and padding == "same":
        if max(stride) != 1:
            return None  # torch refuses it
        return (batch, out_channels, *size)
    else:
        padding = _ints(padding, dims)
        if padding is None or min(padding) < 0:
            return None
    out = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                for n, p, d, k, s in zip(size, padding, dilation, kernel, stride))
    return (batch, out_channels, *out) if min(out) >= 1 else None


def _autocast(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


def _ints(value: Any, dims: int) -> tuple[int, ...] | None:
    """An int or a sequence of ``dims`` ints, as a tuple; ``None`` for anything else."""
    if type(value) is int:
        return (value,) * dims
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == dims \
            and all(type(v) is int for v in value):
        return tuple(value)
    return None
