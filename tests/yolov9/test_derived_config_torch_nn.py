"""A rule may replace a layer with a torch.nn class: the derived config must rebuild it exactly.

The derived config names such a layer as the config builder knows it (``nn.Upsample``, as the
official configs write it, not the bare class name ``Upsample``, which no builder knows) and
gives its constructor arguments read back from the module (``mode: bilinear``), so
``OUT.yaml`` builds the very layer ``OUT.pt`` holds. One case per torch.nn class the config
builder knows; settings a config line cannot express are refused, not written.
"""
from __future__ import annotations

import pytest
import torch
import yaml

from fxrewrite import load_rules
from fxrewrite.cli import main
from fxrewrite.yolov9 import ConversionError, DetectionModel, convert
from fxrewrite.yolov9.checkpoint import load_checkpoint
from fxrewrite.yolov9.model import registered_blocks

# Every torch.nn layer the config builder knows, on a small single-head model (strides 4, 8, 16).
TORCH_LAYERS = {
    "nc": 3, "depth_multiple": 1.0, "width_multiple": 0.5,
    "backbone": [
        [-1, 1, "nn.Identity", []],  # 0
        [-1, 1, "nn.ZeroPad2d", [1]],  # 1
        [-1, 1, "Conv", [32, 3, 2, 0]],  # 2  /2
        [-1, 1, "nn.BatchNorm2d", []],  # 3
        [-1, 1, "nn.MaxPool2d", [3, 1, 1]],  # 4
        [-1, 1, "Conv", [64, 3, 2]],  # 5  /4
        [-1, 1, "nn.ConvTranspose2d", [64, 2, 2]],  # 6  /2
        [-1, 1, "Conv", [64, 3, 2]],  # 7  /4
        [-1, 1, "Conv", [64, 3, 2]],  # 8  /8
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],  # 9  /4
    ],
    "head": [
        [[-1, 7], 1, "Concat", [1]],  # 10 /4
        [-1, 1, "Conv", [64, 3, 2]],  # 11 /8
        [-1, 1, "Conv", [64, 3, 2]],  # 12 /16
        [[10, 11, 12], 1, "DDetect", ["nc"]],
    ],
}


def rule(cls: str, init: dict) -> str:
    return yaml.safe_dump({"rules": [{"name": f"new-{cls}", "pattern": {"module_class": cls, "capture": "old"},
                                      "action": "replace", "args": {"with": f"nn.{cls}", "init": init}}]})


# class -> (the replacement's constructor arguments (tensors taken from the old layer by name),
#           the layer's index, its derived config args)
CASES = {
    "Identity": ({}, 0, []),
    "ZeroPad2d": ({"padding": [2, 0, 2, 0]}, 1, [[2, 0, 2, 0]]),
    "BatchNorm2d": ({"num_features": 16, "eps": 0.001, "momentum": 0.03}, 3, []),  # the builder's settings
    "MaxPool2d": ({"kernel_size": 5, "stride": 1, "padding": 2}, 4, [5, 1, 2]),
    "ConvTranspose2d": ({"in_channels": 32, "out_channels": 32, "kernel_size": 2, "stride": 2, "bias": False}, 6,
                        [64, [2, 2], [2, 2], [0, 0], [0, 0], 1, False]),  # 64 x width_multiple 0.5 = 32
    "Upsample": ({"scale_factor": 2.0, "mode": "bilinear"}, 9, [None, 2.0, "bilinear"]),
}


def test_every_torch_nn_class_the_builder_knows_has_a_case():
    known = {name.removeprefix("nn.") for name in registered_blocks() if name.startswith("nn.")}
    assert known == set(CASES)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DetectionModel(TORCH_LAYERS).eval()


@pytest.mark.parametrize("cls", list(CASES))
def test_a_torch_nn_layer_a_rule_built_round_trips_through_the_derived_config(model, cls):
    init, index, args = CASES[cls]
    conversion = convert(model, load_rules(rule(cls, init), name=f"new-{cls}"))
    layer = conversion.model.model[index]
    assert type(layer) is getattr(torch.nn, cls)
    line = (conversion.config["backbone"] + conversion.config["head"])[index]
    assert line == [index - 1 if index else -1, 1, f"nn.{cls}", args]
    conversion.check_config()
    rebuilt = DetectionModel(yaml.safe_load(yaml.safe_dump(conversion.config, sort_keys=False)))  # through YAML text
    assert type(rebuilt.model[index]) is type(layer) and rebuilt.model[index].extra_repr() == layer.extra_repr()
    rebuilt.load_state_dict(conversion.model.state_dict())  # the same tensor names and shapes
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x)[0], conversion.model(x)[0])


def test_settings_a_config_cannot_express_are_refused_not_written(model):
    # The builder gives every BatchNorm eps 1e-3 and momentum 0.03 (as the official one does): a BatchNorm
    # with torch's defaults has no config line.
    with pytest.raises(ConversionError) as info:
        convert(model, load_rules(rule("BatchNorm2d", {"num_features": 16}), name="x"))
    assert str(info.value) == (
        "the derived config cannot describe the converted model: layer 3 is BatchNorm2d(16, eps=1e-05, momentum=0.1, "
        "affine=True, bias=True, track_running_stats=True), but its config line (nn.BatchNorm2d, args []) builds "
        "BatchNorm2d(16, eps=0.001, momentum=0.03, affine=True, bias=True, track_running_stats=True)")


def test_scaled_channel_counts_are_written_unscaled_or_refused():
    from fxrewrite.yolov9.convert import _unscaled_channels

    assert [_unscaled_channels(c, w, 6) for c, w in ((32, 0.5), (48, 0.75), (16, 1.0), (24, 0.25))] == [64, 64, 16, 96]
    with pytest.raises(ConversionError, match=r"layer 6: 30 output channels cannot be written in a config with "
                                              r"width_multiple 0.5 \(the builder makes multiples of 8\)"):
        _unscaled_channels(30, 0.5, 6)


BILINEAR = rule("Upsample", CASES["Upsample"][0])


def test_the_cli_writes_a_config_that_builds_the_bilinear_upsampling(capsys, tmp_path):
    # The example: a user rule next to the shipped ones, on a yolov9 training model.
    rules = tmp_path / "bilinear.yaml"
    rules.write_text(BILINEAR)
    out = tmp_path / "up.pt"
    assert main(["convert", "--config", "yolov9-t", "--rules", "yolov9", str(rules), "-o", str(out), "--fp32"]) == 0
    written = yaml.safe_load((tmp_path / "up.yaml").read_text())
    assert [entry[3] for entry in written["head"] if entry[2] == "nn.Upsample"] == [[None, 2.0, "bilinear"]] * 2
    model = load_checkpoint(out, dtype=None).model
    rebuilt = DetectionModel(written)
    assert [m.extra_repr() for m in rebuilt.modules() if isinstance(m, torch.nn.Upsample)] == \
        [m.extra_repr() for m in model.modules() if isinstance(m, torch.nn.Upsample)] == \
        ["scale_factor=2.0, mode='bilinear'"] * 2
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x)[0], model.eval()(x)[0])
