"""The cookbook (``rules/examples/``): every example file does exactly what its comments say.

Each test applies one shipped example and asserts the exact resulting structure (the
nodes kept, the parameter map) and, where the rewrite preserves the function,
bitwise-equal outputs. The YOLOv9 examples run on a converted yolov9-t (the GELAN-T
inference model the flagship conversion gives), with random BatchNorm statistics so
that every BatchNorm setting matters.
"""
from __future__ import annotations

import copy
import doctest
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import RewriteError, load_rules
from fxrewrite.examples import aux_branch_model
from fxrewrite.rule_file import shipped_rules_dir
from fxrewrite.tensors import named_tensors
from fxrewrite.yolov9 import DetectionModel, convert
from fxrewrite.yolov9.cli import randomise_batchnorm
from fxrewrite.yolov9.convert import trace_and_rewrite
from fxrewrite.yolov9.deploy import fuse

EXAMPLES = Path(__file__).resolve().parents[1] / "rules" / "examples"
X = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
LAYER_INPUTS = ["x", "augment_1", "profile_1", "visualize_1"]  # a layered YOLO model's placeholders


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(named_tensors(module))


def run(model: nn.Module, *args):
    with torch.no_grad():
        return model(*args)


@pytest.fixture(scope="module")
def conversion():
    """yolov9-t (training, auxiliary branch) converted by the shipped rules: the GELAN-T model."""
    torch.manual_seed(0)
    training = DetectionModel("yolov9-t")
    randomise_batchnorm(training, 1)
    return convert(training.eval())


@pytest.fixture(scope="module")
def gelan(conversion):
    return conversion.model


@pytest.fixture(scope="module")
def gelan_out(gelan):
    return run(gelan, X)


def anchors_per_level(levels) -> list[int]:
    return [m.shape[2] * m.shape[3] for m in levels]


# -- drop a detection scale -----------------------------------------------------------------
def test_drop_p5_of_a_converted_yolov9(conversion, gelan, gelan_out):
    dropped = convert(gelan, load_rules("examples/drop-p5"))

    # Structure: the P5 path of the neck (19 AConv, 20 Concat, 21 RepNCSPELAN4) is pruned,
    # the head (old layer 22) becomes layer 19 and reads layers 15 (P3) and 18 (P4).
    assert dropped.pruned == [19, 20, 21]
    assert dropped.layer_map == {**{i: i for i in range(19)}, 19: 22}
    assert [n.name for n in dropped.result.module.graph.nodes] == \
        LAYER_INPUTS + [f"model_{i}" for i in range(19)] + ["model_22", "output"]
    assert dropped.config["head"][-1] == [[15, 18], 1, "DDetect", ["nc"]]
    head = dropped.model.model[-1]
    assert (type(head).__name__, head.nl, head.stride.tolist()) == ("DDetect", 2, [8.0, 16.0])
    assert dropped.model.stride.tolist() == [8.0, 16.0]
    assert dropped.result.module.get_submodule("model.22").stride.tolist() == [8.0, 16.0]
    # The rebuilt head's BatchNorms are configured as the ones whose tensors they took (the model
    # builder set eps 1e-3, the constructor 1e-5): the rewritten GraphModule computes the same.
    assert dropped.result.module.get_submodule("model.22.cv3.1.0.bn").eps == gelan.model[22].cv3[1][0].bn.eps == 1e-3

    # The parameter map is exact: every tensor of the new model is the GELAN tensor of the
    # same name in its old layer; all GELAN tensors are used but the pruned layers' and the
    # P5 towers' (cv2.2, cv3.2), which the replace lists as dropped.
    source = tensors(gelan)
    expected = {}
    for name in tensors(dropped.model):
        _, layer, rest = name.split(".", 2)
        expected[name] = f"model.{dropped.layer_map[int(layer)]}.{rest}"
    assert dropped.param_map == expected
    unused = {n for n in source if re.match(r"model\.(19|20|21|22\.cv[23]\.2)\.", n)}
    assert set(dropped.param_map.values()) == set(source) - unused
    assert set(dropped.result.log[0].dropped) == {n for n in unused if n.startswith("model.22.")}
    assert all(dropped.model.get_parameter(n) is gelan.get_parameter(o)
               for n, o in dropped.param_map.items() if n.endswith("weight"))
    # ... and leads back to the training model's tensors through the conversion's map.
    assert conversion.param_map[dropped.param_map["model.19.cv2.1.0.conv.weight"]] == "model.29.cv4.1.0.conv.weight"

    # Function: the kept levels' maps are the original ones, bit for bit, and so are the
    # decoded predictions of their anchors (P3's, then P4's).
    a3, a4, _ = anchors_per_level(gelan_out[1])
    for model in (dropped.model, dropped.result.module):
        y, levels = run(model, X)
        assert len(levels) == 2 and all(torch.equal(levels[i], gelan_out[1][i]) for i in range(2))
        assert torch.equal(y, gelan_out[0][:, :, :a3 + a4])


def test_drop_p5_in_the_same_pass_as_the_conversion(conversion, gelan):
    """The example chains after the shipped rules: one conversion from the training model."""
    both = convert(conversion.source, load_rules("yolov9") + load_rules("examples/drop-p5"))
    two_steps = convert(gelan, load_rules("examples/drop-p5"))
    assert both.config == two_steps.config
    assert both.layer_map == {**{i: i for i in range(19)}, 19: 29}
    assert both.pruned == list(range(19, 29))
    assert both.param_map == {new: conversion.param_map[old] for new, old in two_steps.param_map.items()}
    assert [str(entry) for entry in both.result.log[-3:]] == [
        "head-on-p3-p4 (replace): 1 matched, 1 rewritten, 28 tensors dropped",
        "head-strides (measure_strides): 1 matched, 1 rewritten",
        "prune-p5-path (prune_unreachable): 0 matched, 1 rewritten, 174 tensors dropped",
    ]


def test_drop_p5_from_the_command_line(capsys, conversion):
    from fxrewrite.cli import main

    code = main(["convert", "--config", "yolov9-t", "--rules", "yolov9", "examples/drop-p5", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[1:4] == ["head: DualDDetect -> DDetect", "layers: 30 -> 20 kept; pruned 19..28; collapsed none",
                          "layer map (new <- old): 0..18 <- 0..18, 19 <- 29"]
    assert lines[-1] == "dry run: nothing written"


def test_drop_p3_renumbers_the_level_towers(gelan, gelan_out):
    dropped = convert(gelan, load_rules("examples/drop-p3"))

    # Nothing in the neck is pruned (the P4 output is computed from the P3 output).
    assert dropped.pruned == [] and dropped.layer_map == {i: i for i in range(23)}
    assert dropped.config["head"][-1] == [[18, 21], 1, "DDetect", ["nc"]]
    assert dropped.model.model[-1].stride.tolist() == [16.0, 32.0]

    # Level k of the new head is level k + 1 of the old one; the DFL keeps its name.
    def old_name(name: str) -> str:
        m = re.fullmatch(r"model\.22\.(cv[23])\.(\d)\.(.*)", name)
        return f"model.22.{m[1]}.{int(m[2]) + 1}.{m[3]}" if m else name

    assert dropped.param_map == {name: old_name(name) for name in tensors(dropped.model)}
    assert dropped.param_map["model.22.cv2.0.0.conv.weight"] == "model.22.cv2.1.0.conv.weight"
    assert dropped.param_map["model.22.cv3.1.2.bias"] == "model.22.cv3.2.2.bias"
    assert dropped.param_map["model.22.dfl.conv.weight"] == "model.22.dfl.conv.weight"
    assert set(dropped.result.log[0].dropped) == {n for n in tensors(gelan) if re.match(r"model\.22\.cv[23]\.0\.", n)}

    a3 = anchors_per_level(gelan_out[1])[0]
    for model in (dropped.model, dropped.result.module):
        y, levels = run(model, X)
        assert all(torch.equal(levels[i], gelan_out[1][i + 1]) for i in range(2))
        assert torch.equal(y, gelan_out[0][:, :, a3:])


def test_drop_p3_is_refused_where_the_tower_widths_differ():
    """DDetect sizes its towers from its first input: with 3 classes, P4's class towers are wider."""
    torch.manual_seed(0)
    model = DetectionModel("gelan-t", nc=3).eval()
    with pytest.raises(RewriteError, match=re.escape(
            "rule 'head-on-p4-p5': shape mismatch re-binding DDetect.cv3.0.0.conv.weight (96, 96, 3, 3) "
            "<- DDetect.cv3.1.0.conv.weight (64, 96, 3, 3)")):
        convert(model, load_rules("examples/drop-p3"))


# -- replace every SiLU -------------------------------------------------------------------------
def test_silu_to_relu_on_a_plain_trace():
    model = aux_branch_model()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), load_rules("examples/silu-to-relu"))

    acts = ["stem_act", "main_0_act", "main_2_act", "aux_0_act", "aux_1_act"]
    assert result.nodes_with_status("replaced") == acts
    assert [n.name for n in result.module.graph.nodes] == [n.name for n in result.original.graph.nodes]
    assert {type(result.module.get_submodule(n.target)) for n in result.module.graph.nodes
            if n.name in acts} == {nn.ReLU}
    assert result.param_map == {name: name for name in tensors(model)}  # activations have no tensors

    reference = copy.deepcopy(model)
    for name in ("stem", "main.0", "main.2", "aux.0", "aux.1"):
        reference.get_submodule(name).act = nn.ReLU()
    assert all(torch.equal(a, b) for a, b in zip(run(result.module, x), run(reference, x)))


def test_silu_to_relu_on_a_whole_yolo_model(conversion, gelan):
    """With fuse's structural trace SiLU is a node everywhere, in the detection head too."""
    swapped = fuse(gelan, load_rules("examples/silu-to-relu"))
    silus = [name for name, m in gelan.named_modules() if isinstance(m, nn.SiLU)]
    assert len(silus) == 179 and swapped.unreached == []
    assert sorted(swapped.fused) == sorted(silus)  # (in graph order)
    assert {type(m) for name, m in swapped.model.named_modules() if name in silus} == {nn.ReLU}
    assert not any(isinstance(m, nn.SiLU) for m in swapped.model.modules())
    assert swapped.param_map == {name: name for name in tensors(gelan)}
    assert all(swapped.model.get_parameter(n) is gelan.get_parameter(n) for n, _ in gelan.named_parameters())

    # The same model built with ReLU activations from its config computes the same, bit for bit.
    config = copy.deepcopy(conversion.config)
    config["activation"] = "nn.ReLU()"
    reference = DetectionModel(config)
    reference.load_state_dict(gelan.state_dict())
    expected, actual = run(reference.eval(), X), run(swapped.model, X)
    assert torch.equal(actual[0], expected[0])
    assert all(torch.equal(a, b) for a, b in zip(actual[1], expected[1]))


# -- cut a model at named layers ---------------------------------------------------------------
def test_backbone_features(gelan):
    result = trace_and_rewrite(gelan, load_rules("examples/backbone-features"))
    assert [n.name for n in result.module.graph.nodes] == LAYER_INPUTS + [f"model_{i}" for i in range(9)] + ["output"]
    assert result.nodes_with_status("pruned") == [f"model_{i}" for i in range(9, 23)]
    backbone = {n: t for n, t in tensors(gelan).items() if int(n.split(".")[1]) <= 8}
    assert result.param_map == {name: name for name in backbone}

    # A fresh module (new module objects, the same tensors, an exact map) that returns the
    # outputs of layers 4, 6 and 8, as hooks on the original model see them.
    rebound = fxrewrite.rebind(result)
    assert rebound.param_map == result.param_map
    seen = {}
    hooks = [gelan.model[i].register_forward_hook(lambda m, i, o, k=i: seen.__setitem__(k, o)) for i in (4, 6, 8)]
    try:
        run(gelan, X)
    finally:
        for hook in hooks:
            hook.remove()
    features = run(rebound.module, X)
    assert [tuple(f.shape) for f in features] == [(1, 64, 8, 12), (1, 96, 4, 6), (1, 128, 2, 3)]
    assert all(torch.equal(f, seen[k]) for f, k in zip(features, (4, 6, 8)))

    # One cut point: its output is the model's single output.
    one = trace_and_rewrite(gelan, load_rules(EXAMPLES.joinpath("backbone-features.yaml").read_text()
                                              .replace('"model.[468]"', "model.8")))
    assert [n.name for n in one.module.graph.nodes][-2:] == ["model_8", "output"]
    assert torch.equal(run(one.module, X), seen[8])


# -- remove no-ops ------------------------------------------------------------------------------
class NoisyNet(nn.Module):
    """A small classifier with dropouts of four classes and a chain of identities."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout2d(0.2), nn.ReLU(), nn.Identity(), nn.Identity(),
                                  nn.Conv2d(8, 8, 3), nn.AlphaDropout(0.1))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 4 * 4, 5), nn.FeatureAlphaDropout(0.1))

    def forward(self, x):
        return self.head(self.body(x))


def test_drop_noops_in_eval_mode():
    torch.manual_seed(0)
    model = NoisyNet().eval()
    x = torch.randn(2, 3, 8, 8)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), load_rules("examples/drop-noops"))
    assert [n.name for n in result.module.graph.nodes] == ["x", "body_0", "body_2", "body_5", "head_0", "head_2",
                                                          "output"]
    assert result.nodes_with_status("collapsed") == ["body_1", "body_3", "body_4", "body_6", "head_1", "head_3"]
    assert result.param_map == {name: name for name in tensors(model)}
    assert torch.equal(run(result.module, x), run(model, x))


def test_drop_noops_keeps_dropouts_in_training_mode_and_says_why():
    model = NoisyNet().train()
    result = fxrewrite.rewrite(fxrewrite.trace(model, torch.randn(2, 3, 8, 8)), load_rules("examples/drop-noops"))
    assert result.nodes_with_status("collapsed") == ["body_3", "body_4"]  # the identities only
    assert [(r.node, r.reason) for r in result.log[0].rejected] == [
        (node, f"attr_equals: {node}.training is True, not False")
        for node in ("body_1", "body_6", "head_1", "head_3")]
    assert "  rejected body_1: attr_equals: body_1.training is True, not False" in result.summary().splitlines()


# -- a Python action registered by name --------------------------------------------------------
class Swishy(nn.Module):
    """SiLU written out as operations (``as_module=False``) or as nn.SiLU modules (the reference)."""

    def __init__(self, as_module: bool = False):
        super().__init__()
        self.as_module = as_module
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)
        self.silu_a, self.silu_b = nn.SiLU(), nn.SiLU()

    def forward(self, x):
        y = self.conv1(x)
        y = self.silu_a(y) if self.as_module else y * torch.sigmoid(y)
        z = self.conv2(y)
        gate = torch.sigmoid(z)  # read twice: not a swish of z alone
        z = z * gate + gate
        return self.silu_b(z) if self.as_module else z * torch.sigmoid(z)


def test_python_action_swish_to_silu():
    from fxrewrite.rulesets.examples import swish_to_silu  # registers the action "swish_to_silu"

    assert fxrewrite.registry.action("swish_to_silu").fn is swish_to_silu.swish_to_silu
    torch.manual_seed(0)
    model = Swishy().eval()
    x = torch.randn(2, 3, 10, 10)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), load_rules("examples/swish-to-silu"))
    assert str(result.log[0]) == "swish-to-silu (swish_to_silu): 2 matched, 2 rewritten"
    assert [n.name for n in result.module.graph.nodes] == \
        ["x", "conv1", "silu_0", "conv2", "sigmoid_1", "mul_1", "add", "silu_1", "output"]
    assert result.nodes_with_status("new") == ["silu_0", "silu_1"]
    assert result.nodes_with_status("removed") == ["sigmoid", "mul", "sigmoid_2", "mul_2"]
    assert result.param_map == {name: name for name in tensors(model) if name.startswith("conv")}

    reference = Swishy(as_module=True).eval()
    reference.load_state_dict(model.state_dict())
    assert torch.equal(run(result.module, x), run(reference, x))
    assert doctest.testmod(swish_to_silu).failed == 0

    # After another rule changed the graph too (the new module is known to the rewrite only).
    wrapped = nn.Sequential(nn.Identity(), model).eval()
    both = fxrewrite.rewrite(fxrewrite.trace(wrapped, x),
                             load_rules("examples/drop-noops") + load_rules("examples/swish-to-silu"))
    assert both.nodes_with_status("new") == ["silu_0", "silu_1"] and both.nodes_with_status("collapsed") == ["_0"]
    assert torch.equal(run(both.module, x), run(reference, x))


# -- a rule rejected by its check ----------------------------------------------------------------
def test_rejected_by_check_shows_the_reason_in_the_log(gelan):
    result = trace_and_rewrite(gelan, load_rules("examples/rejected-by-check"))
    (entry,) = result.log
    assert str(entry) == "drop-noop-upsample (collapse): 2 matched, 0 rewritten, 2 rejected"
    assert [(r.node, r.reason) for r in entry.rejected] == [
        ("model_10", "passthrough: model_10 changes the shape (1, 128, 1, 1) -> (1, 128, 2, 2)"),
        ("model_13", "passthrough: model_13 changes the shape (1, 96, 2, 2) -> (1, 96, 4, 4)")]
    assert result.summary().splitlines()[:3] == [
        "drop-noop-upsample (collapse): 2 matched, 0 rewritten, 2 rejected",
        "  rejected model_10: passthrough: model_10 changes the shape (1, 128, 1, 1) -> (1, 128, 2, 2)",
        "  rejected model_13: passthrough: model_13 changes the shape (1, 96, 2, 2) -> (1, 96, 4, 4)"]
    assert set(result.node_status.values()) == {"kept"}


def test_rejected_by_check_still_collapses_a_resize_that_does_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=1), nn.Upsample(scale_factor=2)).eval()
    x = torch.randn(1, 3, 8, 8)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), load_rules("examples/rejected-by-check"))
    assert [n.name for n in result.module.graph.nodes] == ["input_1", "_0", "_2", "output"]
    assert [(r.node, r.reason) for r in result.log[0].rejected] == [
        ("_2", "passthrough: _2 changes the shape (1, 4, 6, 6) -> (1, 4, 12, 12)")]
    assert torch.equal(run(result.module, x), run(model, x))


# -- the cookbook as a whole ---------------------------------------------------------------------
TESTED = {"drop-p5", "drop-p3", "silu-to-relu", "backbone-features", "drop-noops", "swish-to-silu",
          "rejected-by-check",
          "fork-renamed-head"}  # converts a fork's checkpoint: tests/yolov9/test_forks.py (renamed-head)


def test_every_example_is_tested_loads_and_is_installed(capsys):
    import fxrewrite.rulesets.examples.swish_to_silu  # noqa: F401  (its rule file names its action)
    from fxrewrite.cli import main

    assert {p.stem for p in EXAMPLES.glob("*.yaml")} == TESTED
    installed = shipped_rules_dir() / "examples"
    for name in sorted(TESTED):
        assert (installed / f"{name}.yaml").read_text() == (EXAMPLES / f"{name}.yaml").read_text()
        with fxrewrite.registry.scoped():  # a fork's class name: bound to the fork's class when converting
            fxrewrite.registry.register_module_class(type("SingleHead", (nn.Module,), {}))
            rules = load_rules(f"examples/{name}")
        assert len(rules) >= 1 and all(rule.name for rule in rules)
    assert main(["rules"]) == 0
    assert capsys.readouterr().out.splitlines()[3] == \
        "cookbook examples: " + ", ".join(f"examples/{name}" for name in sorted(TESTED))
