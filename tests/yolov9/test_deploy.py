"""Deployment fusion as rules (rules/deploy.yaml, fxrewrite.yolov9.deploy, fxrewrite.actions.fuse)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import fxrewrite
from helpers.yolo_deploy import (
    OFFICIAL_FUSED_PARAMETERS,
    assert_close_fp32,
    converted,
    fused,
    image,
    predictions,
    training,
)
from fxrewrite import Pattern, Rule
from fxrewrite.cli import main
from fxrewrite.tensors import named_tensors
from fxrewrite.yolov9 import DetectionModel, SegmentationModel, convert
from fxrewrite.yolov9.blocks import Conv, RepConvN
from fxrewrite.yolov9.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fxrewrite.yolov9.deploy import FusionError, compose_param_maps, deploy_rules, fuse, unfused_blocks
from helpers.official import official, official_available, requires_official


# -- the rule file ---------------------------------------------------------------------
def test_deploy_rules_are_a_shipped_rule_file():
    rules = deploy_rules()
    assert [r.name for r in rules] == ["merge-repconvn-branches", "fold-conv-batchnorm"]
    assert [r.action for r in rules] == ["fuse_repconv", "fuse_conv_bn"]
    assert main(["rules", "deploy"]) == 0


# -- numbers -----------------------------------------------------------------------------
def test_fused_output_matches_the_unfused_converted_model_at_640():
    conversion, fusion = converted(), fused()
    x = image(640)
    unfused, result = predictions(conversion.model, x), predictions(fusion.model, x)
    assert_close_fp32(result, unfused)
    # The difference is float32 rounding, not an error of the fusion: the fused model is as close
    # to an fp64 evaluation of the unfused model as the unfused fp32 model itself is.
    exact = predictions(copy.deepcopy(conversion.model).double(), x.double())
    assert (result.double() - exact).abs().max() <= 2 * (unfused.double() - exact).abs().max()


def test_five_fused_parameter_counts_equal_the_official_fuse():
    # Built, converted and fused on the meta device: the counts need no memory and no arithmetic
    # (nor shape checks, which BatchNorm makes slow on meta; the rules are checked on yolov9-t above).
    for variant, expected in OFFICIAL_FUSED_PARAMETERS.items():
        with torch.device("meta"):
            model = DetectionModel(f"yolov9-{variant}")
        fusion = fuse(convert(model.eval()).model, check_shapes=False)
        assert fusion.params_after == expected, variant
        assert unfused_blocks(fusion.model) == [], variant


def test_fused_segmentation_model_count_equals_the_official_fuse():
    with torch.device("meta"):  # the segmentation head's Proto has Conv blocks too
        model = SegmentationModel("gelan-c-dseg")
    fusion = fuse(model.eval(), check_shapes=False)
    assert fusion.params_after == 27_447_616  # official gelan-c-dseg after fuse(), nc=80
    assert unfused_blocks(fusion.model) == []


# -- structure: what the official fuse() leaves -------------------------------------------
def test_fused_blocks_have_the_official_structure():
    model = fused().model
    convs = [m for m in model.modules() if isinstance(m, Conv)]
    reps = [m for m in model.modules() if isinstance(m, RepConvN)]
    assert len(convs) == 137 and len(reps) == 42
    for m in convs:
        assert not hasattr(m, "bn") and m.conv.bias is not None
        assert m.__dict__["forward"].__func__ is Conv.forward_fuse and m.forward.__self__ is m
    for m in reps:
        assert {"conv1", "conv2"}.isdisjoint(m._modules) and "bn" not in m.__dict__
        assert set(m._modules) == {"act", "conv"} and tuple(m.conv.kernel_size) == (3, 3)
        assert m.__dict__["forward"].__func__ is RepConvN.forward_fuse
    assert not any(p.requires_grad for m in convs + reps for p in m.conv.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fusing_leaves_the_input_untouched_and_shares_unfused_tensors():
    source = converted().model
    before = {name: t.clone() for name, t in named_tensors(source)}
    fusion = fuse(source)
    assert unfused_blocks(source) == unfused_blocks(converted().model) != []
    assert all(torch.equal(before[name], t) for name, t in named_tensors(source))
    assert "forward" not in source.model[0].__dict__
    # the head's last 1x1 convolutions and the DFL have no BatchNorm: the very same tensors
    assert fusion.model.model[-1].dfl.conv.weight is source.model[-1].dfl.conv.weight
    assert fusion.model.model[-1].cv3[0][2].weight is source.model[-1].cv3[0][2].weight


def test_fusing_a_fused_model_changes_nothing():
    again = fuse(fused().model)
    assert [e.rewrites for e in again.result.log] == [0, 0]
    assert all(len(e.rejected) == e.matches > 0 for e in again.result.log)
    assert "has no submodule 'bn'" in again.result.log[1].rejected[0].reason
    assert again.params_after == fused().params_after


# -- provenance ------------------------------------------------------------------------
def test_each_fused_tensor_records_what_it_was_computed_from():
    fusion, source = fused(), converted().model
    names = dict(named_tensors(source))
    assert set(fusion.param_map) == {n for n, _ in named_tensors(fusion.model)}
    assert fusion.param_map["model.0.conv.weight"] == ("model.0.conv.weight", "model.0.bn.weight",
                                                        "model.0.bn.running_var")
    assert fusion.param_map["model.0.conv.bias"] == ("model.0.bn.weight", "model.0.bn.bias",
                                                      "model.0.bn.running_mean", "model.0.bn.running_var")
    rep = "model.4.cv2.0.m.0.cv1"  # a RepConvN: both branches feed the merged kernel and bias
    assert fusion.param_map[f"{rep}.conv.weight"] == tuple(
        f"{rep}.{b}.{t}" for b in ("conv1", "conv2") for t in ("conv.weight", "bn.weight", "bn.running_var"))
    assert len(fusion.param_map[f"{rep}.conv.bias"]) == 8
    assert fusion.param_map["model.22.dfl.conv.weight"] == "model.22.dfl.conv.weight"
    used = set()
    for origin in fusion.param_map.values():
        used.update(origin if isinstance(origin, tuple) else (origin,))
    assert used <= set(names)
    # everything else of the input was only counting batches: listed as dropped in the log
    dropped = {name for entry in fusion.result.log for name in entry.dropped}
    assert set(names) - used == dropped and all(n.endswith("num_batches_tracked") for n in dropped)


def test_provenance_composes_down_to_the_training_model():
    conversion, fusion = converted(), fused()
    to_training = compose_param_maps(fusion.param_map, conversion.param_map)
    training_names = {n for n, _ in named_tensors(conversion.source)}
    assert to_training["model.22.cv2.0.0.conv.weight"] == ("model.29.cv4.0.0.conv.weight",
                                                           "model.29.cv4.0.0.bn.weight",
                                                           "model.29.cv4.0.0.bn.running_var")
    for origin in to_training.values():
        assert set(origin if isinstance(origin, tuple) else (origin,)) <= training_names


# -- checkpoints ---------------------------------------------------------------------------
def test_a_fused_model_saves_and_loads_with_its_fused_forwards(tmp_path):
    model = fused().model
    path = save_checkpoint(model, tmp_path / "fused.pt")
    loaded = load_checkpoint(path).model.eval()
    assert unfused_blocks(loaded) == [] and not hasattr(loaded.model[0], "bn")
    assert loaded.model[0].__dict__["forward"].__self__ is loaded.model[0]
    x = image(160)
    expected = predictions(copy.deepcopy(model).half().float(), x)  # the file holds fp16 weights
    assert torch.equal(predictions(loaded, x), expected)


def test_the_getattr_a_fused_checkpoint_needs_is_limited_to_forward_fuse(tmp_path):
    class Sneaky:
        def __reduce__(self):
            return getattr, (nn.Conv2d(1, 1, 1), "register_forward_hook")

    path = tmp_path / "sneaky.pt"
    torch.save({"model": nn.Conv2d(1, 1, 1), "date": Sneaky()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    from fxrewrite.yolov9.classes import fused_forward

    with pytest.raises(pickle.UnpicklingError, match="may only refer to the forward_fuse method"):
        fused_forward(nn.Conv2d(1, 1, 1), "register_forward_hook")
    with pytest.raises(pickle.UnpicklingError):
        fused_forward(Conv(1, 1), "__class__")
    block = Conv(1, 1)
    assert fused_forward(block, "forward_fuse").__self__ is block
    # The segmentation heads keep a detection head's forward function (self.detect = DDetect.forward).
    from fxrewrite.yolov9.heads import DDetect

    assert fused_forward(DDetect, "forward") is DDetect.forward
    for obj, name in ((DDetect, "__init__"), (nn.Conv2d, "forward"), (DDetect, "forward_fuse")):
        with pytest.raises(pickle.UnpicklingError, match=f"refused getattr\\({obj.__name__}, '{name}'\\)"):
            fused_forward(obj, name)


@requires_official
def test_blocks_the_trace_cannot_reach_are_reported_not_skipped():
    # The official RepNCSPELAN4 / ELAN1 iterate over a tensor (list(x.chunk(2, 1))): symbolic tracing
    # cannot enter them, so their Conv / RepConvN blocks are out of the rules' reach.
    reference = official().build("gelan-t.yaml", nc=80).eval()
    with pytest.raises(FusionError, match=r"does not reach 242 block\(s\).*model.2 \(ELAN1\) could not be "
                                          r"traced: TraceError: Proxy object cannot be iterated"):
        fuse(reference)
    partial = fuse(reference, strict=False)
    assert len(partial.unreached) == 242 and partial.result.log[1].rewrites == 21


@requires_official
def test_a_saved_fused_checkpoint_runs_in_the_official_code(tmp_path):
    off = official()
    path = save_checkpoint(fused().model, tmp_path / "fused.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ckpt["model"].float().eval()
    assert type(model) is off.yolo.DetectionModel and type(model.model[0]) is off.common.Conv
    x = image(160)
    expected = predictions(load_checkpoint(path).model.eval(), x)
    with torch.no_grad():
        assert torch.equal(model(x)[0], expected)
        model.fuse()  # what the official attempt_load does: a no-op on a fused model
        assert torch.equal(model(x)[0], expected)


# -- the CLI --------------------------------------------------------------------------------
def test_convert_fuse_writes_a_fused_checkpoint(tmp_path, capsys):
    import json

    out = tmp_path / "gelan-t.pt"
    assert main(["convert", "--config", "yolov9-t", "-o", str(out), "--fuse"]) == 0
    text = capsys.readouterr().out
    assert "fuse: parameters 2,442,640 -> 2,407,632" in text
    model = load_checkpoint(out).model
    assert unfused_blocks(model) == [] and sum(p.numel() for p in model.parameters()) == 2_407_632
    params = json.loads((tmp_path / "gelan-t.params.json").read_text())
    assert params["model.22.cv3.2.1.conv.bias"] == ["model.29.cv5.2.1.bn.weight", "model.29.cv5.2.1.bn.bias",
                                                    "model.29.cv5.2.1.bn.running_mean",
                                                    "model.29.cv5.2.1.bn.running_var"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gelan-t.params.json", "gelan-t.pt", "gelan-t.yaml"]


# -- the core actions, on models that are not YOLO ----------------------------------------------
class ConvBNAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x))


def _with_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -1, 1)
    return model.eval()


def test_fuse_conv_bn_on_a_nested_block_path():
    model = _with_statistics(nn.Sequential(ConvBNAct(), ConvBNAct().requires_grad_(False)))
    model[1].body[0] = nn.Conv2d(4, 4, 3, bias=True)
    gm = fxrewrite.trace(model, torch.zeros(1, 3, 12, 12), leaf_classes=["ConvBNAct"])
    rule = Rule("fold", "fuse_conv_bn", Pattern(module_class="ConvBNAct"), args={"conv": "body.0", "bn": "body.1"})
    result = fxrewrite.rewrite(gm, [rule])
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(result.module(x), model(x), atol=1e-5, rtol=1e-5)
    block = result.module.get_submodule("0")
    assert len(block.body) == 1 and isinstance(model[0].body[1], nn.BatchNorm2d)  # copy on write
    assert result.param_map["0.body.0.bias"] == ("0.body.0.bias", "0.body.1.weight", "0.body.1.bias",
                                                 "0.body.1.running_mean", "0.body.1.running_var")
    assert result.log[0].dropped == ["0.body.1.num_batches_tracked", "1.body.1.num_batches_tracked"]


def test_fold_batchnorm_refuses_a_batchnorm_without_running_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    gm = fxrewrite.trace(model, torch.zeros(1, 3, 8, 8))
    pattern = Pattern(module_class="BatchNorm2d", capture="bn", inputs=[Pattern(module_class="Conv2d", capture="c")])
    with pytest.raises(fxrewrite.RewriteError, match="running statistics"):
        fxrewrite.rewrite(gm, [Rule("fold", "fold_batchnorm", pattern, args={"conv": "$c", "bn": "$bn"})])
