"""``collapse`` on plain torch models: the node's uses go to one of its inputs, the node is erased."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import Pattern, RewriteError, Rule


class Pick(nn.Module):
    """Returns its ``which`` argument unchanged: a pass-through of one of several inputs."""

    def __init__(self, which: int):
        super().__init__()
        self.which = which

    def forward(self, a, b, c):
        return (a, b, c)[self.which]


class ThreeWay(nn.Module):
    def __init__(self, which: int = 1):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.pick = Pick(which)
        self.out = nn.ReLU()

    def forward(self, x):
        return self.out(self.pick(self.a(x), self.b(x), self.c(x)))


def traced(which: int):
    torch.manual_seed(0)
    model = ThreeWay(which).eval()
    x = torch.randn(2, 3)
    return model, x, fxrewrite.trace(model, x, leaf_classes=["Pick"])


@pytest.mark.parametrize("which, index", [(1, 1), (2, 2), (2, -1), (0, 0), (0, -3)])
def test_collapse_hands_the_uses_to_the_chosen_input(which, index):
    model, x, gm = traced(which)
    result = fxrewrite.rewrite(gm, [Rule("drop-pick", "collapse", Pattern(module_class="Pick"),
                                         args={"input": index})])
    chosen = ["a", "b", "c"][index]
    assert result.node_status["pick"] == "collapsed"
    out = next(n for n in result.module.graph.nodes if n.name == "out")
    assert [a.name for a in out.args] == [chosen]
    assert torch.equal(result.module(x), model(x))
    # the other two branches are dead but still there: collapse deletes only the node
    assert [n.name for n in result.module.graph.nodes] == ["x", "a", "b", "c", "out", "output"]


def test_collapsing_to_the_wrong_input_is_refused_by_validation_only_when_values_differ():
    """Every input has the same shape: collapse cannot tell (the outputs differ, verify would)."""
    model, x, gm = traced(1)
    result = fxrewrite.rewrite(gm, [Rule("c", "collapse", Pattern(module_class="Pick"), args={"input": 0})])
    assert not torch.equal(result.module(x), model(x))
    assert torch.equal(result.module(x), model.out(model.a(x)))


def test_an_input_that_does_not_exist_is_refused():
    model, x, gm = traced(1)
    with pytest.raises(RewriteError, match=r"^rule 'c': cannot collapse pick: it has 3 input\(s\), no input 3$"):
        fxrewrite.rewrite(gm, [Rule("c", "collapse", Pattern(module_class="Pick"), args={"input": 3})])


def test_a_node_that_changes_the_shape_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    gm = fxrewrite.trace(model, torch.zeros(2, 3))
    with pytest.raises(RewriteError, match=r"cannot collapse _0: it is not a pass-through \(input shape \(2, 3\), "
                                           r"output shape \(2, 4\)\)"):
        fxrewrite.rewrite(gm, [Rule("c", "collapse", Pattern(module_class="Linear"))])


def test_collapse_a_captured_node_other_than_the_root():
    model = nn.Sequential(nn.Identity(), nn.ReLU())
    x = torch.randn(2, 3)
    gm = fxrewrite.trace(model, x)
    rule = Rule("c", "collapse", Pattern(module_class="ReLU", inputs=[Pattern(module_class="Identity", capture="i")]),
                args={"node": "$i"})
    result = fxrewrite.rewrite(gm, [rule])
    assert result.node_status == {"input_1": "kept", "_0": "collapsed", "_1": "kept", "output": "kept"}
    assert torch.equal(result.module(x), torch.relu(x))
