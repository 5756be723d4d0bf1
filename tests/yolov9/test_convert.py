"""Acceptance tests of the YOLOv9 -> GELAN conversion (fxrewrite.yolov9.convert + rules/yolov9.yaml)."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import yaml

from fxrewrite.yolov9 import DetectionModel, SegmentationModel, convert
from fxrewrite.yolov9.cli import randomise_batchnorm
from fxrewrite.yolov9.config import load_config
from fxrewrite.yolov9.convert import ConversionError

VARIANTS = ["t", "s", "m", "c", "e"]


def training_model(name: str, nc: int | None = None):
    """A seeded training model with non-trivial BatchNorm statistics, in eval mode (cached per session)."""
    return _training_model(name, nc)


@functools.lru_cache(maxsize=None)
def _training_model(name: str, nc: int | None):
    torch.manual_seed(0)
    cfg = load_config(name)
    cls = SegmentationModel if "Segment" in str(cfg["head"][-1][2]) else DetectionModel
    model = cls(cfg, nc=nc)
    randomise_batchnorm(model, seed=1)
    return model.eval()


def conversion(name: str, nc: int | None = None):
    return _conversion(name, nc)


@functools.lru_cache(maxsize=None)
def _conversion(name: str, nc: int | None):
    return convert(training_model(name, nc))


def layers(cfg: dict) -> list:
    return [list(layer) for layer in cfg["backbone"] + cfg["head"]]


def notebook_layer_map(variant: str) -> dict[int, int]:
    """The official notebook's index offsets (new layer -> training layer), written out independently."""
    if variant in ("t", "s"):
        return {**{i: i for i in range(22)}, 22: 29}
    if variant in ("m", "c"):
        return {**{i: i + 1 for i in range(22)}, 22: 38}
    return {**{i: i for i in range(29)}, **{i: i + 7 for i in range(29, 42)}, 42: 49}


HEAD_RENAMES = {"cv2": "cv4", "cv3": "cv5", "dfl": "dfl2"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_derived_config_equals_official_gelan(variant):
    derived = conversion(f"yolov9-{variant}").config
    official = load_config(f"gelan-{variant}")
    assert layers(derived) == layers(official)
    assert len(derived["backbone"]) == len(official["backbone"])
    assert derived["nc"] == 80


@pytest.mark.parametrize("name", [f"yolov9-{v}" for v in VARIANTS] + ["yolov9-c-dseg"])
def test_derived_config_builds_exactly_the_converted_tensors(name):
    """The converted model is assembled from the training model's own layers; its config must
    still build a model with exactly its tensors (what train.py would rebuild from gelan.yaml)."""
    c = conversion(name)
    c.check_config()
    cls = SegmentationModel if "dseg" in name else DetectionModel
    with torch.device("meta"):
        rebuilt = cls(c.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in c.model.state_dict().items()}
    # Every layer carries the bookkeeping the official forward and parse_model give it.
    entries = layers(c.config)
    assert [(m.i, m.f) for m in c.model.model] == [(k, entry[0]) for k, entry in enumerate(entries)]
    assert [m.np for m in c.model.model] == [sum(p.numel() for p in m.parameters()) for m in rebuilt.model]
    assert c.model.save == rebuilt.save and torch.equal(c.model.stride, rebuilt.stride)
    # ... and every module's plain settings (BatchNorm eps/momentum, in-place activations, strides of
    # convolutions, head sizes) are those the config gives; only the head's anchor cache may differ.
    def settings(module):
        return {k: v for k, v in vars(module).items() if not k.startswith("_") and k not in ("training", "shape")
                and not isinstance(v, (torch.Tensor, torch.nn.Module))}

    built = dict(rebuilt.named_modules())
    assert [name for name, m in c.model.named_modules() if settings(m) != settings(built[name])] == []


def test_converted_layers_are_new_modules_over_the_training_tensors():
    """Changing the converted model's structure (fusing it in place) never touches the training model."""
    training = training_model("yolov9-t")
    c = convert(training)  # its own conversion: this test fuses it
    kept = {id(m) for m in training.modules()}
    assert not any(id(m) in kept for m in c.model.modules())
    assert c.model.model[0].conv.weight is training.model[0].conv.weight
    c.model.fuse()
    convs = [m for m in training.modules() if type(m).__name__ == "Conv"]
    assert convs and all(hasattr(m, "bn") and "forward" not in vars(m) for m in convs)
    fused = [m for m in c.model.modules() if type(m).__name__ == "Conv"]
    assert fused and all(not hasattr(m, "bn") and m.forward.__self__ is m for m in fused)


def test_check_config_names_the_first_tensor_the_config_does_not_make():
    c = copy.copy(conversion("yolov9-t"))
    c.config = copy.deepcopy(c.config)
    c.config["backbone"][2][3][0] = 48  # layer 2 (ELAN1) written with 48 output channels, the weights have 32
    with pytest.raises(ConversionError) as err:
        c.check_config()
    assert str(err.value) == ("the derived config does not describe the converted model: "
                              "model.2.cv4.conv.weight has shape (32, 64, 1, 1), the config makes it (48, 64, 1, 1)")


def test_a_rule_building_a_layer_its_config_line_does_not_describe_is_refused():
    """A replaced layer is checked against its derived config line: the rule builds the block
    with its widths in the right order, but the line keeps the original arguments, which the new
    class reads the other way round, so the config would build other tensors."""
    from fxrewrite import load_rules
    from fxrewrite.yolov9 import catalogue, register_block
    from fxrewrite.yolov9.blocks import ELAN1

    class Swapped(ELAN1):
        def __init__(self, c1, c2, c4, c3):
            super().__init__(c1, c2, c3, c4)

    Swapped.__name__ = Swapped.__qualname__ = "ELAN1Swapped"
    training = training_model("yolov9-t")
    elan = training.model[2]
    c1, c3, c4 = elan.cv1.conv.in_channels, elan.cv1.conv.out_channels, elan.cv3.conv.out_channels
    with catalogue.scoped():
        register_block(Swapped, role="scaled")
        swap = {"name": "swap-elan", "pattern": {"module_class": "ELAN1", "module_name": "model.2"},
                "action": "replace", "args": {"with": "ELAN1Swapped", "init": {
                    "c1": c1, "c2": elan.cv4.conv.out_channels, "c4": c4, "c3": c3}}}
        rules = load_rules(yaml.safe_dump({"rules": [swap]})) + load_rules("yolov9")
        with pytest.raises(ConversionError) as err:
            convert(training, rules)
    assert (c3, c4) == (32, 16)
    assert str(err.value) == ("the derived config does not describe the converted model: "
                              f"model.2.cv1.conv.weight has shape (32, {c1}, 1, 1), the config makes it (16, {c1}, 1, 1)")


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_map_equals_the_notebooks(variant):
    c = conversion(f"yolov9-{variant}")
    offsets = notebook_layer_map(variant)
    assert c.layer_map == offsets
    head = max(offsets)
    expected = {}
    for name, _ in c.model.state_dict(keep_vars=True).items():
        _, k, rest = name.split(".", 2)
        k = int(k)
        if k == head:
            first, _, tail = rest.partition(".")
            rest = f"{HEAD_RENAMES.get(first, first)}.{tail}" if tail else HEAD_RENAMES.get(first, first)
        expected[name] = f"model.{offsets[k]}.{rest}"
    assert c.param_map == expected
    # Tensors are shared with the training model, not copied.
    training = dict(training_model(f"yolov9-{variant}").named_parameters())
    for new, old in c.param_map.items():
        if old in training:
            assert c.model.get_parameter(new) is training[old]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [(640, 640), (384, 640)], ids=["640x640", "384x640"])
def test_converted_output_is_bitwise_the_main_output(variant, size):
    c = conversion(f"yolov9-{variant}")
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        main = training_model(f"yolov9-{variant}")(x)[0][1]
        converted = c.model(x)[0]
    assert converted.shape == (1, 84, (size[0] // 8) * (size[1] // 8) * 21 // 16)
    assert torch.equal(converted, main)


def test_parameter_counts_after_conversion_equal_official_gelan():
    expected = {"t": 2_442_640, "s": 7_226_208, "m": 20_124_000, "c": 25_498_752, "e": 58_114_432}
    assert {v: conversion(f"yolov9-{v}").params_after for v in VARIANTS} == expected


def test_pruned_and_collapsed_layers_of_yolov9_c_and_e():
    c = conversion("yolov9-c")
    assert c.pruned == list(range(23, 38)) and c.collapsed == [0]
    e = conversion("yolov9-e")
    assert e.pruned == list(range(29, 36)) and e.collapsed == []
    rejected = [r for log in e.result.log for r in log.rejected]
    assert [(r.node, r.reason) for r in rejected] == [
        ("model_0", "max_users: model_0 is used by 2 nodes (model_1, model_15), more than 1")]


def test_rule_log_lists_every_training_tensor_the_conversion_drops():
    """Every tensor of the training model is either in the converted model (param map) or listed,
    once, by the rule that dropped it: the head replacement (auxiliary head branch) or the prune."""
    c = conversion("yolov9-c")
    training = {name for name, _ in training_model("yolov9-c").state_dict(keep_vars=True).items()}
    dropped = {entry.rule: entry.dropped for entry in c.result.log if entry.dropped}
    assert sorted(dropped) == ["dual-ddetect-to-ddetect", "prune-auxiliary-branch"]
    assert all(name.startswith("model.38.") for name in dropped["dual-ddetect-to-ddetect"])
    with_tensors = {i for i in c.pruned if len(training_model("yolov9-c").model[i].state_dict())}
    assert {int(name.split(".")[1]) for name in dropped["prune-auxiliary-branch"]} == with_tensors
    assert with_tensors == set(range(23, 38)) - {30, 33, 36}  # CBFuse layers hold no tensor
    listed = [name for names in dropped.values() for name in names]
    assert len(listed) == len(set(listed))
    assert set(listed) == training - set(c.param_map.values())
    assert str(c.result.log[4]) == (f"prune-auxiliary-branch (prune_unreachable): 0 matched, 1 rewritten, "
                                    f"{len(dropped['prune-auxiliary-branch'])} tensors dropped")


def test_custom_class_count():
    c = conversion("yolov9-c", 7)
    assert c.config["nc"] == 7 and c.model.yaml["nc"] == 7 and c.model.model[-1].nc == 7
    assert layers(c.config)[-1] == [[15, 18, 21], 1, "DDetect", ["nc"]]
    x = torch.rand(1, 3, 256, 320, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(c.model(x)[0], training_model("yolov9-c", 7)(x)[0][1])


# A custom PGI configuration with no hand-written GELAN counterpart: no CBLinear (so it
# builds at any width), an auxiliary neck reading the backbone, width 0.75, 5 classes.
CUSTOM = {
    "nc": 5, "depth_multiple": 0.5, "width_multiple": 0.75,
    "backbone": [
        [-1, 1, "Silence", []],
        [-1, 1, "Conv", [32, 3, 2]],
        [-1, 1, "Conv", [64, 3, 2]],
        [-1, 1, "RepNCSPELAN4", [128, 64, 32, 1]],
        [-1, 1, "ADown", [128]],
        [-1, 1, "RepNCSPELAN4", [128, 128, 64, 1]],  # 5 P3
        [-1, 1, "ADown", [256]],
        [-1, 1, "RepNCSPELAN4", [256, 256, 128, 1]],  # 7 P4
        [-1, 1, "ADown", [256]],
        [-1, 1, "RepNCSPELAN4", [256, 256, 128, 1]],  # 9 P5
    ],
    "head": [
        [-1, 1, "SPPELAN", [256, 128]],  # 10
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 7], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [256, 256, 128, 1]],  # 13
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 5], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [128, 128, 64, 1]],  # 16 P3 main
        [-1, 1, "ADown", [128]],
        [[-1, 13], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [256, 256, 128, 1]],  # 19 P4 main
        [-1, 1, "ADown", [256]],
        [[-1, 10], 1, "Concat", [1]],
        [-1, 1, "RepNCSPELAN4", [256, 256, 128, 1]],  # 22 P5 main
        [5, 1, "RepNCSPELAN4", [128, 128, 64, 1]],  # 23 aux P3
        [7, 1, "RepNCSPELAN4", [256, 256, 128, 1]],  # 24 aux P4
        [9, 1, "RepNCSPELAN4", [256, 256, 128, 1]],  # 25 aux P5
        [[23, 24, 25, 16, 19, 22], 1, "DualDDetect", ["nc"]],
    ],
}


def test_custom_config_without_gelan_counterpart():
    torch.manual_seed(5)
    training = DetectionModel(copy.deepcopy(CUSTOM))
    randomise_batchnorm(training, seed=6)
    training.eval()
    c = convert(training)
    assert c.layer_map == {**{i: i + 1 for i in range(22)}, 22: 26}
    assert layers(c.config)[-1] == [[15, 18, 21], 1, "DDetect", ["nc"]]
    assert layers(c.config)[:1] == [[-1, 1, "Conv", [32, 3, 2]]]
    rebuilt = DetectionModel(c.config)  # the derived config is a valid config that holds the weights
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in c.model.state_dict().items()}
    x = torch.rand(2, 3, 224, 288, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(c.model(x)[0], training(x)[0][1])


def test_segmentation_model_keeps_every_trained_weight():
    c = conversion("yolov9-c-dseg")
    official_gelan = layers(load_config("gelan-c-dseg"))
    derived = layers(c.config)
    assert len(derived) == len(official_gelan)
    differing = [i for i, (a, b) in enumerate(zip(derived, official_gelan)) if a != b]
    # The official gelan-c-dseg.yaml gives its proto branch's RepNCSPELAN4 one inner repeat where
    # yolov9-c-dseg trains two; the derived config keeps two, so it holds every trained weight.
    assert differing == [22]
    assert derived[22] == [15, 1, "RepNCSPELAN4", [256, 256, 128, 2]]
    assert official_gelan[22] == [15, 1, "RepNCSPELAN4", [256, 256, 128, 1]]
    training = training_model("yolov9-c-dseg")
    x = torch.rand(1, 3, 320, 256, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected, got = training(x), c.model(x)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1][2], expected[1][2])  # the prototype masks
    head = c.model.model[-1]
    assert type(head).__name__ == "DSegment"
    assert c.param_map["model.%d.proto.conv.weight" % (len(derived) - 1)].endswith(".proto2.conv.weight")
    assert c.param_map["model.%d.cv4.0.0.conv.weight" % (len(derived) - 1)].endswith(".cv7.0.0.conv.weight")


def test_converting_an_inference_model_is_refused_as_nothing_to_do():
    with pytest.raises(ConversionError, match="nothing to convert: the model \\(DDetect head\\) has no auxiliary"):
        convert(conversion("yolov9-t").model)


def test_conversion_leaves_the_training_model_untouched():
    torch.manual_seed(9)
    training = DetectionModel("yolov9-t")
    training.train()
    before = {k: v.clone() for k, v in training.state_dict().items()}
    c = convert(training)
    assert training.training and all(m.training for m in training.modules())
    assert all(torch.equal(before[k], v) for k, v in training.state_dict().items())
    assert len(training.model) == 30 and type(training.model[-1]).__name__ == "DualDDetect"
    assert not c.model.training


def test_official_model_in_memory_converts_through_the_python_api():
    """A model built by the official code (classes models.common.* / models.yolo.*) converts by class name."""
    from helpers.official import official

    off = official()
    torch.manual_seed(10)
    training = off.build("yolov9-t.yaml")
    randomise_batchnorm(training, seed=11)
    training.eval()
    assert type(training).__module__ == "models.yolo" and type(training.model[-1]).__name__ == "DualDDetect"
    c = convert(training)
    assert c.layer_map == notebook_layer_map("t")
    assert layers(c.config) == layers(load_config("gelan-t"))
    x = torch.rand(1, 3, 256, 320, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        assert torch.equal(c.model(x)[0], training(x)[0][1])
    official_params = dict(training.named_parameters())
    assert all(c.model.get_parameter(new) is official_params[old] for new, old in c.param_map.items()
               if old in official_params)


def test_safetensors_output(tmp_path):
    from fxrewrite.cli import main

    code = main(["convert", "--config", "yolov9-t", "-o", str(tmp_path / "g.pt"), "--safetensors"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.params.json", "g.pt", "g.safetensors", "g.yaml"]
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "g.safetensors"))
    assert set(tensors) == set(conversion("yolov9-t").model.state_dict())


@pytest.mark.parametrize("name", [f"yolov9-{v}" for v in VARIANTS] + ["yolov9-c-dseg"])
def test_layer_level_trace_with_sealed_layers_is_the_full_trace(name):
    """The conversion traces fxrewrite's own models with the layers sealed (fx does not walk inside
    them): same graph, provenance, module stacks and shapes as the full trace, over the same modules."""
    import fxrewrite
    from fxrewrite.yolov9.inputs import example_input, fixed_flags
    from fxrewrite.yolov9.model import runs_layer_loop

    model = training_model(name)
    assert runs_layer_loop(model)
    x = example_input(model, 64, dtype=torch.float32, device=torch.device("cpu"))
    traced = {sealed: fxrewrite.trace(model, x, max_depth=2, concrete_args=fixed_flags(model), shapes_only=True,
                                      sealed_leaves=sealed) for sealed in (False, True)}
    full, sealed = traced[False], traced[True]
    assert str(full.graph) == str(sealed.graph)
    for a, b in zip(full.graph.nodes, sealed.graph.nodes):
        assert a.meta.keys() == b.meta.keys() and a.meta["provenance"] == b.meta["provenance"]
        assert a.meta.get("nn_module_stack") == b.meta.get("nn_module_stack")
        assert str(a.meta.get("tensor_meta")) == str(b.meta.get("tensor_meta"))
        if a.op == "call_module":
            assert sealed.get_submodule(a.target) is model.get_submodule(a.target)


def test_only_fxrewrites_own_layer_loop_is_traced_with_sealed_layers():
    from fxrewrite.yolov9.model import BaseModel, runs_layer_loop

    class OwnLoop(DetectionModel):
        def _forward_once(self, x, profile=False, visualize=False):
            return BaseModel._forward_once(self, x, profile, visualize)

    model = training_model("yolov9-t")
    replaced = copy.copy(model)
    replaced.forward = lambda x: model(x)
    subclassed = copy.copy(model)
    subclassed.__class__ = OwnLoop
    assert (runs_layer_loop(model), runs_layer_loop(replaced), runs_layer_loop(subclassed)) == (True, False, False)


@pytest.mark.requires_official
def test_official_code_models_are_traced_in_full():
    from helpers.official import official

    from fxrewrite.yolov9.model import runs_layer_loop

    torch.manual_seed(10)
    assert not runs_layer_loop(official().build("yolov9-t.yaml"))


def test_the_config_check_compares_the_rules_call_instead_of_building_the_head_again(monkeypatch):
    from fxrewrite.context import Construction
    from fxrewrite.yolov9 import planner
    from fxrewrite.yolov9.heads import DDetect

    training, built = training_model("yolov9-c"), []
    real = planner.LayerPlan.instantiate
    monkeypatch.setattr(planner.LayerPlan, "instantiate", lambda plan: built.append(plan.name) or real(plan))
    c = convert(training)
    assert built == []
    head = c.result.module.get_submodule("model.38")
    call = Construction(DDetect, {"nc": 80, "ch": [256, 512, 512], "inplace": True}, head)
    assert c.result.constructions == {"model_38": call}


def test_only_the_very_same_constructor_call_counts_as_the_config_lines():
    from fxrewrite.context import Construction
    from fxrewrite.yolov9.convert import _makes_the_same_call
    from fxrewrite.yolov9.heads import DDetect, DualDDetect
    from fxrewrite.yolov9.planner import LayerPlan

    plan = LayerPlan(22, [15, 18, 21], 1, "DDetect", DDetect, "head", [80, [256, 512, 512]], None)
    call = lambda cls=DDetect, **kwargs: Construction(cls, kwargs, None)  # noqa: E731
    assert _makes_the_same_call(plan, call(nc=80, ch=[256, 512, 512]))
    assert _makes_the_same_call(plan, call(nc=80, ch=[256, 512, 512], inplace=True))  # the default, given
    assert not _makes_the_same_call(plan, call(nc=80, ch=[256, 512, 512], inplace=False))
    assert not _makes_the_same_call(plan, call(nc=81, ch=[256, 512, 512]))
    assert not _makes_the_same_call(plan, call(nc=80, ch=(256, 512, 512)))  # equal only as a tuple: built again
    assert not _makes_the_same_call(plan, call(DualDDetect, nc=80, ch=[256, 512, 512]))
    assert not _makes_the_same_call(plan, call(nc=80, ch=[256, 512, 512], anchors=3))  # does not bind
    assert not _makes_the_same_call(plan, call(nc=torch.tensor([80, 80]), ch=[256, 512, 512]))  # no truth value
    assert not _makes_the_same_call(plan, None)
    repeated = LayerPlan(3, -1, 2, "DDetect", DDetect, "head", [80, [256, 512, 512]], None)
    assert not _makes_the_same_call(repeated, call(nc=80, ch=[256, 512, 512]))
