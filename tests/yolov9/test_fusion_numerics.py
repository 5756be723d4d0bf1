"""Fusion on non-trivial numbers: BatchNorms whose weight, bias, running mean and variance are all
away from their initial values, compared with the official code bitwise where it is the oracle,
and checks that fail when a BatchNorm is not folded in.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxrewrite
from helpers.yolo_deploy import converted, fused, image
from fxrewrite import Pattern, Rule
from fxrewrite.verify import Tolerance
from fxrewrite.yolov9 import tolerances
from fxrewrite.yolov9.blocks import RepConvN
from fxrewrite.yolov9.deploy import fuse
from helpers.official import official, requires_official


def trained_looking(*batchnorms: nn.BatchNorm2d, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in batchnorms:
            shape = bn.weight.shape
            bn.weight.copy_(torch.rand(shape, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(shape, generator=gen) * 0.5)
            bn.running_mean.copy_(torch.randn(shape, generator=gen) * 0.5)
            bn.running_var.copy_(torch.rand(shape, generator=gen) + 0.5)


def assert_nontrivial(model: nn.Module) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert not torch.all(bn.weight == 1) and not torch.all(bn.bias == 0)
        assert not torch.all(bn.running_mean == 0) and not torch.all(bn.running_var == 1)


@requires_official
def test_the_fused_gelan_is_bitwise_the_official_fuse_with_trained_looking_batchnorms():
    source = converted().model  # yolov9-t, every BatchNorm randomised (weight, bias, mean, var)
    assert_nontrivial(source)
    reference = official().build("gelan-t.yaml", nc=80)
    reference.load_state_dict(source.state_dict())
    reference.eval().fuse()
    ours = fused().model.state_dict()
    assert ours.keys() == reference.state_dict().keys()
    assert all(torch.equal(t, reference.state_dict()[k]) for k, t in ours.items())
    x = image(160)
    with torch.no_grad():
        assert torch.equal(fused().model(x)[0], reference(x)[0])
    # The model's own fuse() (the official method, in place) folds through the same core maths.
    with torch.no_grad():
        in_place = copy.deepcopy(source).eval().fuse()
    assert in_place.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(t, reference.state_dict()[k]) for k, t in in_place.state_dict().items())


@requires_official
@pytest.mark.parametrize("groups", [1, 2])
def test_the_optional_batchnorm_identity_branch_of_repconvn_fuses_bitwise_like_the_official(groups):
    # YOLOv9 never enables RepConvN's identity branch (bn is None), but the official fuse_convs folds it
    # when it is there, and so does the rule.
    off = official()
    torch.manual_seed(0)
    theirs = off.common.RepConvN(8, 8, g=groups)
    theirs.bn = nn.BatchNorm2d(8)
    trained_looking(theirs.conv1.bn, theirs.conv2.bn, theirs.bn, seed=groups)
    ours = RepConvN(8, 8, g=groups)
    ours.bn = nn.BatchNorm2d(8)
    ours.load_state_dict(theirs.state_dict())
    model = nn.Sequential(ours).eval()
    theirs.eval()
    x = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        unfused = theirs(x)
        without_identity = theirs.act(theirs.conv1(x) + theirs.conv2(x))
    assert (unfused - without_identity).abs().max() > 0.1  # the identity branch matters here
    fusion = fuse(model, example=torch.zeros(1, 8, 12, 12))
    assert [entry.rewrites for entry in fusion.result.log] == [1, 0]
    block = fusion.model[0]
    assert set(block._modules) == {"act", "conv"} and "bn" not in block.__dict__
    theirs.fuse_convs()
    theirs.forward = theirs.forward_fuse
    assert torch.equal(block.conv.weight, theirs.conv.weight) and torch.equal(block.conv.bias, theirs.conv.bias)
    with torch.no_grad():
        assert torch.equal(fusion.model(x), theirs(x))
    assert fusion.verify(x).passed  # and within the fusion tolerance of the unfused block


def _conv_bn_relu(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8), nn.ReLU())
    trained_looking(model[1], seed=seed)
    return model.eval()


def test_fold_batchnorm_with_trained_statistics_and_a_check_that_sees_a_dropped_batchnorm():
    model = _conv_bn_relu(1)
    gm = fxrewrite.trace(model, torch.zeros(1, 3, 8, 8))
    pattern = Pattern(module_class="BatchNorm2d", capture="bn",
                      inputs=[Pattern(module_class="Conv2d", num_users=1, capture="conv")])
    result = fxrewrite.rewrite(gm, [Rule("fold", "fold_batchnorm", pattern, args={"conv": "$conv", "bn": "$bn"})])
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    tol = tolerances.fusion_tolerance(torch.float32)
    assert fxrewrite.verify(model, result.module, x, tolerance=tol).passed
    # The same check fails on the BatchNorm dropped, or only half folded: it can see a wrong fold.
    dropped = nn.Sequential(model[0], nn.Identity(), model[2])
    assert not fxrewrite.verify(model, dropped, x, tolerance=tol).passed
    scaled_only = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.ReLU()).eval()
    with torch.no_grad():
        bn = model[1]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        scaled_only[0].weight.copy_(model[0].weight * scale.reshape(-1, 1, 1, 1))
        scaled_only[0].bias.copy_(model[0].bias)  # the shift forgotten
    assert not fxrewrite.verify(model, scaled_only, x, tolerance=tol).passed


def test_fusion_verify_fails_when_the_batchnorms_are_not_folded_in(monkeypatch):
    # A fold that ignores the BatchNorm (a plausible bug): the fused model's --verify must FAIL.
    from fxrewrite import modules
    from fxrewrite.yolov9 import blocks

    def ignore_batchnorm(weight, bias, bn):
        return weight, bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)

    real = fused()  # folded before the patch
    monkeypatch.setattr(modules, "fold_batchnorm", ignore_batchnorm)  # Conv+BN folding (modules.folded_conv)
    monkeypatch.setattr(blocks, "fold_batchnorm", ignore_batchnorm)  # RepConvN merging (blocks.repconv_kernel_bias)
    broken = fuse(converted().model)
    report = broken.verify(image(64))
    assert not report.passed and report.max_abs_diff > 1.0
    assert report.summary().startswith("FAIL: 4 output tensor(s)")
    assert real.verify(image(64)).passed  # the real fold passes the same check


def test_the_stated_fusion_tolerance_is_what_fusion_verify_uses():
    report = fused().verify(image(64))
    assert report.tolerance == tolerances.FUSION[torch.float32] == Tolerance(atol=1e-4, rtol=1e-5)
    assert fused().verify(image(64), Tolerance(atol=1.0)).tolerance == Tolerance(atol=1.0)
    with pytest.raises(fxrewrite.VerifyError, match="no stated fusion tolerance for bfloat16"):
        fused().verify(image(64).bfloat16())
