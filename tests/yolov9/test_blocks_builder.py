"""Tests for the YOLOv9 blocks, the config builder (DetectionModel) and the shipped configs.

Three groups:

* builder facts: parameter and layer counts of every shipped config, strides,
  meta-device builds, ``nc`` override, config forms, eval output shapes,
  weight-init defaults, activation override, plug-in registration, fx tracing;
* ``ConfigError`` messages for broken configs (exact text);
* oracle checks against the real official classes (``tests/helpers/official.py``):
  equal ``state_dict`` layout and bitwise-equal eval/train outputs for every
  shipped config, and per-block bitwise equality.
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
import torch.fx
from torch import nn

from fxrewrite import registry
from fxrewrite.registry import RegistrationError
from fxrewrite.yolov9 import blocks, catalogue
from fxrewrite.yolov9.config import CONFIG_DIR, load_config, shipped_configs
from fxrewrite.yolov9.model import (
    ConfigError,
    DetectionModel,
    SegmentationModel,
    parse_model,
    register_block,
    registered_blocks,
)

from helpers.official import official, requires_official


STRIDES = [8, 16, 32]

# Parameter counts of the official models with nc=80 (the -dseg values were
# measured on the official build; the oracle test below re-checks them).
EXPECTED_PARAMETERS = {
    "yolov9-t": 3_717_680,
    "gelan-t": 2_442_640,
    "yolov9-s": 9_804_512,
    "gelan-s": 7_226_208,
    "yolov9-m": 32_878_432,
    "gelan-m": 20_124_000,
    "yolov9-c": 51_182_080,
    "gelan-c": 25_498_752,
    "yolov9-e": 69_529_664,
    "gelan-e": 58_114_432,
    "yolov9-c-dseg": 57_991_744,
    "gelan-c-dseg": 27_668_256,
}
EXPECTED_LAYERS = {
    "yolov9-t": 30,
    "gelan-t": 23,
    "yolov9-s": 30,
    "gelan-s": 23,
    "yolov9-m": 39,
    "gelan-m": 23,
    "yolov9-c": 39,
    "gelan-c": 23,
    "yolov9-e": 50,
    "gelan-e": 43,
    "yolov9-c-dseg": 45,
    "gelan-c-dseg": 26,
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small convolutions gain nothing from threads; on a busy 2-core box spinning workers cost a lot."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def model_class(name: str):
    return SegmentationModel if "seg" in name else DetectionModel


def meta_model(name: str, **kwargs):
    with torch.device("meta"):
        return model_class(name)(name, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flatten(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in flatten(item)]


def structure(output):
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    return type(output).__name__, [structure(item) for item in output]


def tiny_config(backbone, head=(), **top):
    """A hand-written config for error tests."""
    config = {"nc": 80, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": 3,
              "backbone": [list(layer) for layer in backbone], "head": [list(layer) for layer in head]}
    config.update(top)
    return config


def config_error(cfg, **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        with torch.device("meta"):
            DetectionModel(cfg, strides=STRIDES, **kwargs)
    return str(caught.value)


# --------------------------------------------------------------------------
# Shipped configs and builder facts
# --------------------------------------------------------------------------
def test_shipped_config_names():
    assert shipped_configs() == sorted(EXPECTED_PARAMETERS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_parameter_and_layer_counts(name):
    model = meta_model(name, strides=STRIDES)
    assert count_parameters(model) == EXPECTED_PARAMETERS[name]
    assert len(model.model) == EXPECTED_LAYERS[name]
    assert [layer.i for layer in model.model] == list(range(EXPECTED_LAYERS[name]))
    assert sum(layer.np for layer in model.model) == EXPECTED_PARAMETERS[name]
    assert model.yaml_file == f"{name}.yaml"


def test_channel_rounding_and_cblinear_lists():
    model = meta_model("yolov9-m", strides=STRIDES)
    # AConv [180] is rounded up to a multiple of 8; CBLinear lists are used as written.
    assert model.model[17].cv1.conv.out_channels == 184
    assert model.model[25].c2s == [240, 360, 480]
    assert model.model[25].conv.out_channels == 240 + 360 + 480


def test_width_multiple_scales_first_argument_only():
    config = load_config("gelan-t")
    config["width_multiple"] = 0.5
    model = meta_model(config, strides=STRIDES)
    elan = model.model[4]  # RepNCSPELAN4 [64, 64, 32, 3]
    assert elan.cv4.conv.out_channels == 32  # c2 scaled: 64 * 0.5
    assert elan.cv1.conv.out_channels == 64  # c3 as written (reference behaviour)
    assert model.model[0].conv.out_channels == 8


def test_depth_multiple_scales_repeats_above_one():
    config = tiny_config([[-1, 3, "Conv", [16, 3, 2]], [-1, 1, "Conv", [16, 3, 1]]], depth_multiple=0.34)
    model = meta_model(config)
    assert isinstance(model.model[0], blocks.Conv)  # round(3 * 0.34) = 1: a single module, no Sequential
    config["depth_multiple"] = 2.0
    stacked = meta_model(config).model
    assert isinstance(stacked[0], nn.Sequential) and len(stacked[0]) == 6
    assert isinstance(stacked[1], blocks.Conv)  # a repeat count of 1 is never scaled


def test_save_list_and_layer_bookkeeping():
    model = meta_model("gelan-t", strides=STRIDES)
    assert model.save == [4, 6, 9, 12, 15, 18, 21]
    assert model.model[11].f == [-1, 6] and model.model[22].f == [15, 18, 21]
    assert model.model[0].type == "fxrewrite.yolov9.blocks.Conv"
    assert model.model[10].type == "torch.nn.modules.upsampling.Upsample"
    assert model.model[22].type == "fxrewrite.yolov9.heads.DDetect"
    assert model.names == [str(i) for i in range(80)]
    assert model.inplace is True and model.model[-1].inplace is True


@pytest.mark.parametrize("name", ["gelan-t", "yolov9-t", "gelan-c-dseg", "yolov9-c-dseg"])
def test_meta_build_measures_strides(name):
    model = meta_model(name)  # no strides given: dry run on the meta device
    assert all(p.is_meta for p in model.parameters())
    assert model.stride.device.type == "cpu"
    assert model.stride.tolist() == STRIDES
    assert model.model[-1].stride is model.stride


def test_real_build_init_and_untouched_buffers():
    model = DetectionModel("gelan-t")
    assert model.stride.tolist() == STRIDES
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert (module.eps, module.momentum) == (1e-3, 0.03)
            # The stride dry run must not have run data through the BatchNorms.
            assert int(module.num_batches_tracked) == 0
            assert torch.all(module.running_mean == 0) and torch.all(module.running_var == 1)
        if isinstance(module, nn.SiLU):
            assert module.inplace
    head = model.model[-1]
    for level, stride in enumerate(STRIDES):
        assert torch.all(head.cv2[level][-1].bias == 1.0)
        expected = torch.full((80,), math.log(5 / 80 / (640 / stride) ** 2))
        assert torch.allclose(head.cv3[level][-1].bias, expected)


def test_meta_skeleton_rebinds_with_stride_intact():
    model = meta_model("yolov9-t")
    model.to_empty(device="cpu")
    assert not any(p.is_meta for p in model.parameters())
    assert model.model[-1].stride.tolist() == STRIDES  # to_empty must not scramble the stride
    model.half()
    assert model.model[-1].stride.dtype == torch.float16 and model.model[-1].stride.tolist() == STRIDES


def test_nc_override_and_caller_dict_untouched():
    config = load_config("gelan-t")
    pristine = copy.deepcopy(config)
    torch.manual_seed(0)
    model = DetectionModel(config, nc=3, strides=STRIDES).eval()
    assert config == pristine
    assert model.yaml["nc"] == 3 and model.yaml["ch"] == 3
    assert model.names == ["0", "1", "2"]
    assert model.model[-1].nc == 3
    assert not hasattr(model, "yaml_file")  # only set for file configs, as in the reference
    with torch.no_grad():
        prediction, levels = model(torch.rand(1, 3, 64, 64))
    assert prediction.shape == (1, 4 + 3, 8 * 8 + 4 * 4 + 2 * 2)
    assert [tuple(t.shape) for t in levels] == [(1, 67, 8, 8), (1, 67, 4, 4), (1, 67, 2, 2)]


def test_config_forms_agree():
    by_name = meta_model("gelan-s", strides=STRIDES)
    by_file_name = meta_model("gelan-s.yaml", strides=STRIDES)
    by_path = meta_model(str(CONFIG_DIR / "gelan-s.yaml"), strides=STRIDES)
    by_dict = meta_model(load_config("gelan-s"), strides=STRIDES)
    reference = {k: v.shape for k, v in by_name.state_dict().items()}
    for other in (by_file_name, by_path, by_dict):
        assert {k: v.shape for k, v in other.state_dict().items()} == reference
        assert other.yaml == by_name.yaml


def test_eval_output_shapes():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 64)
    anchors = 8 * 8 + 4 * 4 + 2 * 2
    with torch.no_grad():
        dual = DetectionModel("yolov9-t", strides=STRIDES).eval()(image)
        predictions, (aux_levels, main_levels) = dual
        assert [tuple(p.shape) for p in predictions] == [(1, 84, anchors)] * 2
        assert [tuple(t.shape[-2:]) for t in main_levels] == [(8, 8), (4, 4), (2, 2)]

        # Shapes only: a meta-device model is enough (the oracle test checks values).
        seg = meta_model("gelan-c-dseg", strides=STRIDES).eval()(image.to("meta"))
        assert seg[0].shape == (1, 84 + 32, anchors)  # boxes, classes, mask coefficients
        assert seg[1][2].shape == (1, 32, 16, 16)  # mask prototypes at stride 4


def test_train_forward_is_fx_traceable():
    torch.manual_seed(0)
    model = DetectionModel("yolov9-t", strides=STRIDES)
    traced = torch.fx.symbolic_trace(model)
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected, actual = model(image), traced(image)
    assert structure(expected) == structure(actual)
    assert all(torch.equal(a, b) for a, b in zip(flatten(expected), flatten(actual)))


def test_activation_override_is_per_model():
    config = load_config("gelan-t")
    config["activation"] = "nn.LeakyReLU(0.1)"
    leaky = meta_model(config, strides=STRIDES)
    assert isinstance(leaky.model[0].act, nn.LeakyReLU) and leaky.model[0].act.negative_slope == 0.1
    assert isinstance(leaky.model[4].cv2[0].m[0].cv1.act, nn.LeakyReLU)  # RepConvN too
    assert leaky.model[0].act is not leaky.model[1].act  # one instance per layer
    # No leak into the next model (the reference mutates a class attribute).
    assert isinstance(meta_model("gelan-t", strides=STRIDES).model[0].act, nn.SiLU)


def test_fuse_keeps_outputs():
    torch.manual_seed(0)
    model = DetectionModel("gelan-t", strides=STRIDES).eval()
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(image)[0]
        model.fuse()
        after = model(image)[0]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.model[:-1].modules())
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-3)


def test_repconvn_fuse_convs_matches_branches():
    torch.manual_seed(0)
    block = blocks.RepConvN(8, 16).eval()
    for branch in (block.conv1, block.conv2):
        branch.bn.running_mean.uniform_(-0.5, 0.5)
        branch.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        expected = block(x)
        block.fuse_convs()
        fused = block.forward_fuse(x)
    assert not hasattr(block, "conv1") and block.conv.bias is not None
    assert torch.allclose(expected, fused, atol=1e-5)


def test_register_block_plugin():
    class Doubler(nn.Module):
        def __init__(self, c1, c2):
            super().__init__()
            self.conv = nn.Conv2d(c1, c2, 1)

        def forward(self, x):
            return self.conv(x) * 2

    config = tiny_config([[-1, 1, "Doubler", [16]], [-1, 1, "Conv", [8, 3, 1]]])
    with catalogue.scoped():
        assert register_block(Doubler, role="scaled") is Doubler
        assert registered_blocks()["Doubler"] == "scaled"
        assert register_block(Doubler, role="scaled") is Doubler  # the same row again: a no-op
        with pytest.raises(RegistrationError, match="block name 'Doubler' is already registered .*; pass replace=True"):
            register_block(nn.Identity, name="Doubler")
        with pytest.raises(RegistrationError, match="already registered"):
            register_block(Doubler, role="same")  # another role is another row
        model = meta_model(config)
        assert model.model[0].conv.in_channels == 3 and model.model[1].conv.in_channels == 16
        assert model.model[0].type.endswith("Doubler")
        # one registration, every table: configs, checkpoints and rule files
        assert catalogue.official_aliases()["models.common.Doubler"] is Doubler
        assert registry.module_class("Doubler") is Doubler
        register_block(nn.Identity, "models.common.Doubler2", name="Doubler", replace=True)
        assert registered_blocks()["Doubler"] == "same" and registry.module_class("Doubler") is nn.Identity
    assert "Doubler" not in registered_blocks() and registry.module_class("Doubler") is None
    assert "models.common.Doubler" not in catalogue.official_aliases()


def test_builtin_blocks_cannot_be_unregistered():
    with pytest.raises(ValueError, match="'Conv' is a built-in block"):
        catalogue.unregister_block("Conv")
    with pytest.raises(KeyError, match="no block registered under 'Nope'"):
        catalogue.unregister_block("Nope")


def test_parse_model_does_not_mutate_input():
    config = load_config("yolov9-c")
    pristine = copy.deepcopy(config)
    with torch.device("meta"):
        layers, save = parse_model(config, ch=[3])
    assert config == pristine
    assert len(layers) == 39 and save == sorted(save)


# --------------------------------------------------------------------------
# ConfigError messages
# --------------------------------------------------------------------------
STEM = [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]]]


def test_error_unknown_module():
    message = config_error(tiny_config(STEM + [[-1, 1, "Foo", [32]]]))
    known = ", ".join(sorted(registered_blocks()))
    assert message == (
        f"layer 2: unknown module 'Foo'. Known modules: {known}. Register your own with "
        "fxrewrite.yolov9.register_block(YourClass, name='Foo', role=...)"
    )


def test_error_names_the_file(tmp_path):
    config = tiny_config(STEM + [[[-1, 7], 1, "Concat", [1]]])
    path = tmp_path / "broken.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    assert config_error(str(path)) == (
        f"{path}, layer 2: 'from' index 7 is out of range (allowed: layers 0..1 or offsets -1..-2)"
    )


def test_error_from_out_of_range():
    assert config_error(tiny_config(STEM + [[-4, 1, "Conv", [8, 1, 1]]])) == (
        "layer 2: 'from' index -4 is out of range (allowed: layers 0..1 or offsets -1..-2)"
    )
    assert config_error(tiny_config([[0, 1, "Conv", [16, 3, 2]]])) == (
        "layer 0: 'from' index 0 is out of range (allowed: only -1 (the input image))"
    )


def test_error_negative_repeat_count():
    assert config_error(tiny_config(STEM + [[-1, -2, "Conv", [32, 3, 1]]])) == (
        "layer 2: repeat count must be a positive integer, got -2"
    )


def test_error_malformed_entry():
    assert config_error(tiny_config(STEM + [[-1, 1, "Conv"]])) == (
        "layer 2: malformed layer entry [-1, 1, 'Conv']: expected [from, number, module, args]"
    )
    assert config_error(tiny_config(STEM + [["x", 1, "Conv", [8]]])) == (
        "layer 2: 'from' must be an integer or a list of integers, got 'x'"
    )
    assert config_error(tiny_config(STEM + [[-1, 1, "Conv", [8, "k", 1]]])) == (
        "layer 2: cannot construct Conv(32, 8, 'k', 1): unsupported operand type(s) for //: 'str' and 'int'"
    )


def test_error_absurd_channels():
    assert config_error(tiny_config([[-1, 1, "Conv", [100_000, 3, 2]]])) == (
        "layer 0: output channel count 100000 exceeds the limit of 65536 channels"
    )
    assert config_error(tiny_config(STEM, width_multiple=0)) == (
        "width_multiple must be a positive number, got 0"
    )


def test_error_absurd_width_refused_before_allocation():
    config = load_config("gelan-t")
    config["width_multiple"] = 100
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        DetectionModel(config)  # real device: would need > 8 GB if it allocated
    assert time.perf_counter() - started < 30
    assert str(caught.value) == (
        "layer 16: the model would exceed 2,000,000,000 parameters (2,185,705,856 up to this layer); "
        "check width_multiple and the channel arguments"
    )


def test_error_cblinear_output_misused():
    config = tiny_config(STEM + [[-1, 1, "CBLinear", [[16, 16]]], [-1, 1, "Conv", [8, 3, 1]]])
    assert config_error(config) == "layer 3: Conv needs a tensor input, but layer 2 produces split CBLinear outputs"


def test_error_missing_key_and_unknown_shipped_name():
    config = tiny_config(STEM)
    del config["nc"]
    assert config_error(config) == "missing top-level key 'nc'"
    message = config_error("yolov9-zz")
    assert message.startswith("no model config 'yolov9-zz': not an existing file and not a shipped name (shipped: ")


# --------------------------------------------------------------------------
# Oracle: the official implementation
# --------------------------------------------------------------------------
def _randomised_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A copy of the state with non-trivial BatchNorm statistics and perturbed weights."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        value = value.clone()
        if key.endswith("running_mean"):
            value = torch.randn(value.shape, generator=generator) * 0.2
        elif key.endswith("running_var"):
            value = torch.rand(value.shape, generator=generator) + 0.5
        elif value.is_floating_point():
            value += torch.randn(value.shape, generator=generator) * 0.02
        state[key] = value
    return state


@requires_official
@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_model_matches_official(name):
    off = official()
    torch.manual_seed(0)
    reference = off.build(f"{name}.yaml")
    ours = meta_model(name, strides=STRIDES)

    # Layout: keys (in order) and shapes.
    reference_layout = [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == reference_layout
    # Layer bookkeeping.
    assert ours.save == reference.save
    assert [(m.i, m.f, m.np, m.type.rsplit(".", 1)[-1]) for m in ours.model] == [
        (m.i, m.f, m.np, m.type.rsplit(".", 1)[-1]) for m in reference.model
    ]
    assert torch.equal(ours.stride, reference.stride)
    assert ours.names == reference.names

    # Same weights -> bitwise-equal outputs, eval then train.
    state = _randomised_state(reference, seed=1)
    reference.load_state_dict(state)
    ours.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for mode in ("eval", "train"):
        getattr(reference, mode)()
        getattr(ours, mode)()
        with torch.no_grad():
            expected, actual = reference(image), ours(image)
        assert structure(actual) == structure(expected), mode
        assert all(torch.equal(a, b) for a, b in zip(flatten(actual), flatten(expected))), mode


def _block_cases():
    return [
        ("Conv", (8, 16, 3, 2), (2, 8, 12, 12)),
        ("Conv", (8, 16, 1, 1, None, 2), (2, 8, 12, 12)),
        ("AConv", (8, 16), (2, 8, 13, 13)),
        ("ADown", (8, 16), (2, 8, 13, 13)),
        ("RepConvN", (8, 16), (2, 8, 10, 10)),
        ("RepNBottleneck", (16, 16), (2, 16, 10, 10)),
        ("RepNBottleneck", (8, 16, False), (2, 8, 10, 10)),
        ("RepNCSP", (16, 24, 2), (2, 16, 10, 10)),
        ("RepNCSPELAN4", (16, 32, 32, 16, 2), (2, 16, 10, 10)),
        ("ELAN1", (16, 32, 32, 16), (2, 16, 10, 10)),
        ("SP", (5,), (2, 8, 10, 10)),
        ("SPPELAN", (16, 32, 8), (2, 16, 10, 10)),
        ("CBLinear", (16, [8, 16, 24]), (2, 16, 10, 10)),
        ("Silence", (), (2, 8, 10, 10)),
    ]


@requires_official
@pytest.mark.parametrize("name, args, input_shape", _block_cases())
def test_block_matches_official(name, args, input_shape):
    reference = getattr(official().common, name)(*args)
    ours = getattr(blocks, name)(*args)
    reference_layout = [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == reference_layout
    state = _randomised_state(reference, seed=3)
    reference.load_state_dict(state)
    ours.load_state_dict(state)
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(4))
    for mode in ("eval", "train"):
        getattr(reference, mode)()
        getattr(ours, mode)()
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(flatten(ours(x)), flatten(reference(x)))), mode
    # Same public attributes (checkpoints pickle them).
    assert set(vars(ours)) - {"_is_full_backward_hook"} == set(vars(reference)) - {"_is_full_backward_hook"}


@requires_official
def test_multi_input_blocks_match_official():
    common = official().common
    generator = torch.Generator().manual_seed(5)
    parts_a = list(torch.randn(1, 24, 4, 4, generator=generator).split([8, 16], 1))
    parts_b = list(torch.randn(1, 24, 2, 2, generator=generator).split([8, 16], 1))
    target = torch.randn(1, 16, 8, 8, generator=generator)
    inputs = [parts_a, parts_b, target]
    assert torch.equal(blocks.CBFuse([1, 1])(inputs), common.CBFuse([1, 1])(inputs))
    tensors = [torch.randn(1, c, 4, 4, generator=generator) for c in (3, 5)]
    assert torch.equal(blocks.Concat(1)(tensors), common.Concat(1)(tensors))
    assert blocks.autopad(3) == common.autopad(3) and blocks.autopad(3, d=2) == common.autopad(3, d=2)
    assert blocks.autopad([3, 5]) == common.autopad([3, 5])
