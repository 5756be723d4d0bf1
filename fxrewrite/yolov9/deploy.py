"""Deployment fusion of YOLOv9 / GELAN models, as rules (``rules/deploy.yaml``).

What the official ``DetectionModel.fuse()`` does by walking the model, done by
the rewrite engine:

* every ``RepConvN`` gets its 3x3 and 1x1 Conv+BN branches merged into one
  biased 3x3 convolution ``conv`` (action ``fuse_repconv``, registered here);
* every ``Conv`` gets its BatchNorm folded into its convolution (the core
  action ``fuse_conv_bn``);

and in both the block's ``forward`` becomes its ``forward_fuse``, as an
instance attribute, exactly as the official ``fuse()`` leaves it (so a saved
fused model also runs in the official code).

How the model is traced: the blocks the rules name by class (``Conv``,
``RepConvN``) are leaves, one node each, wherever they are, including inside the
detection head. The head's eval-mode forward (the anchor cache) cannot be traced
symbolically, so the model is traced in training mode (no computation runs) and
the shapes are then propagated in eval mode: the graph reaches every block with
a BatchNorm; the head's decoding, which has none, is not needed.

The result is a copy of the model: the fused blocks are new, every other module
is a copy sharing its tensors with the input, which is never modified.

>>> import torch
>>> from fxrewrite.yolov9 import DetectionModel
>>> from fxrewrite.yolov9.deploy import fuse
>>> torch.manual_seed(0) and None
>>> model = DetectionModel("gelan-t").eval()
>>> fusion = fuse(model)
>>> [str(entry) for entry in fusion.result.log]
['merge-repconvn-branches (fuse_repconv): 42 matched, 42 rewritten, 84 tensors dropped', 'fold-conv-batchnorm (fuse_conv_bn): 137 matched, 137 rewritten, 137 tensors dropped']
>>> fusion.params_after
2407632
>>> fusion.param_map["model.4.cv2.0.m.0.cv1.conv.weight"]  # a merged RepConvN kernel
('model.4.cv2.0.m.0.cv1.conv1.conv.weight', 'model.4.cv2.0.m.0.cv1.conv1.bn.weight', 'model.4.cv2.0.m.0.cv1.conv1.bn.running_var', 'model.4.cv2.0.m.0.cv1.conv2.conv.weight', 'model.4.cv2.0.m.0.cv1.conv2.bn.weight', 'model.4.cv2.0.m.0.cv1.conv2.bn.running_var')
>>> fusion.model.model[0].forward  # as the official fuse() leaves it
<bound method Conv.forward_fuse of Conv(
  (conv): Conv2d(3, 16, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
  (act): SiLU(inplace=True)
)>
>>> x = torch.rand(1, 3, 64, 64)
>>> bool((fusion.model(x)[0] - model(x)[0]).abs().max() < 1e-4)
True
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..context import REPLACED, Origin, RewriteContext
from ..engine import rewrite
from ..errors import FxRewriteError
from ..modules import (BIAS_SOURCES, WEIGHT_SOURCES, check_foldable, conv_like, copy_module,
                       set_forward, sources_with)
from ..naming import class_matches
from ..pattern import Match
from ..registry import Param, register_action
from ..result import RewriteResult
from ..rule_file import load_rules
from ..rules import RuleSet
from ..shapes import propagate_shapes
from ..tensors import named_tensors
from ..tracing import TRACE_META, trace as fx_trace
from ..verify import Tolerance, VerifyReport, verify
from .blocks import Conv, RepConvN, repconv_kernel_bias
from .inputs import example_size, fixed_flags, input_channels, restore_modes, set_eval

__all__ = ["Fusion", "FusionError", "fuse", "deploy_rules", "unfused_blocks", "compose_param_maps"]


class FusionError(FxRewriteError, ValueError):
    """The model cannot be fused (no layered model, blocks the trace did not reach, ...)."""


@dataclass
class Fusion:
    """A fused model and how it was obtained."""

    model: nn.Module  # the fused copy (the input is untouched; unfused tensors are shared)
    #: fused tensor name -> the input model's tensor it is (a name) or was computed from (a tuple of names)
    param_map: dict[str, Origin]
    result: RewriteResult  # the rewrite of the structural trace (log, node status)
    source: nn.Module
    fused: list[str] = field(default_factory=list)  # qualified names of the blocks that were fused
    unreached: list[str] = field(default_factory=list)  # blocks of the rules' classes the trace did not reach

    @property
    def params_before(self) -> int:
        return sum(p.numel() for p in self.source.parameters())

    @property
    def params_after(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def verify(self, inputs: torch.Tensor, tolerance: Tolerance | None = None) -> VerifyReport:
        """Compare the fused model's eval output with the input model's (every output tensor), within
        ``tolerance`` (default: the stated fusion tolerance of the inputs' dtype, :mod:`.tolerances`)."""
        from .tolerances import fusion_tolerance

        tolerance = tolerance if tolerance is not None else fusion_tolerance(inputs.dtype)
        modes = set_eval(self.source), set_eval(self.model)
        try:
            return verify(self.source, self.model, inputs, tolerance=tolerance)
        finally:
            restore_modes(self.source, modes[0])
            restore_modes(self.model, modes[1])


def deploy_rules() -> RuleSet:
    """The shipped ``rules/deploy.yaml``."""
    return load_rules("deploy")


def fuse(model: nn.Module, rules: RuleSet | None = None, *, example: torch.Tensor | None = None,
         check_shapes: bool = True, strict: bool = True) -> Fusion:
    """Fuse ``model`` for deployment with ``rules`` (default: ``rules/deploy.yaml``).

    ``model`` is a layered YOLO model (a converted GELAN model, a training model)
    or any module whose ``forward`` traces in training mode; ``example`` (default:
    a small zero image) is used to check shapes after every rule
    (``check_shapes=False`` skips that, e.g. for a quick look at a model on the
    ``meta`` device). The input is not modified.

    Every block of a class the rules name must be reached by the trace; with
    ``strict`` (the default) a :class:`FusionError` says which are not and why
    (e.g. the official code's ``RepNCSPELAN4.forward`` iterates over a tensor, so
    symbolic tracing cannot enter it: load official checkpoints with
    :func:`fxrewrite.yolov9.checkpoint.load_checkpoint`, which gives fxrewrite's classes).
    """
    rules = rules if rules is not None else deploy_rules()
    leaves = sorted({p.module_class for rule in rules if rule.pattern is not None
                     for p in rule.pattern.iter_patterns() if p.module_class})
    work = _copy_sharing_tensors(model)
    reference = next((t for t in model.parameters() if t.is_floating_point()), torch.zeros(()))
    if example is None and check_shapes:
        if not hasattr(model, "yaml"):
            raise FusionError(f"{type(model).__name__} has no config (.yaml): pass an example input")
        size = example_size(model)
        example = torch.zeros(1, input_channels(model), size, size, dtype=reference.dtype, device=reference.device)
    modes = set_eval(work)
    try:
        work.train()  # the structural trace: see the module docstring
        gm = fx_trace(work, leaf_classes=leaves, concrete_args=fixed_flags(work))
        work.eval()
        if check_shapes:
            propagate_shapes(gm, example)
        result = rewrite(gm, rules, check_shapes=check_shapes)
    finally:
        restore_modes(work, modes)
    unreached = _unreached(work, gm, leaves)
    if unreached and strict:
        hidden = gm.meta[TRACE_META].auto_leaves
        why = [f"{owner} ({type(work.get_submodule(owner)).__name__}) could not be traced: "
               f"{hidden[owner].split('. ')[0]}"
               for owner in hidden if any(name.startswith(owner + ".") for name in unreached)]
        raise FusionError(f"the trace does not reach {len(unreached)} block(s) the rules fuse "
                          f"({', '.join(unreached[:4])}{', ...' if len(unreached) > 4 else ''})"
                          + (": " + "; ".join(why[:2]) + ("; ..." if len(why) > 2 else "") if why else ""))
    fused = [n.target for n in result.module.graph.nodes
             if n.op == "call_module" and result.node_status.get(n.name) == REPLACED]
    for target in fused:
        owner_path, _, leaf = target.rpartition(".")
        owner, new = work.get_submodule(owner_path) if owner_path else work, result.module.get_submodule(target)
        new.train(modes.get(getattr(owner, leaf), False))  # the mode of the block it replaces
        setattr(owner, leaf, new)
    param_map = {name: result.param_map.get(name, name) for name, _ in named_tensors(work)}
    return Fusion(work, param_map, result, model, fused, unreached)


def _unreached(model: nn.Module, gm, leaves: list[str]) -> list[str]:
    """Blocks of a class the rules name that are not a node of the trace (nor inside one that is)."""
    nodes = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    covered = [t for t in nodes if class_matches(model.get_submodule(t), leaves)]
    return [name for name, m in model.named_modules()
            if class_matches(m, leaves) and name not in nodes and not any(name.startswith(t + ".") for t in covered)]


def unfused_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the ``Conv`` blocks that still have a BatchNorm and the ``RepConvN`` that
    still have two branches (empty for a model fused completely)."""
    return [name for name, m in model.named_modules()
            if (isinstance(m, Conv) and hasattr(m, "bn")) or (isinstance(m, RepConvN) and hasattr(m, "conv1"))]


def compose_param_maps(outer: dict[str, Origin], inner: dict[str, Origin]) -> dict[str, Origin]:
    """``outer`` (names of a model B -> names in A) followed by ``inner`` (names in A -> names in the
    original): names of B -> original names, computed tensors keeping a tuple of every origin."""
    from ..engine import computed_origin

    composed: dict[str, Origin] = {}
    for name, origin in outer.items():
        if isinstance(origin, tuple):
            composed[name] = computed_origin(inner.get(o, o) for o in origin)
        else:
            composed[name] = inner.get(origin, origin) if origin is not None else None
    return composed


def _copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree whose parameters and buffers are the input's own tensors."""
    memo: dict[int, Any] = {id(t): t for _, t in named_tensors(model)}
    return copy.deepcopy(model, memo)


# -- the RepConvN action ------------------------------------------------------------
@register_action("fuse_repconv", params={
    "node": Param((str,), default="$root", doc="capture of the RepConvN (default: the pattern's root)"),
    "forward": Param((str,), default="forward_fuse", doc="method that becomes the block's forward"),
}, doc="Merge a RepConvN's 3x3 and 1x1 Conv+BN branches (and its optional BatchNorm identity branch) "
       "into one biased 3x3 convolution 'conv', as the official fuse_convs.")
def fuse_repconv(ctx: RewriteContext, match: Match, *, node: fx.Node, forward: str) -> None:
    old = ctx.module(node)
    where = f"{node.target} ({type(old).__name__})"
    try:
        branch3, branch1 = old.conv1, old.conv2
        identity = getattr(old, "bn", None)
        for branch in (branch3, branch1):
            check_foldable(branch.conv, branch.bn, where)
        conv3, conv1 = branch3.conv, branch1.conv
        if tuple(conv3.kernel_size) != (3, 3) or tuple(conv1.kernel_size) != (1, 1) or \
                tuple(conv3.padding) != (1, 1) or tuple(conv1.padding) != (0, 0) or \
                conv3.stride != conv1.stride or conv3.groups != conv1.groups:
            raise ValueError(f"{where}: expected a 3x3 (padding 1) and a 1x1 (padding 0) branch with the same "
                             f"stride and groups")
    except AttributeError as exc:
        ctx.refuse(f"{where}: not a RepConvN with conv1/conv2 branches ({exc})")
    except ValueError as exc:
        ctx.refuse(str(exc))
    if identity is not None and (conv3.in_channels != conv3.out_channels or tuple(conv3.stride) != (1, 1)):
        ctx.refuse(f"{where}: an identity branch needs equal in/out channels and stride 1")
    weight, bias = repconv_kernel_bias(branch3, branch1, identity)
    new = copy_module(old)
    for attr in ("conv1", "conv2", "bn", "id_tensor", "nm"):  # what the official fuse_convs deletes
        if attr in new.__dict__ or attr in new._modules or attr in new._buffers:
            delattr(new, attr)
    new.conv = conv_like(conv3, weight, bias)
    try:
        set_forward(new, forward)
    except ValueError as exc:
        ctx.refuse(str(exc))
    branches = ["conv1", "conv2"] + (["bn"] if identity is not None else [])
    bn_of = {"conv1": "conv1.bn", "conv2": "conv2.bn", "bn": "bn"}
    weight_from = tuple(name for b in branches for name in
                        ((f"{b}.conv.weight",) if b != "bn" else ()) + tuple(f"{bn_of[b]}.{t}" for t in WEIGHT_SOURCES))
    bias_from = tuple(name for b in branches for name in
                      ((f"{b}.conv.bias",) if b != "bn" and getattr(old, b).conv.bias is not None else ())
                      + tuple(f"{bn_of[b]}.{t}" for t in BIAS_SOURCES))
    ctx.set_module(node, new, sources_with(new, {"conv.weight": weight_from, "conv.bias": bias_from}))
