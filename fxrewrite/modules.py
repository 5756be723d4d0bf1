"""Module helpers for actions: copy a module without changing the original, edit its submodules,
and fold a BatchNorm into the convolution before it.

Actions never change a module in place (the input model shares it): they build a new
one and install it with :meth:`fxrewrite.context.RewriteContext.set_module`. These
helpers make that cheap:

* :func:`copy_module`: a new module object sharing everything, with its own registries;
* :func:`set_submodule`: set or delete a submodule of such a copy, copying the modules on
  the way (copy on write);
* :func:`set_forward`: make one of its methods its ``forward`` (as YOLO's ``fuse()`` does);
* :func:`sources_with`: the ``sources`` of ``set_module`` for a module whose tensors are
  all its own, but for the computed ones;
* :func:`fold_batchnorm`, :func:`folded_conv`, :func:`conv_like`, :func:`check_foldable`:
  the BatchNorm folding maths (one implementation: the fusion actions and the YOLOv9
  plug-in use it).

>>> import torch
>>> block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4)).eval()
>>> fused = copy_module(block)
>>> set_submodule(fused, "0", folded_conv(block[0], block[1], "block"))
>>> set_submodule(fused, "1", None)
>>> [type(m).__name__ for m in fused], [type(m).__name__ for m in block]
(['Conv2d'], ['Conv2d', 'BatchNorm2d'])
>>> x = torch.randn(1, 3, 8, 8)
>>> bool((fused(x) - block(x)).abs().max() < 1e-6)
True
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .tensors import named_tensors

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# What a folded convolution's weight and bias are computed from (BatchNorm tensor names).
WEIGHT_SOURCES = ("weight", "running_var")
BIAS_SOURCES = ("weight", "bias", "running_mean", "running_var")


def copy_module(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s attributes, submodules and tensors.

    Its own registries (parameters, buffers, submodules) are fresh dicts, so
    adding or deleting entries on the copy leaves ``module`` as it was.
    """
    new = type(module).__new__(type(module))
    new.__dict__.update(module.__dict__)
    for key, value in module.__dict__.items():
        if key.startswith("_") and isinstance(value, (dict, set)):
            new.__dict__[key] = type(value)(value)  # _parameters, _buffers, _modules, hooks ...
    return new


def set_submodule(root: nn.Module, path: str, module: nn.Module | None) -> None:
    """Set (or, with ``None``, delete) the submodule at dotted ``path`` of ``root``, copy on write.

    ``root`` must be a module of the caller's (a :func:`copy_module`); the modules
    between it and ``path``'s owner are copied first, so shared ones are never changed.
    """
    *parents, leaf = path.split(".")
    owner = root
    for part in parents:
        child = copy_module(getattr(owner, part))
        setattr(owner, part, child)
        owner = child
    if module is None:
        delattr(owner, leaf)
    else:
        setattr(owner, leaf, module)


def set_forward(module: nn.Module, method: str) -> None:
    """Make the bound method ``method`` the instance's ``forward`` (as the official ``fuse()`` does);
    ``ValueError`` when the class has no such method."""
    if not callable(getattr(type(module), method, None)):
        raise ValueError(f"{type(module).__name__} has no method {method!r} to use as forward")
    module.forward = getattr(module, method)


def sources_with(module: nn.Module, computed: Mapping[str, tuple[str, ...]]) -> dict[str, str | tuple[str, ...]]:
    """Sources for ``set_module``: every tensor of ``module`` is itself unless ``computed`` says otherwise."""
    sources: dict[str, str | tuple[str, ...]] = {name: name for name, _ in named_tensors(module)}
    sources.update(computed)
    return sources


@torch.no_grad()
def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None,
                   bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a convolution (``weight``, ``bias`` or None) followed by ``bn`` in eval mode.

    Output channels are ``weight``'s dimension 0. The operations are those of the
    official YOLOv9 ``fuse_conv_and_bn`` / ``RepConvN._fuse_bn_tensor``, in the same
    order (``scale = gamma / sqrt(var + eps)``, ``bias = beta - gamma * mean / sqrt(var + eps)``),
    so the folded tensors are bitwise the official ones. Works on any device, ``meta`` included.
    """
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    scale = gamma / std
    shift = -(gamma * bn.running_mean / std)
    if bn.bias is not None:
        shift = bn.bias - gamma * bn.running_mean / std
    if bias is not None:
        shift = scale * bias + shift
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), shift


def folded_conv(conv: nn.Module, bn: nn.Module, where: str) -> nn.Module:
    """A new biased layer computing ``bn(conv(x))`` (parameters frozen, like the official fuse).

    ``conv`` is a ``Conv1d/2d/3d``, a ``ConvTranspose1d/2d/3d`` (whose output channels are the
    weight's dimension 1, per group) or a ``Linear`` (before a ``BatchNorm1d`` on ``(N, C)``).
    """
    check_foldable(conv, bn, where)
    if isinstance(conv, _TRANSPOSED):
        # weight: (in, out / groups, *k); output channel g * (out / groups) + j is weight[g-th in block, j].
        w, g = conv.weight, conv.groups
        per_group = (g, w.shape[0] // g, w.shape[1], *w.shape[2:])  # (groups, in / groups, out / groups, *k)
        out_first = w.reshape(per_group).transpose(1, 2).reshape(-1, w.shape[0] // g, *w.shape[2:])
        folded, bias = fold_batchnorm(out_first, conv.bias, bn)
        weight = folded.reshape(g, w.shape[1], w.shape[0] // g, *w.shape[2:]).transpose(1, 2).reshape(w.shape)
        return conv_like(conv, weight, bias)
    weight, bias = fold_batchnorm(conv.weight, conv.bias, bn)
    if isinstance(conv, nn.Linear):
        with torch.device(weight.device):
            new = nn.Linear(conv.in_features, conv.out_features, bias=True, dtype=weight.dtype)
        new.weight = nn.Parameter(weight.detach(), requires_grad=False)
        new.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return new.train(conv.training)
    return conv_like(conv, weight, bias)


def conv_like(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A convolution of ``conv``'s class and geometry with the given weight and a bias, frozen."""
    extra = {"output_padding": conv.output_padding} if isinstance(conv, _TRANSPOSED) else {}
    with torch.device(weight.device):
        new = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                         padding_mode=conv.padding_mode, dtype=weight.dtype, **extra)
    new.weight = nn.Parameter(weight.detach(), requires_grad=False)
    new.bias = nn.Parameter(bias.detach(), requires_grad=False)
    new.train(conv.training)
    return new


def check_foldable(conv: nn.Module, bn: nn.Module, where: str) -> None:
    """Raise ``ValueError`` (a message naming ``where``) when ``bn`` cannot be folded into ``conv``."""
    if not isinstance(conv, (*_CONVS, *_TRANSPOSED, nn.Linear)):
        raise ValueError(f"{where}: {type(conv).__name__} is not a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear")
    if not isinstance(bn, _BATCHNORMS):
        raise ValueError(f"{where}: {type(bn).__name__} is not a BatchNorm")
    dims = 1 if isinstance(conv, nn.Linear) else len(conv.kernel_size)
    if type(bn) in _BATCHNORMS and _BATCHNORMS.index(type(bn)) + 1 != dims:
        raise ValueError(f"{where}: a {type(conv).__name__} is followed by a {type(bn).__name__}, not by a "
                         f"BatchNorm{dims}d")
    if bn.training:
        raise ValueError(f"{where}: the BatchNorm is in training mode: it normalises with each batch's "
                         f"statistics, so folding its running statistics would change the outputs; "
                         f"put the model in eval mode (model.eval()) before tracing")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{where}: the BatchNorm keeps no running statistics (track_running_stats=False); "
                         f"it normalises with batch statistics and cannot be folded")
    outputs = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    if bn.num_features != outputs:
        raise ValueError(f"{where}: the BatchNorm has {bn.num_features} channels, the "
                         f"{'layer' if isinstance(conv, nn.Linear) else 'convolution'} {outputs} outputs")


__all__ = ["copy_module", "set_submodule", "set_forward", "sources_with", "fold_batchnorm", "folded_conv",
           "conv_like", "check_foldable", "WEIGHT_SOURCES", "BIAS_SOURCES"]
