"""``fold_batchnorm`` on a graph traced down to torch layers: Conv -> BatchNorm nodes become one node.

Oracle: ``torch.nn.utils.fusion.fuse_conv_bn_eval`` and the model's own output.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import fxrewrite
from fxrewrite import Pattern, RewriteError, Rule

from test_fuse_conv_bn import randomised

FOLD = Rule("fold", "fold_batchnorm", Pattern(module_class="BatchNorm2d", capture="bn",
                                              inputs=[Pattern(module_class="Conv2d", capture="conv")]),
            args={"conv": "$conv", "bn": "$bn"})


@pytest.mark.parametrize("bias", [False, True])
def test_conv_and_batchnorm_nodes_become_one(bias):
    torch.manual_seed(0)
    model = randomised(nn.Sequential(nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Conv2d(4, 2, 1, bias=bias), nn.BatchNorm2d(2)))
    x = torch.randn(2, 3, 8, 8)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), [FOLD])
    assert [n.target for n in result.module.graph.nodes if n.op == "call_module"] == ["0", "2", "3"]
    assert result.nodes_with_status("collapsed") == ["_1", "_4"]
    assert result.nodes_with_status("replaced") == ["_0", "_3"]
    for conv, bn in (("0", "1"), ("3", "4")):
        reference = fuse_conv_bn_eval(model.get_submodule(conv), model.get_submodule(bn))
        folded = result.module.get_submodule(conv)
        torch.testing.assert_close(folded.weight, reference.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(folded.bias, reference.bias, rtol=1e-5, atol=1e-6)
        assert result.param_map[f"{conv}.weight"] == (f"{conv}.weight", f"{bn}.weight", f"{bn}.running_var")
        assert result.param_map[f"{conv}.bias"] == ((f"{conv}.bias",) if bias else ()) + (
            f"{bn}.weight", f"{bn}.bias", f"{bn}.running_mean", f"{bn}.running_var")
    assert result.log[0].dropped == ["1.num_batches_tracked", "4.num_batches_tracked"]
    assert set(result.param_map) == {f"{c}.{t}" for c in ("0", "3") for t in ("weight", "bias")}
    torch.testing.assert_close(result.module(x), model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(model[1], nn.BatchNorm2d) and (model[0].bias is not None) == bias  # the input is untouched


def test_a_convolution_read_twice_is_not_folded():
    class Forked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    gm = fxrewrite.trace(randomised(Forked()), torch.randn(1, 3, 4, 4))
    with pytest.raises(RewriteError, match="^rule 'fold': bn must read conv, and nothing else may read it$"):
        fxrewrite.rewrite(gm, [FOLD])
    # a pattern that says so matches nothing instead
    guarded = Rule("fold", "fold_batchnorm", Pattern(module_class="BatchNorm2d", capture="bn", inputs=[
        Pattern(module_class="Conv2d", num_users=1, capture="conv")]), args={"conv": "$conv", "bn": "$bn"})
    assert fxrewrite.rewrite(gm, [guarded]).log[0].matches == 0


def test_a_batchnorm_without_running_statistics_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    gm = fxrewrite.trace(model, torch.randn(2, 3, 4, 4))
    with pytest.raises(RewriteError, match="the BatchNorm keeps no running statistics"):
        fxrewrite.rewrite(gm, [FOLD])
