"""``prune_unreachable`` on plain torch models: outputs by position (several, nested) or by pattern."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import Pattern, RewriteError, Rule


class ThreeHeads(nn.Module):
    """A trunk and three heads; returns ``(h0, (h1, h2))``."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(3, 4)
        self.h0, self.h1, self.h2 = nn.Linear(4, 2), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        t = torch.relu(self.trunk(x))
        return self.h0(t), (self.h1(t), self.h2(t))


@pytest.fixture
def heads():
    torch.manual_seed(0)
    model = ThreeHeads().eval()
    x = torch.randn(2, 3)
    return model, x, fxrewrite.trace(model, x)


def prune(gm, **args):
    return fxrewrite.rewrite(gm, [Rule("p", "prune_unreachable", args=args)])


def tensors(*modules: str) -> list[str]:
    return [f"{m}.{t}" for m in modules for t in ("weight", "bias")]


def test_several_outputs_by_position(heads):
    model, x, gm = heads
    result = prune(gm, outputs=[0, [1, 1]])
    assert [n.name for n in result.module.graph.nodes] == ["x", "trunk", "relu", "h0", "h2", "output"]
    assert result.nodes_with_status("pruned") == ["h1"]
    assert result.log[0].dropped == tensors("h1")
    y0, y2 = result.module(x)
    ref = model(x)
    assert torch.equal(y0, ref[0]) and torch.equal(y2, ref[1][1])
    assert result.param_map == {n: n for n in tensors("trunk", "h0", "h2")}


def test_one_nested_output(heads):
    model, x, gm = heads
    result = prune(gm, outputs=[[1, 0]])
    assert torch.equal(result.module(x), model(x)[1][0])
    assert result.log[0].dropped == tensors("h0", "h2")  # in graph order


def test_a_nested_structure_kept_as_a_whole(heads):
    model, x, gm = heads
    result = prune(gm, outputs=[1])
    y1, y2 = result.module(x)
    assert torch.equal(y1, model(x)[1][0]) and torch.equal(y2, model(x)[1][1])
    assert result.nodes_with_status("pruned") == ["h0"]


def test_outputs_chosen_by_pattern_in_graph_order(heads):
    model, x, gm = heads
    result = fxrewrite.rewrite(gm, [Rule("p", "prune_unreachable", Pattern(module_name="h[02]"))])
    y0, y2 = result.module(x)
    assert torch.equal(y0, model(x)[0]) and torch.equal(y2, model(x)[1][1])
    assert result.log[0].dropped == tensors("h1")


def test_without_outputs_only_dead_nodes_go(heads):
    model, x, gm = heads
    result = prune(gm)
    assert result.nodes_with_status("pruned") == [] and result.log[0].rewrites == 0
    assert str(result.log[0]) == "p (prune_unreachable): 0 matched, 0 rewritten"


@pytest.mark.parametrize("position, shown", [(2, "2"), ([1, 2], "[1, 2]"), ([0, 0], "[0, 0]")])
def test_a_position_that_does_not_exist_is_refused(heads, position, shown):
    model, x, gm = heads
    with pytest.raises(RewriteError) as info:
        prune(gm, outputs=[position])
    assert str(info.value).startswith(f"rule 'p': output position {shown} does not exist in the output structure")


def test_a_pattern_matching_nothing_is_refused_rather_than_pruning_everything(heads):
    model, x, gm = heads
    with pytest.raises(RewriteError, match="no node matched the output pattern; refusing to prune everything"):
        fxrewrite.rewrite(gm, [Rule("p", "prune_unreachable", Pattern(module_name="nothing"))])
