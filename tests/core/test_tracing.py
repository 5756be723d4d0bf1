"""Tracing: leaf policies, automatic leaves with their reasons, provenance, shapes."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import fxrewrite
from fxrewrite import LeafPolicy, TraceReport
from fxrewrite.provenance import Provenance
from fxrewrite.tracing import is_traced

from helpers.toy_models import Branchy, HeadNet, Lengthy, Loopy, Scaled, TwoBranch, WithLeaf, example, seeded

ITERATION = "TraceError: Proxy object cannot be iterated. "
LEN = ("RuntimeError: 'len' is not supported in symbolic tracing by default. If you want this call to be "
       "recorded, please call torch.fx.wrap('len') at module scope")
CONTROL_FLOW = "TraceError: symbolically traced variables cannot be used as inputs to control flow"


def called_modules(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def ops(gm: fx.GraphModule) -> list[tuple[str, str]]:
    return [(n.op, n.name) for n in gm.graph.nodes]


# -- leaf policy ---------------------------------------------------------------------
def test_default_policy_keeps_torch_modules_and_traces_through_user_modules():
    gm = fxrewrite.trace(HeadNet())
    assert called_modules(gm) == ["a", "b", "head.cv4.0", "head.cv4.1", "head.aux"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.cat]
    assert gm.meta["fxrewrite.trace"] == TraceReport(LeafPolicy(), {})
    assert is_traced(gm) and not is_traced(fx.symbolic_trace(HeadNet()))


@pytest.mark.parametrize("pattern", ["OldHead", "Old*", "helpers.toy_models.OldHead", "*.Old?ead"])
def test_leaf_by_class_name_glob(pattern):
    gm = fxrewrite.trace(HeadNet(), leaf_classes=[pattern])
    assert called_modules(gm) == ["a", "b", "head"]
    assert gm.meta["fxrewrite.trace"].policy == LeafPolicy(classes=(pattern,))


def test_class_glob_that_matches_nothing_changes_nothing():
    gm = fxrewrite.trace(HeadNet(), leaf_classes=["NewHead", "old*"])  # case-sensitive
    assert called_modules(gm) == ["a", "b", "head.cv4.0", "head.cv4.1", "head.aux"]


def test_leaf_by_qualified_name_glob():
    gm = fxrewrite.trace(TwoBranch(), leaf_names=["main.*", "aux"])
    assert called_modules(gm) == ["stem.conv", "stem.act", "main.0", "main.1", "main.2", "skip",
                                  "main_head.fc", "aux", "aux_head.fc"]


def test_leaf_by_depth():
    model = TwoBranch()
    assert called_modules(fxrewrite.trace(model, max_depth=1)) == [
        "stem", "main", "skip", "main_head", "aux", "aux_head"]
    assert called_modules(fxrewrite.trace(model, max_depth=2)) == [
        "stem.conv", "stem.act", "main.0", "main.1", "main.2", "skip", "main_head.fc", "aux.0", "aux.1",
        "aux_head.fc"]


def test_depth_without_torch_builtins_traces_into_torch_modules():
    gm = fxrewrite.trace(HeadNet(), max_depth=2, torch_builtins=False)
    assert ops(gm) == [
        ("placeholder", "x"), ("get_attr", "a_weight"), ("get_attr", "a_bias"), ("call_function", "conv2d"),
        ("get_attr", "b_weight"), ("get_attr", "b_bias"), ("call_function", "conv2d_1"),
        ("call_module", "head_cv4"), ("call_module", "head_aux"), ("call_function", "cat"), ("output", "output")]


def test_policy_is_leaf_directly():
    policy = LeafPolicy(classes=("Conv*",), names=("x.y",), max_depth=3, torch_builtins=False)
    assert policy.is_leaf(nn.Conv2d(1, 1, 1), "anything")
    assert policy.is_leaf(nn.ReLU(), "x.y")
    assert policy.is_leaf(nn.ReLU(), "a.b.c")
    assert not policy.is_leaf(nn.ReLU(), "a.b")
    assert not policy.is_leaf(nn.Sequential(), "")  # the root is never a leaf
    assert LeafPolicy().is_leaf(nn.ReLU(), "r")
    assert not LeafPolicy().is_leaf(nn.Sequential(nn.ReLU()), "s")
    assert not LeafPolicy().is_leaf(Loopy(), "l")


# -- automatic leaves ---------------------------------------------------------------
class Untraceables(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.loopy, self.lengthy, self.branchy = Loopy(), Lengthy(), Branchy()

    def forward(self, x):
        return self.branchy(self.lengthy(self.loopy(self.lin(x)))) + 1


def test_untraceable_modules_become_leaves_with_their_reason():
    model = seeded(Untraceables())
    x = example(3, 2, 4)
    gm = fxrewrite.trace(model, x)
    assert ops(gm) == [("placeholder", "x"), ("call_module", "lin"), ("call_module", "loopy"),
                       ("call_module", "lengthy"), ("call_module", "branchy"), ("call_function", "add"),
                       ("output", "output")]
    reasons = gm.meta["fxrewrite.trace"].auto_leaves
    assert list(reasons) == ["loopy", "lengthy", "branchy"]
    assert reasons["loopy"].startswith(ITERATION)
    assert "\n" not in reasons["loopy"]
    assert reasons["lengthy"] == LEN
    assert reasons["branchy"] == CONTROL_FLOW
    assert torch.equal(gm(x), model(x))


def test_auto_leaf_disabled_raises():
    with pytest.raises(fx.proxy.TraceError, match="Proxy object cannot be iterated"):
        fxrewrite.trace(Untraceables(), auto_leaf=False)


def test_failed_attempt_is_rolled_back_including_parameter_accesses():
    model = seeded(WithLeaf())
    x = example(2, 3, 4, 4)
    gm = fxrewrite.trace(model, x)
    assert ops(gm) == [("placeholder", "x"), ("call_module", "conv"), ("call_module", "odd"),
                       ("call_module", "ident"), ("call_module", "fc"), ("output", "output")]
    assert list(gm.meta["fxrewrite.trace"].auto_leaves) == ["odd"]
    assert gm.meta["fxrewrite.trace"].auto_leaves["odd"].startswith(ITERATION)
    assert gm.get_parameter("odd.scale") is model.odd.scale
    assert torch.equal(gm(x), model(x))


class Outer(nn.Module):
    """A traceable parent whose child fails; and a parent that fails after calling a child."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), Scaled())
        self.late = Late()
        self.tail = nn.Linear(4, 4)

    def forward(self, x):
        return self.tail(self.late(self.inner(x)) + self.inner(x))


class Late(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y * len(y)  # fails after lin was traced: lin's node must disappear


def test_nested_auto_leaves_and_shared_calls():
    model = seeded(Outer())
    x = example(3, 4)
    gm = fxrewrite.trace(model, x)
    assert ops(gm) == [
        ("placeholder", "x"), ("call_module", "inner_0"), ("call_module", "inner_1"), ("call_module", "late"),
        ("call_module", "inner_2"), ("call_module", "inner_3"), ("call_function", "add"),
        ("call_module", "tail"), ("output", "output")]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == [
        "inner.0", "inner.1", "late", "inner.0", "inner.1", "tail"]  # late.lin's node was rolled back
    assert list(gm.meta["fxrewrite.trace"].auto_leaves) == ["inner.1", "late"]
    assert gm.meta["fxrewrite.trace"].auto_leaves["late"] == LEN
    assert torch.equal(gm(x), model(x))


# -- the traced module -------------------------------------------------------------
def test_traced_module_is_bitwise_equal_and_shares_parameters():
    model = seeded(TwoBranch())
    x = example(2, 3, 8, 8)
    gm = fxrewrite.trace(model, x)
    main, aux = gm(x)
    ref_main, ref_aux = model(x)
    assert torch.equal(main, ref_main) and torch.equal(aux, ref_aux)
    assert type(gm).__name__ == "TwoBranch"
    for name, tensor in model.state_dict(keep_vars=True).items():
        assert gm.get_parameter(name) is tensor


def test_trace_does_not_change_the_model_mode_or_weights():
    model = seeded(TwoBranch()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxrewrite.trace(model, example(2, 3, 8, 8))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_provenance_on_every_node_exact():
    gm = fxrewrite.trace(TwoBranch())
    prov = {n.name: n.meta["provenance"] for n in gm.graph.nodes}
    P = Provenance
    assert prov == {
        "x": P("", "TwoBranch", ("x",)),
        "stem_conv": P("stem.conv", "Conv2d", ("stem_conv",)),
        "stem_act": P("stem.act", "ReLU", ("stem_act",)),
        "main_0_conv": P("main.0.conv", "Conv2d", ("main_0_conv",)),
        "main_0_act": P("main.0.act", "ReLU", ("main_0_act",)),
        "main_1": P("main.1", "Identity", ("main_1",)),
        "main_2_conv": P("main.2.conv", "Conv2d", ("main_2_conv",)),
        "main_2_act": P("main.2.act", "ReLU", ("main_2_act",)),
        "skip": P("skip", "Identity", ("skip",)),
        "add": P("", "TwoBranch", ("add",)),
        "mean": P("main_head", "Head", ("mean",)),
        "main_head_fc": P("main_head.fc", "Linear", ("main_head_fc",)),
        "aux_0_conv": P("aux.0.conv", "Conv2d", ("aux_0_conv",)),
        "aux_0_act": P("aux.0.act", "ReLU", ("aux_0_act",)),
        "aux_1": P("aux.1", "Identity", ("aux_1",)),
        "mean_1": P("aux_head", "Head", ("mean_1",)),
        "aux_head_fc": P("aux_head.fc", "Linear", ("aux_head_fc",)),
        "output": P("", "TwoBranch", ("output",)),
    }
    assert all(p.rules == () for p in prov.values())


def test_provenance_of_attributes_and_functions_inside_modules():
    gm = fxrewrite.trace(HeadNet(), max_depth=2, torch_builtins=False)
    prov = {n.name: (n.meta["provenance"].module, n.meta["provenance"].module_class) for n in gm.graph.nodes}
    assert prov == {
        "x": ("", "HeadNet"), "a_weight": ("a", "Conv2d"), "a_bias": ("a", "Conv2d"), "conv2d": ("a", "Conv2d"),
        "b_weight": ("b", "Conv2d"), "b_bias": ("b", "Conv2d"), "conv2d_1": ("b", "Conv2d"),
        "head_cv4": ("head.cv4", "Sequential"), "head_aux": ("head.aux", "Conv2d"), "cat": ("head", "OldHead"),
        "output": ("", "HeadNet"),
    }


def test_provenance_of_an_auto_leaf():
    gm = fxrewrite.trace(WithLeaf())
    odd = next(n for n in gm.graph.nodes if n.name == "odd")
    assert odd.meta["provenance"] == Provenance("odd", "Scaled", ("odd",))


def test_shape_propagation_records_shapes():
    x = example(2, 3, 8, 8)
    gm = fxrewrite.trace(TwoBranch(), x)
    shapes = {n.name: fxrewrite.shape_of(n) for n in gm.graph.nodes}
    assert shapes == {
        "x": (2, 3, 8, 8), "stem_conv": (2, 4, 4, 4), "stem_act": (2, 4, 4, 4), "main_0_conv": (2, 4, 4, 4),
        "main_0_act": (2, 4, 4, 4), "main_1": (2, 4, 4, 4), "main_2_conv": (2, 4, 4, 4),
        "main_2_act": (2, 4, 4, 4), "skip": (2, 4, 4, 4), "add": (2, 4, 4, 4), "mean": (2, 4),
        "main_head_fc": (2, 5), "aux_0_conv": (2, 8, 4, 4), "aux_0_act": (2, 8, 4, 4), "aux_1": (2, 8, 4, 4),
        "mean_1": (2, 8), "aux_head_fc": (2, 5), "output": None}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    from fxrewrite.shapes import dtype_of, example_inputs, shape_tree
    assert shape_tree(output) == ((2, 5), (2, 5))
    assert dtype_of(output.args[0][0]) == torch.float32
    assert example_inputs(gm)[0] is x


def test_no_example_inputs_no_shapes():
    gm = fxrewrite.trace(TwoBranch())
    assert all(fxrewrite.shape_of(n) is None for n in gm.graph.nodes)
    assert "fxrewrite.example_inputs" not in gm.meta


# -- sealed leaves -------------------------------------------------------------------
class _Layer(nn.Module):
    def __init__(self, c_in: int, c_out: int, reads: int = -1):
        super().__init__()
        self.f = reads
        self.conv, self.bn, self.act = nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _Concat(nn.Module):
    def __init__(self, reads):
        super().__init__()
        self.f = reads

    def forward(self, xs):
        return torch.cat(xs, 1)


class LayerLoop(nn.Module):
    """A YOLO-style layer table: the loop reads each layer's ``f`` and calls it, never looking inside."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.5))
        self.layers = nn.Sequential(_Layer(3, 4), _Layer(4, 4), _Layer(4, 6, reads=0), _Concat([1, 2]), _Layer(10, 2))

    def forward(self, x):
        outputs = []
        for layer in self.layers:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x)
        return x * self.scale


class ReachesInside(LayerLoop):
    def forward(self, x):
        return super().forward(x) + self.layers[0].conv.bias.sum()  # a sealed leaf's submodule


def _trace_recording_module_paths(monkeypatch, *args, **kwargs):
    seen = []
    real = fxrewrite.tracing.ProvenanceTracer.trace

    def trace(self, root, *a, **k):
        seen.append(sorted(name for name, _ in root.named_modules()))  # what fx walks
        return real(self, root, *a, **k)
    monkeypatch.setattr(fxrewrite.tracing.ProvenanceTracer, "trace", trace)
    return fxrewrite.trace(*args, **kwargs), seen


def _same_graphs(a: fx.GraphModule, b: fx.GraphModule) -> None:
    assert str(a.graph) == str(b.graph)
    for x, y in zip(a.graph.nodes, b.graph.nodes):
        assert (x.meta.keys(), x.meta.get("provenance"), x.meta.get("nn_module_stack")) == \
               (y.meta.keys(), y.meta.get("provenance"), y.meta.get("nn_module_stack"))
        assert str(x.meta.get("tensor_meta")) == str(y.meta.get("tensor_meta"))
    for node in a.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            assert a.get_submodule(node.target) is b.get_submodule(node.target) if node.op == "call_module" \
                else fxrewrite.tensors.attribute_at(a, node.target) is fxrewrite.tensors.attribute_at(b, node.target)


def test_sealed_leaves_give_fx_only_the_modules_down_to_the_depth_limit_and_the_same_graph(monkeypatch):
    model = seeded(LayerLoop()).eval()
    x = example(1, 3, 8, 8)
    full = fxrewrite.trace(model, x, max_depth=2)
    sealed, seen = _trace_recording_module_paths(monkeypatch, model, x, max_depth=2, sealed_leaves=True)
    assert seen == [["", "layers", "layers.0", "layers.1", "layers.2", "layers.3", "layers.4"]]  # not layers.0.conv ...
    _same_graphs(full, sealed)
    assert [n.target for n in sealed.graph.nodes if n.op == "call_module"] == [f"layers.{i}" for i in range(5)]
    assert all(sealed.get_submodule(f"layers.{i}") is model.layers[i] for i in range(5))  # the user's modules
    assert sealed.get_submodule("layers.0.conv") is model.layers[0].conv
    assert torch.equal(sealed(x), model(x))
    assert [name for name, _ in model.named_modules()][:3] == ["", "layers", "layers.0"]
    assert len(list(model.layers[0].children())) == 3  # the user's model is not modified


def test_sealed_leaves_without_a_depth_limit_change_nothing(monkeypatch):
    model = seeded(LayerLoop()).eval()
    traced, seen = _trace_recording_module_paths(monkeypatch, model, sealed_leaves=True)
    assert "layers.0.conv" in seen[0]
    _same_graphs(fxrewrite.trace(model), traced)


def test_code_that_reaches_inside_a_sealed_leaf_is_traced_in_full(monkeypatch):
    model = seeded(ReachesInside()).eval()
    x = example(1, 3, 8, 8)
    traced, seen = _trace_recording_module_paths(monkeypatch, model, x, max_depth=2, sealed_leaves=True)
    assert len(seen) == 2 and "layers.0.conv" not in seen[0] and "layers.0.conv" in seen[1]  # sealed, then full
    _same_graphs(fxrewrite.trace(model, x, max_depth=2), traced)
    assert torch.equal(traced(x), model(x))


def test_a_module_also_reachable_above_the_depth_limit_is_not_sealed(monkeypatch):
    class Shared(LayerLoop):
        def __init__(self):
            super().__init__()
            self.first = self.layers[0]  # depth 1 as well as 2: traced through where it is called as `first`

        def forward(self, x):
            return super().forward(x) + self.first.conv(x).mean()

    model = seeded(Shared()).eval()
    x = example(1, 3, 8, 8)
    sealed, seen = _trace_recording_module_paths(monkeypatch, model, x, max_depth=2, sealed_leaves=True)
    assert len(seen) == 1 and "layers.0.conv" in seen[0] and "layers.1.conv" not in seen[0]  # no second attempt
    _same_graphs(fxrewrite.trace(model, x, max_depth=2), sealed)
    assert torch.equal(sealed(x), model(x))


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x).relu()


class _Wrapper(nn.Module):
    def __init__(self, inner=None):
        super().__init__()
        self.inner = inner if inner is not None else _Inner()

    def forward(self, x):
        return self.inner(x)


class _Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _Wrapper(), _Wrapper()

    def forward(self, x):
        return self.b(self.a(x)) * self.a.inner.conv.weight.mean()  # reads inside `a`


class StageReachingIn(nn.Module):
    """``stage`` (depth 1) is traced through and reads inside ``stage.a`` (depth 2, sealed)."""

    def __init__(self):
        super().__init__()
        self.stage = _Stage()

    def forward(self, x):
        return self.stage(x)


class RegisteredTwice(nn.Module):
    """A block registered first inside a depth-2 layer and again at depth 1: fx names it by the first path."""

    def __init__(self):
        super().__init__()
        shared = _Inner()
        self.layers = nn.Sequential(_Wrapper(shared), _Wrapper())
        self.extra = shared

    def forward(self, x):
        return self.layers(x) + self.extra(x)


class TiedWeight(nn.Module):
    """A weight of a module inside a layer, tied to a depth-1 module's and read by the root through it."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(_Wrapper(), _Wrapper())
        self.tied = nn.Conv2d(3, 3, 1)
        self.layers[0].inner.conv.weight = self.tied.weight

    def forward(self, x):
        return self.layers(x) * self.tied.weight.sum()


@pytest.mark.parametrize("make", [StageReachingIn, RegisteredTwice, TiedWeight])
def test_what_sealing_would_name_or_trace_differently_is_traced_in_full(monkeypatch, make):
    model = seeded(make()).eval()
    x = example(1, 3, 4, 4)
    traced, seen = _trace_recording_module_paths(monkeypatch, model, x, max_depth=2, sealed_leaves=True)
    full = fxrewrite.trace(model, x, max_depth=2)
    _same_graphs(full, traced)
    assert traced.meta["fxrewrite.trace"].auto_leaves == full.meta["fxrewrite.trace"].auto_leaves
    assert "layers.0.inner.conv" in seen[-1] or "stage.a.inner.conv" in seen[-1]  # the last attempt was in full
    assert torch.equal(traced(x), model(x))


def test_sealed_leaves_need_a_depth_limit_of_one_or_more(monkeypatch):
    model = seeded(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())).eval()
    x = example(1, 3, 4, 4)
    traced, seen = _trace_recording_module_paths(monkeypatch, model, x, max_depth=0, sealed_leaves=True)
    assert seen == [["", "0", "1"]]
    _same_graphs(fxrewrite.trace(model, x, max_depth=0), traced)
    assert torch.equal(traced(x), model(x))
