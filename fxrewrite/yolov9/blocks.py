"""Backbone and neck building blocks of YOLOv9 / GELAN.

Why this module is long: it holds one class per official block (fourteen), each a fact of the
checkpoint format, under the compatibility rules below; split, the rules would be stated twice.

These classes reproduce the layers of the reference YOLOv9 implementation so
that its checkpoints load without key remapping and produce bit-identical
outputs.  Three compatibility rules shape the code below:

* Class names, attribute names and sub-module names are part of the
  checkpoint format (``model.3.cv2.0.m.0.cv1.conv1.bn.weight``), so they are
  kept exactly as the reference spells them, even where a more descriptive
  name would read better.
* ``forward`` methods only touch attributes that reference instances carry.
  A whole pickled reference model re-bound to these classes therefore runs
  unchanged.
* Every forward uses the same tensor operations in the same order as the
  reference (e.g. ``chunk`` rather than an equivalent ``split``, stack+sum
  rather than chained additions), because a different reduction order would
  change floating point results in the last bits.

Detection / segmentation heads live in :mod:`fxrewrite.yolov9.heads`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import conv_like, fold_batchnorm, folded_conv

__all__ = [
    "autopad",
    "default_activation",
    "make_default_activation",
    "fuse_conv_bn",
    "identity_kernel",
    "repconv_kernel_bias",
    "Conv",
    "AConv",
    "ADown",
    "ELAN1",
    "RepConvN",
    "RepNBottleneck",
    "RepNCSP",
    "RepNCSPELAN4",
    "SP",
    "SPPELAN",
    "CBLinear",
    "CBFuse",
    "Silence",
    "Concat",
]


# --------------------------------------------------------------------------
# Activation selection
# --------------------------------------------------------------------------
# The reference switches the activation of every Conv by assigning a module to
# a class attribute, which leaks into every model built afterwards.  Here the
# activation is a *factory* held in a context variable: the builder sets it
# for the duration of one model construction, and every Conv gets its own
# activation instance (so torch.fx sees one call_module target per layer).
_ACTIVATION_FACTORY: contextvars.ContextVar[Callable[[], nn.Module]] = contextvars.ContextVar(
    "fxrewrite_yolov9_activation", default=nn.SiLU
)


@contextlib.contextmanager
def default_activation(factory: Callable[[], nn.Module]) -> Iterator[None]:
    """Make ``factory()`` the activation of ``Conv``/``RepConvN`` built inside the block."""
    token = _ACTIVATION_FACTORY.set(factory)
    try:
        yield
    finally:
        _ACTIVATION_FACTORY.reset(token)


def make_default_activation() -> nn.Module:
    """A fresh instance of the activation currently in effect (SiLU unless overridden)."""
    return _ACTIVATION_FACTORY.get()()


def _activation_from_flag(act: bool | nn.Module) -> nn.Module:
    """Translate the reference ``act`` argument: True -> default, a module -> itself, else none."""
    if act is True:
        return make_default_activation()
    if isinstance(act, nn.Module):
        return act
    return nn.Identity()


def autopad(k, p=None, d=1):
    """Padding that keeps the spatial size for stride 1 ("same" padding).

    ``k`` may be an int or a per-dimension sequence; ``d`` is the dilation,
    which widens the effective kernel to ``d * (k - 1) + 1``.  An explicit
    ``p`` is returned untouched.
    """
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (size - 1) + 1 for size in k]
    if p is not None:
        return p
    return k // 2 if isinstance(k, int) else [size // 2 for size in k]


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Fold an inference-mode BatchNorm into the preceding convolution.

    Returns a new biased ``nn.Conv2d`` (gradients disabled) computing
    ``bn(conv(x))`` with BatchNorm running statistics: the core
    :func:`fxrewrite.modules.folded_conv`, bitwise the official ``fuse_conv_and_bn``.
    """
    return folded_conv(conv, bn, "fuse_conv_bn")


def identity_kernel(conv: nn.Conv2d) -> torch.Tensor:
    """The 3x3 kernel of the identity map with ``conv``'s channels and groups (the optional
    BatchNorm identity branch of a RepConvN, as a convolution); needs in = out channels, stride 1."""
    per_group = conv.in_channels // conv.groups
    kernel = torch.zeros(conv.out_channels, per_group, 3, 3, dtype=conv.weight.dtype, device=conv.weight.device)
    channels = torch.arange(conv.out_channels, device=conv.weight.device)
    kernel[channels, channels % per_group, 1, 1] = 1.0
    return kernel


@torch.no_grad()
def repconv_kernel_bias(branch3: nn.Module, branch1: nn.Module,
                        identity: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One 3x3 kernel and bias equal to a RepConvN's branches: the 3x3 and 1x1 Conv+BN branches
    (``.conv``, ``.bn``) and the optional BatchNorm ``identity`` branch, each folded by the core
    :func:`fxrewrite.modules.fold_batchnorm` and summed in the official order (bitwise the
    official ``get_equivalent_kernel_bias``). Used by :meth:`RepConvN.fuse_convs` and the
    ``fuse_repconv`` action alike."""
    w3, b3 = fold_batchnorm(branch3.conv.weight, branch3.conv.bias, branch3.bn)
    w1, b1 = fold_batchnorm(branch1.conv.weight, branch1.conv.bias, branch1.bn)
    weight, bias = w3 + F.pad(w1, [1, 1, 1, 1]), b3 + b1  # the 1x1 tap sits at the 3x3 centre
    if identity is not None:
        w_id, b_id = fold_batchnorm(identity_kernel(branch3.conv), None, identity)
        weight, bias = weight + w_id, bias + b_id
    return weight, bias


# --------------------------------------------------------------------------
# Convolutions
# --------------------------------------------------------------------------
class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> activation.

    Arguments follow the reference order: ``(c1, c2, k, s, p, g, d, act)`` =
    input channels, output channels, kernel, stride, padding (``None`` for
    "same"), groups, dilation, activation (True = default SiLU, a module =
    that module, anything else = identity).
    """

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = _activation_from_flag(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        """Forward after the BatchNorm has been folded into ``self.conv``."""
        return self.act(self.conv(x))


class AConv(nn.Module):
    """Downsampling by 2: a 2x2 stride-1 average blur, then a 3x3 stride-2 Conv."""

    def __init__(self, c1, c2):
        super().__init__()
        self.cv1 = Conv(c1, c2, 3, 2, 1)

    def forward(self, x):
        # Positional arguments: kernel 2, stride 1, padding 0, ceil_mode False,
        # count_include_pad True (the reference call, spelled out).
        x = F.avg_pool2d(x, 2, 1, 0, False, True)
        return self.cv1(x)


class ADown(nn.Module):
    """Downsampling by 2 with two half-width paths.

    After a 2x2 average blur the channels are halved: one half goes through a
    3x3 stride-2 Conv, the other through 3x3 stride-2 max pooling and a 1x1
    Conv; the results are concatenated to ``c2`` channels.
    """

    def __init__(self, c1, c2):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1 // 2, self.c, 3, 2, 1)
        self.cv2 = Conv(c1 // 2, self.c, 1, 1, 0)

    def forward(self, x):
        x = F.avg_pool2d(x, 2, 1, 0, False, True)
        conv_half, pool_half = x.chunk(2, 1)
        conv_half = self.cv1(conv_half)
        pool_half = self.cv2(F.max_pool2d(pool_half, 3, 2, 1))
        return torch.cat((conv_half, pool_half), 1)


class RepConvN(nn.Module):
    """Re-parameterisable 3x3 conv: a 3x3 Conv+BN branch plus a 1x1 Conv+BN branch.

    During training both branches are summed before the activation.  For
    deployment :meth:`fuse_convs` merges them into a single biased 3x3
    ``self.conv`` and :meth:`forward_fuse` uses it.  ``bn`` is an optional
    identity branch; YOLOv9 never enables it (it is always ``None``) but the
    attribute is part of the reference layout.
    """

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, d=1, act=True, bn=False, deploy=False):
        super().__init__()
        if k != 3 or p != 1:
            raise ValueError(f"RepConvN supports only k=3, p=1 (got k={k}, p={p})")
        self.g = g
        self.c1 = c1
        self.c2 = c2
        self.act = _activation_from_flag(act)
        self.bn = None
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=(p - k // 2), g=g, act=False)

    def forward(self, x):
        summed = self.conv1(x) + self.conv2(x)
        if self.bn is not None:
            summed = summed + self.bn(x)
        return self.act(summed)

    def forward_fuse(self, x):
        """Forward after :meth:`fuse_convs`."""
        return self.act(self.conv(x))

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Single 3x3 kernel and bias equivalent to the sum of all branches."""
        return repconv_kernel_bias(self.conv1, self.conv2, self.bn)

    @torch.no_grad()
    def fuse_convs(self) -> None:
        """Replace the branches by one biased 3x3 ``self.conv`` (idempotent)."""
        if hasattr(self, "conv"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        self.conv = conv_like(self.conv1.conv, kernel, bias)
        del self.conv1
        del self.conv2
        del self.bn


# --------------------------------------------------------------------------
# CSP / ELAN aggregation blocks
# --------------------------------------------------------------------------
class RepNBottleneck(nn.Module):
    """RepConvN then Conv, with a residual connection when shapes allow it."""

    def __init__(self, c1, c2, shortcut=True, g=1, k=(3, 3), e=0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = RepConvN(c1, hidden, k[0], 1)
        self.cv2 = Conv(hidden, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class RepNCSP(nn.Module):
    """Cross-stage-partial block whose inner path is ``n`` RepNBottlenecks.

    Two 1x1 projections split the input into a processed path (``cv1`` ->
    ``m``) and a bypass (``cv2``); ``cv3`` merges their concatenation.
    """

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*(RepNBottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class RepNCSPELAN4(nn.Module):
    """GELAN aggregation block.

    ``cv1`` projects to ``c3`` channels which are cut in two halves; the second
    half feeds a chain of two stages (RepNCSP with ``c5`` bottlenecks + 3x3
    Conv, each ``c4`` wide).  Both halves and both stage outputs are
    concatenated and projected to ``c2`` by ``cv4``.
    """

    def __init__(self, c1, c2, c3, c4, c5=1):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, c5), Conv(c4, c4, 3, 1))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, c5), Conv(c4, c4, 3, 1))
        self.cv4 = Conv(c3 + (2 * c4), c2, 1, 1)

    def forward(self, x):
        # Unpacking into names (not list()) keeps the block traceable by torch.fx.
        kept, chained = self.cv1(x).chunk(2, 1)
        return self._aggregate(kept, chained)

    def forward_split(self, x):
        """Same result as :meth:`forward`, cutting with ``split`` (export friendly)."""
        kept, chained = self.cv1(x).split((self.c, self.c), 1)
        return self._aggregate(kept, chained)

    def _aggregate(self, kept, chained):
        """ELAN fan-out: chain the stages off the second half and concatenate every tensor."""
        stage1 = self.cv2(chained)
        stage2 = self.cv3(stage1)
        return self.cv4(torch.cat([kept, chained, stage1, stage2], 1))


class ELAN1(nn.Module):
    """Light GELAN block (used by the tiny/small models): like RepNCSPELAN4 with plain 3x3 Convs as stages."""

    def __init__(self, c1, c2, c3, c4):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = Conv(c3 // 2, c4, 3, 1)
        self.cv3 = Conv(c4, c4, 3, 1)
        self.cv4 = Conv(c3 + (2 * c4), c2, 1, 1)

    def forward(self, x):
        # Unpacking into names (not list()) keeps the block traceable by torch.fx.
        kept, chained = self.cv1(x).chunk(2, 1)
        return self._aggregate(kept, chained)

    def forward_split(self, x):
        """Same result as :meth:`forward`, cutting with ``split`` (export friendly)."""
        kept, chained = self.cv1(x).split((self.c, self.c), 1)
        return self._aggregate(kept, chained)

    def _aggregate(self, kept, chained):
        """ELAN fan-out: chain the stages off the second half and concatenate every tensor."""
        stage1 = self.cv2(chained)
        stage2 = self.cv3(stage1)
        return self.cv4(torch.cat([kept, chained, stage1, stage2], 1))


# --------------------------------------------------------------------------
# Spatial pyramid pooling
# --------------------------------------------------------------------------
class SP(nn.Module):
    """Size-preserving max pooling (``k`` x ``k``, stride ``s``, padding ``k // 2``)."""

    def __init__(self, k=3, s=1):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x):
        return self.m(x)


class SPPELAN(nn.Module):
    """SPP in ELAN form: project to ``c3``, pool three times in a row, concat all four, project to ``c2``."""

    def __init__(self, c1, c2, c3):
        super().__init__()
        self.c = c3
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = SP(5)
        self.cv3 = SP(5)
        self.cv4 = SP(5)
        self.cv5 = Conv(4 * c3, c2, 1, 1)

    def forward(self, x):
        pyramid = [self.cv1(x)]
        for pool in (self.cv2, self.cv3, self.cv4):
            pyramid.append(pool(pyramid[-1]))
        return self.cv5(torch.cat(pyramid, 1))


# --------------------------------------------------------------------------
# CBNet routing (the PGI auxiliary branch) and plumbing layers
# --------------------------------------------------------------------------
class CBLinear(nn.Module):
    """One biased convolution whose output is cut into pieces of ``c2s`` channels.

    Returns a tuple of tensors; a later :class:`CBFuse` picks one piece per
    resolution.
    """

    def __init__(self, c1, c2s, k=1, s=1, p=None, g=1):
        super().__init__()
        self.c2s = c2s
        self.conv = nn.Conv2d(c1, sum(c2s), k, s, autopad(k, p), groups=g, bias=True)

    def forward(self, x):
        return self.conv(x).split(self.c2s, dim=1)


class CBFuse(nn.Module):
    """Sum a main-branch tensor with pieces routed from CBLinear layers.

    Input is ``[cblinear_out_0, ..., cblinear_out_k, target]``; piece
    ``idx[i]`` of the i-th routed output is resized (nearest) to the
    target's spatial size and everything is summed.
    """

    def __init__(self, idx):
        super().__init__()
        self.idx = idx

    def forward(self, xs):
        target = xs[-1]
        resized = [
            F.interpolate(routed[self.idx[i]], size=target.shape[2:], mode="nearest")
            for i, routed in enumerate(xs[:-1])
        ]
        # stack + sum (not a chain of "+"): the reduction order decides the
        # rounding of the result and must match the reference bit for bit.
        return torch.sum(torch.stack(resized + [target]), dim=0)


class Silence(nn.Module):
    """Identity.  Placed at layer 0 so that other layers can refer to the raw input as layer 0."""

    def forward(self, x):
        return x


class Concat(nn.Module):
    """Concatenate a list of tensors along dimension ``d`` (channels by default)."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)
