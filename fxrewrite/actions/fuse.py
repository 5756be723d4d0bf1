"""Folding BatchNorms into the convolutions before them, for deployment.

An inference-mode BatchNorm is an affine map per channel,
``y = (x - mean) / sqrt(var + eps) * gamma + beta``; after a convolution it can
be folded into the convolution's weight and bias
(:func:`fxrewrite.modules.fold_batchnorm`). Two actions do it, for the two
granularities a model can be traced at:

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

from torch import fx, nn

from ..context import COLLAPSED, RewriteContext
from ..modules import (BIAS_SOURCES, WEIGHT_SOURCES, check_foldable, conv_like, copy_module, fold_batchnorm,
                       folded_conv, set_forward, set_submodule, sources_with)
from ..pattern import Match
from ..registry import BUILTINS, Param, register_action
from ..shapes import shape_of
from ..tensors import named_tensors


@register_action("fuse_conv_bn", registry=BUILTINS, params={
    "node": Param((str,), default="$root", doc="capture of the block (default: the pattern's root)"),
    "conv": Param((str,), default="conv", doc="path of the convolution inside the block"),
    "bn": Param((str,), default="bn", doc="path of the BatchNorm inside the block"),
    "forward": Param((str,), doc="method of the block that becomes its forward (e.g. forward_fuse)"),
}, doc="Fold a block's BatchNorm into its convolution; the block loses the BatchNorm.")
def fuse_conv_bn(ctx: RewriteContext, match: Match, *, node: fx.Node, conv: str, bn: str,
                 forward: str | None = None) -> None:
    old = ctx.module(node)
    try:
        old_conv, old_bn = old.get_submodule(conv), old.get_submodule(bn)
        fused = folded_conv(old_conv, old_bn, f"{node.target} ({type(old).__name__})")
        new = copy_module(old)
        set_submodule(new, bn, None)
        set_submodule(new, conv, fused)
        if forward:
            set_forward(new, forward)
    except (AttributeError, ValueError) as exc:
        ctx.refuse(str(exc))
    ctx.set_module(node, new, sources_with(new, {
        f"{conv}.weight": (f"{conv}.weight", *(f"{bn}.{t}" for t in WEIGHT_SOURCES)),
        f"{conv}.bias": ((f"{conv}.bias",) if old_conv.bias is not None else ()) + tuple(f"{bn}.{t}" for t in BIAS_SOURCES),
    }))


@register_action("fold_batchnorm", registry=BUILTINS, params={
    "conv": Param((str,), required=True, doc="capture of the convolution node"),
    "bn": Param((str,), required=True, doc="capture of the BatchNorm node that reads it"),
}, doc="Fold a BatchNorm node into the convolution node it reads; the BatchNorm node is collapsed.")
def fold_batchnorm_action(ctx: RewriteContext, match: Match, *, conv: fx.Node, bn: fx.Node) -> None:
    if not isinstance(conv, fx.Node) or not isinstance(bn, fx.Node):
        ctx.refuse("fold_batchnorm: 'conv' and 'bn' must name captured nodes")
    if bn.args[:1] != (conv,) or len(conv.users) != 1:
        ctx.refuse(f"{bn.name} must read {conv.name}, and nothing else may read it")
    old_conv, old_bn = ctx.module(conv), ctx.module(bn)
    shape = shape_of(conv)
    if isinstance(old_conv, nn.Linear) and shape is not None and len(shape) != 2:
        # BatchNorm1d normalises dimension 1: the Linear's features only when its output is (N, C).
        ctx.refuse(f"{conv.target} -> {bn.target}: the Linear's output has shape {tuple(shape)}; its features "
                   f"are the BatchNorm's channels only when it is (N, C)")
    try:
        fused = folded_conv(old_conv, old_bn, f"{conv.target} -> {bn.target}")
    except ValueError as exc:
        ctx.refuse(str(exc))
    c, b = conv.target, bn.target
    has_bias = old_conv.bias is not None
    ctx.set_module(conv, fused, {"weight": ("weight",), "bias": ("bias",) if has_bias else None})
    ctx.record_origin(f"{c}.weight", [f"{c}.weight", *(f"{b}.{t}" for t in WEIGHT_SOURCES)])
    ctx.record_origin(f"{c}.bias", [f"{c}.bias", *(f"{b}.{t}" for t in BIAS_SOURCES)])
    ctx.drop_tensors(b, [name for name, _ in named_tensors(old_bn) if name not in BIAS_SOURCES])
    ctx.replace_uses(bn, conv)
    ctx.erase(bn, COLLAPSED)


# The module helpers lived here before fxrewrite.modules; these names still import from here.
__all__ = ["fuse_conv_bn", "fold_batchnorm_action", "fold_batchnorm", "folded_conv", "conv_like", "check_foldable",
           "copy_module", "set_submodule", "set_forward", "sources_with", "WEIGHT_SOURCES", "BIAS_SOURCES"]
