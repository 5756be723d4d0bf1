"""``replace`` on plain torch models: input selection (indices, slices, split), renamed tensors,
``$kept_inputs``, settings, refusals. Each new module's tensors are the old ones (same objects)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import Pattern, RewriteError, Rule, RuleFileError, register_module_class


class Towers(nn.Module):
    """One linear tower per input, summed: ``sum(cv[i](x_i))``."""

    def __init__(self, c: int = 3, n: int = 4):
        super().__init__()
        self.cv = nn.ModuleList(nn.Linear(c, c) for _ in range(n))

    def forward(self, *xs):
        return sum(cv(x) for cv, x in zip(self.cv, xs))


class Noted(nn.Module):
    """Remembers what its constructor was given (``$kept_inputs.count`` / ``.shapes``), adds its inputs."""

    def __init__(self, count: int, shapes: list):
        super().__init__()
        self.count, self.shapes = count, shapes

    def forward(self, *xs):
        assert len(xs) == self.count
        return sum(xs)


class Net(nn.Module):
    def __init__(self, c: int = 3):
        super().__init__()
        self.inp = nn.ModuleList(nn.Linear(c, c) for _ in range(4))
        self.head = Towers(c, 4)

    def forward(self, x):
        return self.head(*(layer(x) for layer in self.inp))


@pytest.fixture
def net(scope):
    register_module_class(Towers)
    register_module_class(Noted)
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3)
    return model, x, fxrewrite.trace(model, x, leaf_classes=["Towers"])


def replace(gm, **args):
    return fxrewrite.rewrite(gm, [Rule("r", "replace", Pattern(module_class="Towers", capture="head"), args=args)])


def expected(model, x, towers: list[int]):
    """What the head computes on inputs ``towers`` with their own towers."""
    return sum(model.head.cv[i](model.inp[i](x)) for i in towers)


@pytest.mark.parametrize("inputs, towers, rename", [
    ("2:", [2, 3], {"cv.2": "cv.0", "cv.3": "cv.1"}),
    (":2", [0, 1], {}),
    ("1:3", [1, 2], {"cv.1": "cv.0", "cv.2": "cv.1"}),
    (":-3", [0], {}),
    ([3, 0], [3, 0], {"cv.3": "cv.0", "cv.0": "cv.1"}),
    ({"split": 2, "keep": "last"}, [2, 3], {"cv.2": "cv.0", "cv.3": "cv.1"}),
    ({"split": 2, "keep": "first"}, [0, 1], {}),
    ({"split": 4, "keep": -2}, [2], {"cv.2": "cv.0"}),
    ({"groups": 2, "keep": 1}, [2, 3], {"cv.2": "cv.0", "cv.3": "cv.1"}),  # the old spelling
])
def test_inputs_select_and_rename_maps_the_towers(net, inputs, towers, rename):
    model, x, gm = net
    result = replace(gm, **{"with": "Towers", "inputs": inputs, "init": {"n": "$kept_inputs.count"},
                            "rename": rename})
    head = result.module.get_submodule("head")
    assert len(head.cv) == len(towers)
    node = next(n for n in result.module.graph.nodes if n.name == "head")
    assert [a.name for a in node.args] == [f"inp_{i}" for i in towers]
    assert {k: v for k, v in result.param_map.items() if k.startswith("head.")} == {
        f"head.cv.{new}.{t}": f"head.cv.{old}.{t}" for new, old in enumerate(towers) for t in ("weight", "bias")}
    assert all(head.cv[new].weight is model.head.cv[old].weight for new, old in enumerate(towers))
    assert torch.equal(result.module(x), expected(model, x, towers))
    dropped = [f"head.cv.{i}.{t}" for i in range(4) if i not in towers for t in ("weight", "bias")]
    assert result.log[0].dropped == dropped


def test_params_is_the_old_spelling_of_rename(net):
    model, x, gm = net
    new = replace(gm, **{"with": "Towers", "inputs": "2:", "init": {"n": 2}, "rename": {"cv.2": "cv.0", "cv.3": "cv.1"}})
    old = replace(gm, **{"with": "Towers", "inputs": "2:", "init": {"n": 2}, "params": {"cv.2": "cv.0", "cv.3": "cv.1"}})
    assert new.param_map == old.param_map and torch.equal(new.module(x), old.module(x))
    with pytest.raises(RuleFileError) as info:
        replace(gm, **{"with": "Towers", "rename": {}, "params": {}})
    assert str(info.value) == ("<python>: rule 'r': arguments 'rename' and 'params' of action 'replace' are the same "
                               "parameter ('params' is the old spelling of 'rename'); give one")


def test_kept_inputs_count_and_shapes_reach_the_constructor(net):
    model, x, gm = net
    result = replace(gm, **{"with": "Noted", "inputs": [0, 2, 3],
                            "init": {"count": "$kept_inputs.count", "shapes": "$kept_inputs.shapes"},
                            "strict": False})
    head = result.module.get_submodule("head")
    assert (type(head), head.count, head.shapes) == (Noted, 3, [(2, 3), (2, 3), (2, 3)])
    assert torch.equal(result.module(x), sum(model.inp[i](x) for i in (0, 2, 3)))
    assert [k for k in result.param_map if k.startswith("head")] == []  # Noted has no tensors


def test_kept_inputs_channels_needs_shapes(scope):
    register_module_class(Towers)
    gm = fxrewrite.trace(Net().eval(), leaf_classes=["Towers"])  # no example input: no shapes
    with pytest.raises(RewriteError, match=r"^rule 'r': \$kept_inputs.channels needs propagated shapes: input inp_0 "
                                           r"has none; trace with example inputs$"):
        replace(gm, **{"with": "Towers", "init": {"c": "$kept_inputs.channels"}})


@pytest.mark.parametrize("inputs, message", [
    ({"split": 3, "keep": 0}, "cannot split 4 inputs into 3 equal parts and keep part 0"),
    ({"split": 2, "keep": 2}, "cannot split 4 inputs into 2 equal parts and keep part 2"),
    ({"split": 2}, "inputs: expected {split: N, keep: K} (or {groups: N, keep: K}), not {'split': 2}"),
    ("a:b", "bad input slice 'a:b'; expected 'start:stop'"),
    ([4], "input indices [4] out of range for a node with 4 inputs"),
])
def test_bad_input_selections_are_refused(net, inputs, message):
    model, x, gm = net
    with pytest.raises(RewriteError) as info:
        replace(gm, **{"with": "Towers", "inputs": inputs})
    assert str(info.value) == f"rule 'r': {message}"


def test_a_tensor_without_a_source_is_refused_or_new_when_not_strict(net):
    model, x, gm = net
    with pytest.raises(RewriteError, match=r"^rule 'r': Towers.cv.4.weight has no source: Towers has no tensor "
                                           r"cv.4.weight \(map it with rename:, or set strict: false\)$"):
        replace(gm, **{"with": "Towers", "init": {"n": 5}})
    result = replace(gm, **{"with": "Towers", "init": {"n": 5}, "strict": False})
    assert result.param_map["head.cv.4.weight"] is None and result.param_map["head.cv.4.bias"] is None  # new
    assert result.param_map["head.cv.3.weight"] == "head.cv.3.weight"
    assert torch.equal(result.module(x), expected(model, x, [0, 1, 2, 3]))  # the fifth tower reads nothing


def test_settings_of_rebound_submodules_and_copied_attributes(scope):
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.tag = "old"

        def forward(self, x):
            return self.bn(x)

    register_module_class(Normed, "NormedHead")
    model = nn.Sequential(nn.Linear(3, 3), Normed()).eval()
    model[1].bn.eps = 1e-3  # changed after construction: the new BatchNorm must take it
    model[1].tag = "trained"
    x = torch.randn(2, 3)
    gm = fxrewrite.trace(model, x, leaf_classes=["Normed"])
    result = fxrewrite.rewrite(gm, [Rule("r", "replace", Pattern(module_class="Normed"),
                                         args={"with": "NormedHead", "copy_attrs": ["tag"]})])
    new = result.module.get_submodule("1")
    assert new is not model[1] and new.bn.eps == 1e-3 and new.tag == "trained"
    assert torch.equal(result.module(x), model(x))
    with pytest.raises(RewriteError, match="cannot copy attribute 'nope': Normed has none"):
        fxrewrite.rewrite(gm, [Rule("r", "replace", Pattern(module_class="Normed"),
                                    args={"with": "NormedHead", "copy_attrs": ["nope"]})])


def test_the_result_says_with_which_call_each_remaining_replaced_module_was_built(net):
    from fxrewrite.context import Construction

    model, x, gm = net
    result = replace(gm, **{"with": "Towers", "inputs": "2:", "init": {"n": "$kept_inputs.count"},
                            "rename": {"cv.2": "cv.0", "cv.3": "cv.1"}})
    assert result.constructions == {"head": Construction(Towers, {"n": 2}, result.module.get_submodule("head"))}
    again = fxrewrite.rewrite(gm, [
        Rule("r", "replace", Pattern(module_class="Towers", capture="head"), args={"with": "Towers", "init": {"n": 4}}),
        Rule("again", "replace", Pattern(module_class="Towers", capture="head"),
             args={"with": "Noted", "init": {"count": 4, "shapes": []}, "strict": False})])
    assert again.constructions == {"head": Construction(Noted, {"count": 4, "shapes": []},
                                                        again.module.get_submodule("head"))}  # the last call


def test_a_module_set_again_by_a_later_action_has_no_construction(net):
    from fxrewrite import register_action
    from fxrewrite.rebind import clone_module
    from fxrewrite.tensors import named_tensors

    @register_action("test_set_again")
    def set_again(ctx, match):
        module = ctx.module(match.root)
        ctx.set_module(match.root, clone_module(module), {name: name for name, _ in named_tensors(module)})

    model, x, gm = net
    result = fxrewrite.rewrite(gm, [
        Rule("r", "replace", Pattern(module_class="Towers", capture="head"), args={"with": "Towers", "init": {"n": 4}}),
        Rule("again", "test_set_again", Pattern(module_class="Towers", capture="head"))])
    assert result.node_status["head"] == "replaced" and result.constructions == {}
    assert torch.equal(result.module(x), model(x))
