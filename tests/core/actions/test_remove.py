"""``remove`` on plain torch models: a node alone, or with everything computed from it (``cascade``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import Pattern, RewriteError, Rule

from helpers.toy_models import TwoBranch, example, seeded


def remove(gm, pattern: Pattern, **args):
    return fxrewrite.rewrite(gm, [Rule("rm", "remove", pattern, args=args)])


def test_an_unused_node_is_removed():
    class Dead(nn.Module):
        def forward(self, x):
            torch.sigmoid(x)  # computed, never used
            return torch.relu(x)

    gm = fxrewrite.trace(Dead(), torch.zeros(2))
    result = remove(gm, Pattern(function="sigmoid"))
    assert [n.name for n in result.module.graph.nodes] == ["x", "relu", "output"]
    assert result.node_status["sigmoid"] == "removed"


def test_cascade_removes_the_users_and_drops_the_outputs_they_feed():
    model, x = seeded(TwoBranch()), example(2, 3, 8, 8)
    gm = fxrewrite.trace(model, x)
    result = remove(gm, Pattern(module_name="aux.0.conv"), cascade=True)
    assert result.nodes_with_status("removed") == ["aux_0_conv", "aux_0_act", "aux_1", "mean_1", "aux_head_fc"]
    (main,) = result.module(x)
    assert torch.equal(main, model(x)[0])
    assert not any(k.startswith("aux") for k in result.param_map)
    assert result.node_status["output"] == "kept"


def test_a_used_node_is_refused_without_cascade():
    gm = fxrewrite.trace(seeded(TwoBranch()), example(1, 3, 8, 8))
    with pytest.raises(RewriteError) as info:
        remove(gm, Pattern(module_name="aux.0.conv"))
    assert str(info.value) == ("rule 'rm': cannot remove aux_0_conv: still used by aux_0_act "
                               "(use cascade: true, or collapse)")


@pytest.mark.parametrize("pattern, message", [
    (Pattern(op="placeholder"), "cannot remove x: it is the model's input node"),
    (Pattern(op="output"), "cannot remove output: it is the model's output node"),
    (Pattern(module_name="stem.conv"), "cannot remove stem_conv: every output of the model depends on it"),
])
def test_the_signature_and_every_output_are_kept(pattern, message):
    gm = fxrewrite.trace(seeded(TwoBranch()), example(1, 3, 8, 8))
    with pytest.raises(RewriteError) as info:
        remove(gm, pattern, cascade=True)
    assert str(info.value) == f"rule 'rm': {message}"


def test_a_node_argument_that_is_no_capture_is_refused():
    gm = fxrewrite.trace(seeded(TwoBranch()), example(1, 3, 8, 8))
    with pytest.raises(RewriteError, match="^rule 'rm': stem is not a node of the graph$"):
        remove(gm, Pattern(module_name="stem.conv"), node="stem")
