"""Folding BatchNorms into the convolutions before them, for deployment.

An inference-mode BatchNorm is an affine map per channel,
``y = (x - mean) / sqrt(var + eps) * gamma + beta``; after a convolution it can
be folded into the convolution's weight and bias (:func:`fold_batchnorm`). Two
actions do it, for the two granularities a model can be traced at:

* ``fuse_conv_bn``: the matched node calls a *block* holding a convolution and
  a BatchNorm (``Conv`` of YOLO, ``ConvNormAct`` blocks...). The block is
  replaced by a copy whose convolution carries a bias and the BatchNorm folded
  in, and which has no BatchNorm any more. Arguments: ``node`` (capture, default
  the pattern's root), ``conv`` / ``bn`` (paths of the two inside the block,
  default ``conv`` / ``bn``), ``forward`` (a method of the block that becomes its
  ``forward``, e.g. ``forward_fuse``; without it the block's own ``forward`` must
  work without the BatchNorm).
* ``fold_batchnorm``: a graph traced down to torch layers; ``conv`` and ``bn``
  are captures of a ``Conv*d`` node and of the ``BatchNorm*d`` node reading it
  (and nothing else may read the convolution). The convolution node calls the
  folded convolution and the BatchNorm node is collapsed.

The new weight and bias are *computed* tensors: their provenance (``param_map``
of the result) is the tuple of the original tensors they were computed from.
Tensors used by nothing any more (``num_batches_tracked``) are listed in the
rule log as dropped. The matched modules are not modified.

>>> import torch, fxrewrite
>>> from fxrewrite import Rule, Pattern
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
>>> gm = fxrewrite.trace(model, torch.zeros(1, 3, 8, 8))
>>> pattern = Pattern(module_class="BatchNorm2d", capture="bn",
...                   inputs=[Pattern(module_class="Conv2d", num_users=1, capture="conv")])
>>> result = fxrewrite.rewrite(gm, [Rule("fold-bn", "fold_batchnorm", pattern, args={"conv": "$conv", "bn": "$bn"})])
>>> [n.target for n in result.module.graph.nodes if n.op == "call_module"]
['0', '2']
>>> result.param_map["0.bias"]
('1.weight', '1.bias', '1.running_mean', '1.running_var')
>>> x = torch.randn(2, 3, 8, 8)
>>> torch.allclose(model(x), result.module(x), atol=1e-6)
True
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import fx, nn

from ..engine import COLLAPSED, RewriteContext, computed_origin
from ..errors import RewriteError
from ..pattern import Match
from ..registry import Param, register_action
from ..tensors import named_tensors

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# What the folded weight and bias are computed from (BatchNorm tensor names).
WEIGHT_SOURCES = ("weight", "running_var")
BIAS_SOURCES = ("weight", "bias", "running_mean", "running_var")


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
    """A new biased convolution computing ``bn(conv(x))`` (parameters frozen, like the official fuse)."""
    check_foldable(conv, bn, where)
    weight, bias = fold_batchnorm(conv.weight, conv.bias, bn)
    return conv_like(conv, weight, bias)


def conv_like(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A convolution of ``conv``'s class and geometry with the given weight and a bias, frozen."""
    with torch.device(weight.device):
        new = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                         padding_mode=conv.padding_mode, dtype=weight.dtype)
    new.weight = nn.Parameter(weight.detach(), requires_grad=False)
    new.bias = nn.Parameter(bias.detach(), requires_grad=False)
    new.train(conv.training)
    return new


def check_foldable(conv: nn.Module, bn: nn.Module, where: str) -> None:
    """Raise a :class:`RewriteError`-ready ``ValueError`` message when ``bn`` cannot be folded into ``conv``."""
    if not isinstance(conv, _CONVS):
        raise ValueError(f"{where}: {type(conv).__name__} is not a Conv1d/2d/3d (transposed convolutions "
                         f"are not folded)")
    if not isinstance(bn, _BATCHNORMS):
        raise ValueError(f"{where}: {type(bn).__name__} is not a BatchNorm")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{where}: the BatchNorm keeps no running statistics (track_running_stats=False); "
                         f"it normalises with batch statistics and cannot be folded")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"{where}: the BatchNorm has {bn.num_features} channels, the convolution "
                         f"{conv.out_channels} outputs")


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


def sources_with(module: nn.Module, computed: Mapping[str, tuple[str, ...]]) -> dict[str, str | tuple[str, ...]]:
    """Sources for ``install_module``: every tensor of ``module`` is itself unless ``computed`` says otherwise."""
    sources: dict[str, str | tuple[str, ...]] = {name: name for name, _ in named_tensors(module)}
    sources.update(computed)
    return sources


def log_unused(ctx: RewriteContext, target: str, old: nn.Module, sources: Mapping) -> None:
    """List the old tensors no new tensor comes from as dropped in the rule log."""
    used = set()
    for value in sources.values():
        used.update(value if isinstance(value, tuple) else (value,))
    ctx.log.dropped += [_origin_text(ctx.param_origin.get(f"{target}.{name}"), f"{target}.{name}")
                        for name, _ in named_tensors(old) if name not in used]


def _origin_text(origin, fallback: str) -> str:
    if isinstance(origin, tuple):
        return ", ".join(origin)
    return origin or fallback


def set_forward(module: nn.Module, method: str, rule: str) -> None:
    """Make the bound method ``method`` the instance's ``forward`` (as the official ``fuse()`` does)."""
    if not callable(getattr(type(module), method, None)):
        raise RewriteError(rule, f"{type(module).__name__} has no method {method!r} to use as forward")
    module.forward = getattr(module, method)


@register_action("fuse_conv_bn", params={
    "node": Param((str,), doc="capture of the block (default: the pattern's root)"),
    "conv": Param((str,), default="conv", doc="path of the convolution inside the block"),
    "bn": Param((str,), default="bn", doc="path of the BatchNorm inside the block"),
    "forward": Param((str,), doc="method of the block that becomes its forward (e.g. forward_fuse)"),
}, doc="Fold a block's BatchNorm into its convolution; the block loses the BatchNorm.")
def fuse_conv_bn(ctx: RewriteContext, match: Match, *, node: str = "$root", conv: str = "conv", bn: str = "bn",
                 forward: str | None = None) -> None:
    rule = ctx.rule.name
    target = ctx.resolve(node, match)
    old = ctx.module(target)
    try:
        old_conv, old_bn = old.get_submodule(conv), old.get_submodule(bn)
        fused = folded_conv(old_conv, old_bn, f"{target.target} ({type(old).__name__})")
    except (AttributeError, ValueError) as exc:
        raise RewriteError(rule, str(exc)) from None
    new = copy_module(old)
    set_submodule(new, bn, None)
    set_submodule(new, conv, fused)
    if forward:
        set_forward(new, forward, rule)
    sources = sources_with(new, {
        f"{conv}.weight": (f"{conv}.weight", *(f"{bn}.{t}" for t in WEIGHT_SOURCES)),
        f"{conv}.bias": ((f"{conv}.bias",) if old_conv.bias is not None else ()) + tuple(f"{bn}.{t}" for t in BIAS_SOURCES),
    })
    log_unused(ctx, target.target, old, sources)
    ctx.install_module(target, new, sources)


@register_action("fold_batchnorm", params={
    "conv": Param((str,), required=True, doc="capture of the convolution node"),
    "bn": Param((str,), required=True, doc="capture of the BatchNorm node that reads it"),
}, doc="Fold a BatchNorm node into the convolution node it reads; the BatchNorm node is collapsed.")
def fold_batchnorm_action(ctx: RewriteContext, match: Match, *, conv: str, bn: str) -> None:
    rule = ctx.rule.name
    conv_node, bn_node = ctx.resolve(conv, match), ctx.resolve(bn, match)
    if not isinstance(conv_node, fx.Node) or not isinstance(bn_node, fx.Node):
        raise RewriteError(rule, "fold_batchnorm: 'conv' and 'bn' must name captured nodes")
    if bn_node.args[:1] != (conv_node,) or len(conv_node.users) != 1:
        raise RewriteError(rule, f"{bn_node.name} must read {conv_node.name}, and nothing else may read it")
    old_conv, old_bn = ctx.module(conv_node), ctx.module(bn_node)
    try:
        fused = folded_conv(old_conv, old_bn, f"{conv_node.target} -> {bn_node.target}")
    except ValueError as exc:
        raise RewriteError(rule, str(exc)) from None
    c, b = conv_node.target, bn_node.target
    weight_origin = computed_origin(ctx.param_origin.get(n) for n in
                                    (f"{c}.weight", *(f"{b}.{t}" for t in WEIGHT_SOURCES)))
    bias_origin = computed_origin(ctx.param_origin.get(n) for n in
                                  ((f"{c}.bias",) if old_conv.bias is not None else ())
                                  + tuple(f"{b}.{t}" for t in BIAS_SOURCES))
    ctx.log.dropped += [ctx.param_origin.get(f"{b}.{name}") or f"{b}.{name}"
                        for name, _ in named_tensors(old_bn) if name not in BIAS_SOURCES]
    ctx.install_module(conv_node, fused, {"weight": "weight", "bias": None})
    ctx.param_origin[f"{c}.weight"], ctx.param_origin[f"{c}.bias"] = weight_origin, bias_origin
    ctx.replace_uses(bn_node, conv_node)
    ctx.erase(bn_node, COLLAPSED)


__all__ = ["fold_batchnorm", "folded_conv", "conv_like", "check_foldable", "copy_module", "set_submodule",
           "set_forward", "sources_with", "log_unused", "WEIGHT_SOURCES", "BIAS_SOURCES"]
