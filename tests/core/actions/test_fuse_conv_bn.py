"""``fuse_conv_bn`` on plain torch blocks: the block's BatchNorm folded into its convolution.

Oracle: torch's own ``torch.nn.utils.fusion.fuse_conv_bn_eval`` on the same convolution and
BatchNorm (random weights and running statistics), compared within float tolerance, and the
block's output before and after.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import fxrewrite
from fxrewrite import Pattern, RewriteError, Rule


class Block(nn.Module):
    """conv -> bn -> act, with a ``forward_fused`` for when the BatchNorm is gone (as YOLO's Conv)."""

    def __init__(self, c1: int, c2: int, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fused(self, x):
        return self.act(self.conv(x))


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.1)
    return model.eval()


BN = ("weight", "bias", "running_mean", "running_var")


@pytest.mark.parametrize("bias", [False, True])
def test_blocks_are_fused_as_torch_fuses_them(bias):
    torch.manual_seed(0)
    model = randomised(nn.Sequential(Block(3, 4, bias), Block(4, 4, bias)))
    x = torch.randn(2, 3, 8, 8)
    gm = fxrewrite.trace(model, x, leaf_classes=["Block"])
    result = fxrewrite.rewrite(gm, [Rule("fuse", "fuse_conv_bn", Pattern(module_class="Block"),
                                         args={"forward": "forward_fused"})])
    assert result.nodes_with_status("replaced") == ["_0", "_1"]
    for i in ("0", "1"):
        fused = result.module.get_submodule(i)
        assert not hasattr(fused, "bn") and fused.forward.__func__ is Block.forward_fused
        reference = fuse_conv_bn_eval(model[int(i)].conv, model[int(i)].bn)
        torch.testing.assert_close(fused.conv.weight, reference.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.conv.bias, reference.bias, rtol=1e-5, atol=1e-6)
        assert result.param_map[f"{i}.conv.weight"] == (f"{i}.conv.weight", f"{i}.bn.weight", f"{i}.bn.running_var")
        assert result.param_map[f"{i}.conv.bias"] == ((f"{i}.conv.bias",) if bias else ()) + tuple(
            f"{i}.bn.{t}" for t in BN)
        assert hasattr(model[int(i)], "bn")  # the input is untouched
    assert result.log[0].dropped == ["0.bn.num_batches_tracked", "1.bn.num_batches_tracked"]
    torch.testing.assert_close(result.module(x), model(x), rtol=1e-5, atol=1e-5)


def test_without_a_forward_the_block_keeps_its_own_and_fails_without_its_bn():
    model = randomised(nn.Sequential(Block(3, 4)))
    gm = fxrewrite.trace(model, torch.randn(1, 3, 8, 8), leaf_classes=["Block"])
    with pytest.raises(RewriteError, match="shape propagation failed on the rewritten graph: node _0 failed: "
                                           "AttributeError"):
        fxrewrite.rewrite(gm, [Rule("fuse", "fuse_conv_bn", Pattern(module_class="Block"))])


@pytest.mark.parametrize("args, message", [
    ({"bn": "norm"}, "rule 'fuse': Block has no attribute `norm`"),
    ({"conv": "act", "bn": "bn"}, "rule 'fuse': 0 (Block): SiLU is not a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear"),
    ({"forward": "forward_nothing"}, "rule 'fuse': Block has no method 'forward_nothing' to use as forward"),
])
def test_what_cannot_be_fused_is_refused(args, message):
    model = randomised(nn.Sequential(Block(3, 4)))
    gm = fxrewrite.trace(model, torch.randn(1, 3, 8, 8), leaf_classes=["Block"])
    with pytest.raises(RewriteError) as info:
        fxrewrite.rewrite(gm, [Rule("fuse", "fuse_conv_bn", Pattern(module_class="Block"), args=args)])
    assert str(info.value) == message
