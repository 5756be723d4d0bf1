"""The engine on plain GraphModules (no trace metadata), its graph copy, and the module it returns."""
from __future__ import annotations

import copy
import gc
import io
import operator
import pickle

import torch
from torch import fx, nn

import fxrewrite
from fxrewrite import Pattern, Rule
from fxrewrite.engine import copy_graph

from helpers.toy_models import TwoBranch, example, seeded


def identity(x):
    return x


def plain_graph() -> fx.GraphModule:
    """x -> relu -> identity -> add(., x) -> neg -> output, plus a dead branch (sigmoid -> mul)."""
    g = fx.Graph()
    x = g.placeholder("x")
    r = g.call_function(torch.relu, (x,))
    i = g.call_function(identity, (r,))
    a = g.call_function(operator.add, (i, x))
    dead = g.call_function(torch.sigmoid, (r,))
    g.call_function(operator.mul, (dead, 2.0))
    n = g.call_method("neg", (a,))
    g.output(n)
    return fx.GraphModule(nn.Module(), g)


RULES = [Rule("prune", "prune_unreachable"),
         Rule("no-identity", "collapse", Pattern(function="identity"), mode="fixed_point")]


def test_rewrite_of_a_plain_graph_module():
    gm = plain_graph()
    code = gm.code
    result = fxrewrite.rewrite(gm, RULES)
    assert [n.name for n in result.module.graph.nodes] == ["x", "relu", "add", "neg", "output"]
    assert result.node_status == {"x": "kept", "relu": "kept", "identity": "collapsed", "add": "kept",
                                  "sigmoid": "pruned", "mul": "pruned", "neg": "kept", "output": "kept"}
    assert result.param_map == {}
    assert all("provenance" not in n.meta for n in result.module.graph.nodes)
    assert "fxrewrite.trace" not in result.module.meta
    x = torch.randn(5)
    assert torch.equal(result.module(x), gm(x))
    assert gm.code == code


def test_function_patterns_match_qualified_and_short_names():
    gm = plain_graph()
    for glob in ["identity", "*.identity", "test_engine_plain.identity", "iden*"]:
        result = fxrewrite.rewrite(gm, [Rule("c", "collapse", Pattern(function=glob))])
        assert result.nodes_with_status("collapsed") == ["identity"], glob
    for glob, name in [("operator.add", "add"), ("add", "add"), ("torch.relu", "relu"), ("*sigmoid", "sigmoid")]:
        assert [m.root.name for m in Pattern(function=glob).find(gm)] == [name], glob
    assert [m.root.name for m in Pattern(method="neg").find(gm)] == ["neg"]
    assert Pattern(function="neg").find(gm) == []


class WithAttrs(nn.Module):
    """Uses a root parameter and a buffer directly (get_attr nodes), one of them only in a dead branch."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((3,), 2.0))
        self.register_buffer("shift", torch.arange(3.0))
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) * self.scale, x + self.shift


def test_get_attr_tensors_are_mapped_and_pruned():
    model = seeded(WithAttrs())
    x = example(2, 3)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), [Rule("main", "prune_unreachable", args={"outputs": [0]})])
    assert result.param_map == {"lin.weight": "lin.weight", "lin.bias": "lin.bias", "scale": "scale"}
    assert result.module.get_parameter("scale") is model.scale
    assert not hasattr(result.module, "shift")
    assert result.node_status["shift"] == "pruned"
    assert torch.equal(result.module(x), model(x)[0])


def test_copy_graph_is_an_exact_copy():
    gm = fxrewrite.trace(seeded(TwoBranch()), example(2, 3, 8, 8))
    before = str(gm.graph)
    new, val_map = copy_graph(gm.graph)
    assert str(new) == before == str(gm.graph)
    old_nodes, new_nodes = list(gm.graph.nodes), list(new.nodes)
    assert [val_map[n] for n in old_nodes] == new_nodes
    for old, copied in zip(old_nodes, new_nodes):
        assert (copied.name, copied.op, copied.target, copied.type) == (old.name, old.op, old.target, old.type)
        assert copied.graph is new and copied is not old
        assert fx.node.map_arg(copied.args, lambda n: n.name) == fx.node.map_arg(old.args, lambda n: n.name)
        assert copied.kwargs == fx.node.map_arg(old.kwargs, lambda n: val_map[n])
        assert copied.meta == old.meta and copied.meta is not old.meta
        assert [u.name for u in copied.users] == [u.name for u in old.users]
    new.lint()
    # the reference: fx's own copy
    reference = fx.Graph()
    value = reference.graph_copy(gm.graph, {})
    reference.output(value)
    assert str(reference) == str(new)
    # editing the copy leaves the original alone
    new.erase_node(new_nodes[-1])
    assert str(gm.graph) == before


def test_copy_graph_restores_the_garbage_collector():
    gm = plain_graph()
    assert gc.isenabled()
    copy_graph(gm.graph)
    assert gc.isenabled()
    gc.disable()
    try:
        copy_graph(gm.graph)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_result_module_is_a_normal_graph_module():
    model = seeded(TwoBranch())
    x = example(2, 3, 8, 8)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), [Rule("main", "prune_unreachable", args={"outputs": [0]})])
    module = result.module
    assert isinstance(module, fx.GraphModule)
    assert type(module).__name__ == "TwoBranch"
    assert "aux" not in module.code and "main_head_fc" in module.code
    assert "TwoBranch(" in str(module)
    expected = model(x)[0]
    assert torch.equal(module(x), expected)
    assert torch.equal(copy.deepcopy(module)(x), expected)
    assert torch.equal(pickle.loads(pickle.dumps(module))(x), expected)
    again = fx.symbolic_trace(module)
    assert torch.equal(again(x), expected)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), expected)


def test_a_traced_module_can_be_pickled():
    model = seeded(TwoBranch())
    x = example(2, 3, 8, 8)
    restored = pickle.loads(pickle.dumps(fxrewrite.trace(model, x)))
    assert all(torch.equal(a, b) for a, b in zip(restored(x), model(x)))
