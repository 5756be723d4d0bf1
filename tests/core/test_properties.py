"""Property-based: random DAG models, pruned to their main output and rid of identities.

For any model built from random widths, skip connections (add / concat), identity
layers and an auxiliary output, prune (keep output 0) + collapse (identities)
must give a module that

* computes the original's main output bitwise;
* has no node the output does not need (placeholders aside) and no Identity call;
* keeps exactly the tensors of the modules the main output needs, each mapped
  once to itself (same name, same object).
"""
from __future__ import annotations

import operator

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import fxrewrite
from fxrewrite.examples import DEMO_RULES, StepModel
from fxrewrite.tensors import named_tensors

RULES = fxrewrite.load_rules(DEMO_RULES, name="<demo rules>")  # keep output 0; collapse identities


@st.composite
def random_dags(draw):
    """``(model, input width)``: linear, relu, identity, add and cat steps (fxrewrite.examples.StepModel)."""
    model = StepModel.random(lambda lo, hi: draw(st.integers(lo, hi)), lambda options: draw(st.sampled_from(options)),
                             ["linear", "linear", "relu", "identity", "identity", "add", "cat"], max_steps=9)
    return model, model.in_width


def needed_modules(gm: fx.GraphModule) -> set[str]:
    """Targets of the module calls the first output needs, computed independently of the engine."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    todo, seen = [output.args[0][0]], set()
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += node.all_input_nodes
    return {n.target for n in seen if n.op == "call_module"}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_dags(), st.integers(1, 3), st.integers(0, 1000))
def test_prune_and_collapse_keep_the_main_output(dag, batch, seed):
    model, in_width = dag
    model.eval()
    x = torch.randn(batch, in_width, generator=torch.Generator().manual_seed(seed))
    gm = fxrewrite.trace(model, x)
    code = gm.code
    result = fxrewrite.rewrite(gm, RULES)
    out = result.module

    # bitwise equal to the original's main output (and on another batch size)
    assert torch.equal(out(x), model(x)[0])
    x2 = torch.randn(batch + 2, in_width, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(out(x2), model(x2)[0])

    # nothing the output does not need, no identity left
    nodes = list(out.graph.nodes)
    output = nodes[-1]
    reachable, todo = set(), [output]
    while todo:
        node = todo.pop()
        if node not in reachable:
            reachable.add(node)
            todo += node.all_input_nodes
    assert all(n in reachable or n.op == "placeholder" for n in nodes)
    assert [n.op for n in nodes if n.op == "placeholder"] == ["placeholder"]
    assert not any(isinstance(out.get_submodule(n.target), nn.Identity) for n in nodes if n.op == "call_module")

    # exactly the needed tensors, each mapped once to itself, shared with the model
    needed = {t for t in needed_modules(gm) if not isinstance(model.get_submodule(t), nn.Identity)}
    expected = {name for t in needed for name, _ in named_tensors(model.get_submodule(t), t)}
    tensors = dict(named_tensors(out))
    assert set(tensors) == expected == set(result.param_map)
    assert all(origin == name for name, origin in result.param_map.items())
    assert len(set(result.param_map.values())) == len(result.param_map)
    originals = dict(named_tensors(model))
    assert all(tensors[name] is originals[name] for name in tensors)

    # statuses add up, and the input was not modified
    status = result.node_status
    assert set(status) == {n.name for n in gm.graph.nodes}
    assert {n.name for n in nodes} == {name for name, s in status.items() if s == "kept"}
    assert all(s in ("kept", "pruned", "collapsed") for s in status.values())
    assert gm.code == code


def test_the_generator_covers_the_interesting_cases():
    """A fixed example with every kind: the strategy's model class itself works as intended."""
    steps = [("linear", (0,), 3), ("identity", (1,), 3), ("add", (2, 1), 3), ("cat", (3, 0), 5),
             ("identity", (4,), 5), ("relu", (5,), 5), ("linear", (2,), 2), ("identity", (6,), 5)]
    model = StepModel(2, steps, (3, [("linear", 2), ("identity", 2)]), 0).eval()  # layers.6 is dead
    x = torch.randn(2, 2)
    gm = fxrewrite.trace(model, x)
    result = fxrewrite.rewrite(gm, RULES)
    assert [n.name for n in result.module.graph.nodes] == [
        "x", "layers_0", "add", "cat", "layers_5", "output"]
    assert result.nodes_with_status("pruned") == ["layers_6", "aux_0", "aux_1"]
    assert result.nodes_with_status("collapsed") == ["layers_1", "layers_4", "layers_7"]
    assert [n.target for n in result.module.graph.nodes if n.op == "call_function"] == [operator.add, torch.cat]
    assert result.param_map == {"layers.0.weight": "layers.0.weight", "layers.0.bias": "layers.0.bias"}
    assert torch.equal(result.module(x), model(x)[0])
