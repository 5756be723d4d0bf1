"""Re-binding: renamed modules with the original tensors; binding templates by provenance."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import Pattern, RebindError, Rule
from fxrewrite.tensors import named_tensors

from helpers.toy_models import TwoBranch, example, seeded


@pytest.fixture
def stack():
    """A Sequential with identities at 1 and 3; after collapsing them, modules 0, 2, 4 remain."""
    model = seeded(nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.BatchNorm1d(4), nn.Identity(), nn.Linear(4, 2)))
    x = example(3, 4)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), [Rule("id", "collapse", Pattern(module_class="Identity"))])
    return model, x, result


BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def test_rebind_renumbers_modules_and_shares_tensors(stack):
    model, x, result = stack
    rebound = fxrewrite.rebind(result, {"2": "1", "4": "2"})
    assert rebound.param_map == {
        "0.weight": "0.weight", "0.bias": "0.bias", **{f"1.{t}": f"2.{t}" for t in BN},
        "2.weight": "4.weight", "2.bias": "4.bias"}
    gm = rebound.module
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    assert sorted(name for name, _ in gm.named_modules()) == ["", "0", "1", "2"]
    ours, theirs = dict(named_tensors(gm)), dict(named_tensors(model))
    assert set(ours) == set(rebound.param_map)
    assert all(ours[new] is theirs[old] for new, old in rebound.param_map.items())
    # fresh module objects: changing them never touches the model
    assert gm.get_submodule("1") is not model[2] and type(gm.get_submodule("1")) is nn.BatchNorm1d
    gm.get_submodule("1").momentum = 0.5
    assert model[2].momentum == 0.1
    assert torch.equal(gm(x), model(x))
    # the result itself is unchanged
    assert [n.target for n in result.module.graph.nodes if n.op == "call_module"] == ["0", "2", "4"]
    assert gm.meta["fxrewrite.trace"] is result.module.meta["fxrewrite.trace"]


def test_rebind_with_a_callable_and_nested_prefixes():
    model = seeded(TwoBranch())
    x = example(2, 3, 8, 8)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), fxrewrite.load_rules(
        "rules:\n  - {name: main, action: prune_unreachable, args: {outputs: [0]}}\n"))
    rebound = fxrewrite.rebind(result, {"main": "body", "main.2": "tail", "main_head": "head"})
    assert rebound.param_map == {
        "stem.conv.weight": "stem.conv.weight", "stem.conv.bias": "stem.conv.bias",
        "body.0.conv.weight": "main.0.conv.weight", "body.0.conv.bias": "main.0.conv.bias",
        "tail.conv.weight": "main.2.conv.weight", "tail.conv.bias": "main.2.conv.bias",
        "head.fc.weight": "main_head.fc.weight", "head.fc.bias": "main_head.fc.bias"}
    assert torch.equal(rebound.module(x), model(x)[0])
    upper = fxrewrite.rebind(result, lambda target: target.replace(".", "_").upper())
    assert sorted(upper.param_map) == sorted(
        f"{m}.{t}" for m in ["STEM_CONV", "MAIN_0_CONV", "MAIN_2_CONV", "MAIN_HEAD_FC"] for t in ["weight", "bias"])
    assert torch.equal(upper.module(x), model(x)[0])


def test_rebind_without_rename_is_an_identity_map(stack):
    model, x, result = stack
    rebound = fxrewrite.rebind(result)
    assert rebound.param_map == result.param_map
    assert rebound.param_map == {k: k for k in rebound.param_map}


def test_rebind_copy_gives_equal_copies(stack):
    model, x, result = stack
    rebound = fxrewrite.rebind(result, {"2": "1", "4": "2"}, copy=True)
    ours, theirs = dict(named_tensors(rebound.module)), dict(named_tensors(model))
    for new, old in rebound.param_map.items():
        assert ours[new] is not theirs[old]
        assert ours[new].data_ptr() != theirs[old].data_ptr()
        assert torch.equal(ours[new], theirs[old])
        assert type(ours[new]) is type(theirs[old])
    assert isinstance(ours["0.weight"], nn.Parameter) and ours["0.weight"].requires_grad
    with torch.no_grad():
        ours["0.weight"].add_(1)
    assert not torch.equal(ours["0.weight"], theirs["0.weight"])
    assert not torch.equal(rebound.module(x), model(x))


def test_rebind_collision_is_refused(stack):
    model, x, result = stack
    with pytest.raises(RebindError) as info:
        fxrewrite.rebind(result, {"0": "x", "2": "x"})
    assert str(info.value) == "renaming 2 to x collides with another module renamed to x"


def test_rename_target_longest_prefix():
    from fxrewrite.rebind import rename_target

    rename = {"model": "m", "model.2": "two", "model.22": "tt"}
    assert rename_target("model.2.cv1", rename) == "two.cv1"
    assert rename_target("model.22.cv1", rename) == "tt.cv1"
    assert rename_target("model.3", rename) == "m.3"
    assert rename_target("models.3", rename) == "models.3"
    assert rename_target("model", rename) == "m"


# -- bind_tensors -------------------------------------------------------------------------
@pytest.fixture
def source():
    return seeded(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))


def meta_template() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))


def test_meta_template_gets_bound(source):
    sources = dict(named_tensors(source))
    with torch.device("meta"):
        template = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert all(t.is_meta for _, t in named_tensors(template))
    bound = fxrewrite.bind_tensors(template, sources, lambda name: name, allow_unused=False)
    assert bound == {name: name for name in sources}
    mine = dict(named_tensors(template))
    assert all(mine[n] is sources[n] for n in sources)
    assert isinstance(template[0].weight, nn.Parameter) and isinstance(template[1].running_mean, torch.Tensor)
    assert "running_mean" in template[1]._buffers and "weight" in template[1]._parameters
    x = example(3, 4)
    assert torch.equal(template.eval()(x), source(x))


def test_bind_by_mapping_with_renaming_and_copy(source):
    template = meta_template()
    origin = {"0.weight": "0.weight", "0.bias": "1.bias", "1.weight": "2.weight", "1.bias": "2.bias"}
    bound = fxrewrite.bind_tensors(template, dict(named_tensors(source)), origin, copy=True)
    assert bound == origin
    assert template[0].bias is not source[1].bias and torch.equal(template[0].bias, source[1].bias)
    assert isinstance(template[0].bias, nn.Parameter)


@pytest.mark.parametrize("origin, kwargs, message", [
    ({"0.weight": "0.weight"}, {}, "0.bias: no origin recorded for this tensor"),
    ({"0.weight": "0.weight", "0.bias": "9.bias"}, {}, "0.bias: its origin 9.bias is not among the source tensors"),
    ({"0.weight": "2.weight"}, {}, "0.weight: shape (4, 4) does not match its origin 2.weight (2, 4)"),
    ({"0.weight": "0.weight", "0.bias": "0.bias", "1.weight": "2.weight", "1.bias": "0.bias"}, {},
     "1.bias: its origin 0.bias is already bound to 0.bias"),
    ({"0.weight": "0.weight", "0.bias": "0.bias", "1.weight": "2.weight", "1.bias": "2.bias"},
     {"allow_unused": False},
     "5 source tensor(s) were not bound: 1.bias, 1.num_batches_tracked, 1.running_mean, 1.running_var, 1.weight"),
])
def test_bind_tensors_errors(source, origin, kwargs, message):
    template = meta_template()
    before = dict(named_tensors(template))
    with pytest.raises(RebindError) as info:
        fxrewrite.bind_tensors(template, dict(named_tensors(source)), origin, **kwargs)
    assert str(info.value) == message
    # nothing was bound: the template is as it was (no half-bound model)
    after = dict(named_tensors(template))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_bind_from_a_rewrite_param_map(stack):
    """A fresh model built under meta, bound through the rewrite's provenance (the YOLO conversion's recipe)."""
    model, x, result = stack
    with torch.device("meta"):
        fresh = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    layer = {"0": "0", "1": "2", "2": "4"}  # fresh layer -> traced module target

    def origin(name: str) -> str | None:
        index, rest = name.split(".", 1)
        return result.param_map.get(f"{layer[index]}.{rest}")

    bound = fxrewrite.bind_tensors(fresh, dict(named_tensors(model)), origin, allow_unused=False)
    assert bound == {"0.weight": "0.weight", "0.bias": "0.bias", **{f"1.{t}": f"2.{t}" for t in BN},
                     "2.weight": "4.weight", "2.bias": "4.bias"}
    assert torch.equal(fresh.eval()(x), model(x))


# -- clone_module ------------------------------------------------------------------------------
class _Tied(torch.nn.Module):
    """Two names for one submodule, a plain tensor attribute, a list setting and a bound method."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)
        self.again = self.conv
        self.bn = torch.nn.BatchNorm2d(2)
        self.register_buffer("scale", torch.ones(2))
        self.anchors = torch.arange(3.0)
        self.sizes = [1, 2]

    def forward(self, x):
        return self.bn(self.conv(x)) * self.scale.view(1, -1, 1, 1)

    def forward_plain(self, x):
        return self.conv(x)


def test_clone_module_new_modules_same_tensors_and_independent_settings():
    from fxrewrite import clone_module

    model = _Tied()
    model.forward = model.forward_plain  # as the official fuse() does
    twin = clone_module(model)
    assert twin is not model and twin.conv is not model.conv and twin.again is twin.conv
    assert twin.conv.weight is model.conv.weight and twin.scale is model.scale and twin.anchors is model.anchors
    assert twin.forward.__self__ is twin and twin.forward.__func__ is _Tied.forward_plain
    twin.sizes.append(3)
    twin.bn.eps = 0.5
    del twin.bn
    twin.register_buffer("extra", torch.zeros(1))
    assert model.sizes == [1, 2] and model.bn.eps == 1e-5 and "extra" not in model._buffers
    assert list(model.state_dict()) == list(_Tied().state_dict()) and "bn.weight" in model.state_dict()


def test_clone_module_tensor_fn_runs_once_per_tensor_and_class_for_swaps_classes():
    from fxrewrite import clone_module

    class Twin(_Tied):
        pass

    model = _Tied()
    calls = []

    def halve(t):
        calls.append(t)
        return t.detach().half()

    twin = clone_module(model, tensor_fn=halve, class_for=lambda cls: Twin if cls is _Tied else cls)
    assert type(twin) is Twin and type(twin.conv) is torch.nn.Conv2d
    assert len(calls) == len({id(t) for t in calls}) == 8  # conv weight/bias once, although reachable twice
    assert twin.conv.weight.dtype == torch.float16 and model.conv.weight.dtype == torch.float32
    assert twin.again.weight is twin.conv.weight
