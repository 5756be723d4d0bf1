"""Convolutions by shape alone (``fxrewrite.conv_shapes``) against torch's own convolutions.

The oracle is torch: for any call, either the shape function says ``None`` (the real
convolution runs) or the real convolution succeeds with exactly that shape, contiguous.
Whole models traced with ``shapes_only=True`` record the same ``tensor_meta`` on every node
as with every convolution computed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fxrewrite
from fxrewrite.conv_shapes import convolution_output_shape, convolutions_by_shape
from helpers.any_models import IMAGE_MODELS, build, image

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _per_dim(draw, dims: int, values) -> object:
    """An int, or a tuple of ``dims`` ints (sometimes of the wrong length: torch's error then)."""
    if draw(st.booleans()):
        return draw(values)
    return tuple(draw(values) for _ in range(draw(st.sampled_from([dims, dims, dims, 1, dims + 1]))))


@st.composite
def conv_calls(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_per_group = draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3)) + draw(st.sampled_from([0, 0, 0, 1]))  # sometimes indivisible
    channels = groups * in_per_group + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))  # sometimes the wrong count
    size = [draw(st.integers(1, 9)) for _ in range(dims)]
    kernel = [draw(st.integers(1, 4)) for _ in range(dims)]
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    weight_dtype = draw(st.sampled_from([dtype] * 5 + [torch.float32]))
    x = torch.zeros(draw(st.integers(1, 2)), max(channels, 1), *size, dtype=dtype)
    if draw(st.integers(0, 9)) == 0:
        x = x[0]  # unbatched
    w = torch.zeros(out_channels, in_per_group, *kernel, dtype=weight_dtype)
    bias = draw(st.sampled_from([None, "right", "wrong"]))
    b = None if bias is None else torch.zeros(out_channels + (bias == "wrong"), dtype=weight_dtype)
    kwargs = {"bias": b, "stride": _per_dim(draw, dims, st.integers(1, 3)),
              "dilation": _per_dim(draw, dims, st.integers(1, 2)), "groups": groups}
    kwargs["padding"] = draw(st.one_of(st.sampled_from(["same", "valid"]), st.just(None)))
    if kwargs["padding"] is None:
        kwargs["padding"] = _per_dim(draw, dims, st.integers(0, 2))
    return dims, x, w, kwargs


@settings(max_examples=400, deadline=None)
@given(conv_calls())
def test_the_shape_is_torchs_or_none(call):
    dims, x, w, kwargs = call
    try:
        real = CONV[dims](x, w, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        real = None
    shape = convolution_output_shape(dims, x, w, **kwargs)
    if shape is not None:
        assert real is not None, "a call torch refuses was given a shape"
        assert tuple(real.shape) == shape
        assert real.is_contiguous() and real.dtype == x.dtype
    with convolutions_by_shape():
        try:
            by_shape = CONV[dims](x, w, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            by_shape = None
    assert (by_shape is None) == (real is None)
    if real is not None:
        assert by_shape.shape == real.shape and by_shape.dtype == real.dtype and by_shape.stride() == real.stride()


PLAIN = [
    ("conv2d 3x3 s2 p1", 2, (1, 3, 32, 32), (8, 3, 3, 3), dict(stride=2, padding=1), (1, 8, 16, 16)),
    ("grouped, dilated, tuple args", 2, (2, 4, 9, 7), (6, 2, 3, 1), dict(stride=(2, 1), padding=(1, 0),
                                                                       dilation=(2, 1), groups=2), (2, 6, 4, 7)),
    ("depthwise", 2, (1, 8, 5, 5), (8, 1, 3, 3), dict(padding=1, groups=8), (1, 8, 5, 5)),
    ("same, even kernel", 2, (1, 2, 6, 6), (4, 2, 4, 2), dict(padding="same"), (1, 4, 6, 6)),
    ("valid", 1, (1, 2, 10), (3, 2, 4), dict(padding="valid"), (1, 3, 7)),
    ("conv3d", 3, (1, 2, 4, 5, 6), (3, 2, 3, 3, 3), dict(padding=1, stride=2), (1, 3, 2, 3, 3)),
]


@pytest.mark.parametrize("dims, xs, ws, kwargs, expected", [p[1:] for p in PLAIN], ids=[p[0] for p in PLAIN])
def test_plain_calls_are_not_computed(dims, xs, ws, kwargs, expected):
    x, w = torch.randn(xs), torch.randn(ws)
    assert convolution_output_shape(dims, x, w, **kwargs) == expected
    assert tuple(CONV[dims](x, w, **kwargs).shape) == expected
    with convolutions_by_shape():
        y = CONV[dims](x, w, **kwargs)
    assert tuple(y.shape) == expected and not y.any()


NOT_PLAIN = {
    "channels_last input": lambda x, w: (x.to(memory_format=torch.channels_last), w),
    "channels_last weight": lambda x, w: (x, w.to(memory_format=torch.channels_last)),
    "unbatched": lambda x, w: (x[0], w),
    "weight requires grad": lambda x, w: (x, w.requires_grad_()),
    "empty batch": lambda x, w: (x[:0], w),
    "integer input": lambda x, w: (x.long(), w.long()),
}


@pytest.mark.parametrize("change", NOT_PLAIN.values(), ids=NOT_PLAIN.keys())
def test_other_calls_run_the_real_convolution(change):
    x, w = change(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3))
    assert convolution_output_shape(2, x, w, None, 1, 1) is None
    try:
        real = F.conv2d(x, w, None, 1, 1)
    except RuntimeError as exc:
        with convolutions_by_shape(), pytest.raises(RuntimeError) as info:
            F.conv2d(x, w, None, 1, 1)
        assert str(info.value) == str(exc)
        return
    with convolutions_by_shape():
        y = F.conv2d(x, w, None, 1, 1)
    torch.testing.assert_close(y, real, rtol=0, atol=0)  # computed: the same values
    assert y.stride() == real.stride() and y.requires_grad == real.requires_grad


def test_a_wrong_channel_count_raises_torchs_own_error():
    x, w = torch.zeros(1, 5, 4, 4), torch.zeros(8, 3, 1, 1)
    with pytest.raises(RuntimeError) as real:
        F.conv2d(x, w)
    with convolutions_by_shape(), pytest.raises(RuntimeError) as by_shape:
        F.conv2d(x, w)
    assert str(by_shape.value) == str(real.value)
    assert "expected input[1, 5, 4, 4] to have 3 channels, but got 5 channels instead" in str(real.value)


def _metas(gm):
    return {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_traced_models_record_the_same_shapes(name, dtype):
    model = build(IMAGE_MODELS[name]).to(dtype)
    x = image().to(dtype)
    computed = fxrewrite.trace(model, x)
    by_shape = fxrewrite.trace(model, x, shapes_only=True)
    assert _metas(by_shape) == _metas(computed)
    convs = [n for n in computed.graph.nodes
             if n.op == "call_module" and isinstance(computed.get_submodule(n.target), torch.nn.Conv2d)]
    assert len(convs) >= 3
    assert by_shape.meta["fxrewrite.shapes_only"] is True and computed.meta["fxrewrite.shapes_only"] is False


def test_yolo_layers_record_the_same_shapes():
    from fxrewrite.yolov9 import DetectionModel

    model = DetectionModel("yolov9-t").half().eval()
    x = torch.zeros(1, 3, 64, 64, dtype=torch.float16)
    computed = fxrewrite.trace(model, x, max_depth=2, concrete_args={"augment": False, "profile": False,
                                                                     "visualize": False})
    by_shape = fxrewrite.trace(model, x, max_depth=2, shapes_only=True,
                               concrete_args={"augment": False, "profile": False, "visualize": False})
    assert _metas(by_shape) == _metas(computed)
    assert len(_metas(computed)) > 30


def test_a_rewrite_re_checks_shapes_the_way_the_trace_propagated_them():
    model = build(IMAGE_MODELS["resnet"])
    gm = fxrewrite.trace(model, image(), shapes_only=True)
    result = fxrewrite.rewrite(gm, fxrewrite.load_rules("fuse-conv-bn"))
    assert result.module.meta["fxrewrite.shapes_only"] is True
    assert _metas(result.module)  # shapes recorded on the rewritten graph
    torch.testing.assert_close(result.module(image()), model(image()), rtol=1e-4, atol=1e-5)


def test_shapes_only_does_not_compute_the_convolutions():
    model = build(IMAGE_MODELS["resnet"])
    x = image()
    computed = fxrewrite.trace(model, x)
    by_shape = fxrewrite.trace(model, x, shapes_only=True)
    first_conv = next(n for n in computed.graph.nodes
                      if n.op == "call_module" and isinstance(computed.get_submodule(n.target), torch.nn.Conv2d))
    values = {name: computed.meta["fxrewrite.example_values"][name] for name in [first_conv.name]}
    assert values[first_conv.name].abs().sum() > 0
    assert not by_shape.meta["fxrewrite.example_values"][first_conv.name].any()  # zeros: not computed
    # the public function computes unless told otherwise, whatever the trace did
    out = fxrewrite.propagate_shapes(by_shape, x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    assert by_shape.meta["fxrewrite.shapes_only"] is False


def test_autocast_runs_the_real_convolution():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = F.conv2d(x, w)
        with convolutions_by_shape():
            y = F.conv2d(x, w)
    assert y.dtype == real.dtype == torch.bfloat16
    torch.testing.assert_close(y, real, rtol=0, atol=0)


def test_value_dependent_shapes_are_the_documented_exception():
    class Mask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.nonzero(self.conv(x) > 0)

    torch.manual_seed(0)
    model = Mask().eval()
    x = torch.randn(1, 3, 8, 8)
    computed = fxrewrite.trace(model, x)
    by_shape = fxrewrite.trace(model, x, shapes_only=True)
    shape = lambda gm: [n.meta["tensor_meta"].shape for n in gm.graph.nodes if n.name == "nonzero"][0]
    assert shape(computed)[0] > 0 and tuple(shape(by_shape)) == (0, 4)


def test_meta_tensors_are_sized_too():
    x, w = torch.zeros(1, 3, 8, 8, device="meta"), torch.zeros(4, 3, 3, 3, device="meta")
    with convolutions_by_shape():
        y = F.conv2d(x, w, None, 2, 1)
    assert y.device.type == "meta" and tuple(y.shape) == (1, 4, 4, 4)
