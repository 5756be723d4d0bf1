"""fxrewrite.to_networkx: graphs and rewrites as networkx graphs; networkx as the oracle for structure.

The structural comparisons use networkx's isomorphism (an independent implementation): the graph a
rewrite returns has the shape of the graph of a model written without what the rules removed.
"""
from __future__ import annotations

import networkx as nx
import torch
from torch import nn

import fxrewrite
from fxrewrite.examples import DEMO_RULES, aux_branch_model

X = torch.zeros(1, 3, 32, 32)


def same_kind(a: dict, b: dict) -> bool:
    """Nodes that compute the same thing: same op, output shape and (but for inputs and outputs, which
    belong to the root module) module class."""
    return a["op"] == b["op"] and a["shape"] == b["shape"] and (
        a["op"] in ("placeholder", "output") or a["module_class"] == b["module_class"])


def test_node_attributes_of_a_trace():
    gm = fxrewrite.trace(aux_branch_model(), X)
    g = fxrewrite.to_networkx(gm)
    assert list(g.nodes) == [n.name for n in gm.graph.nodes]
    assert g.nodes["main_0_conv"] == {"op": "call_module", "target": "main.0.conv", "module": "main.0.conv",
                                      "module_class": "Conv2d", "shape": (1, 32, 8, 8)}
    assert g.nodes["mean"] == {"op": "call_method", "target": "mean", "module": "main_head", "module_class": "Head",
                               "shape": (1, 32)}
    assert g.nodes["output"]["shape"] == ((1, 10), (1, 10))
    assert g.edges["stem_act", "main_0_conv"] == {"uses": 1}
    assert g.number_of_edges() == sum(len(n.all_input_nodes) for n in gm.graph.nodes)
    assert nx.is_directed_acyclic_graph(g)


def test_a_value_read_twice_is_one_edge_used_twice():
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    g = fxrewrite.to_networkx(fxrewrite.trace(Square()))
    assert g.edges["x", "mul"] == {"uses": 2}
    assert fxrewrite.to_networkx(fxrewrite.trace(Square()).graph).edges["x", "mul"] == {"uses": 2}


def test_a_rewrite_is_the_overlay_with_statuses():
    gm = fxrewrite.trace(aux_branch_model(), X)
    result = fxrewrite.rewrite(gm, fxrewrite.load_rules(DEMO_RULES))
    g = fxrewrite.to_networkx(result)
    assert {name: data["status"] for name, data in g.nodes(data=True)} == result.node_status
    assert g.edges["main_0_act", "main_1"]["status"] == "dropped"
    assert g.edges["main_0_act", "main_2_conv"]["status"] == "added"
    assert g.edges["stem_conv", "stem_bn"]["status"] == "kept"
    kept = g.subgraph(n for n, s in g.nodes(data="status") if s in ("kept", "new"))
    assert sorted(kept.nodes) == sorted(n.name for n in result.module.graph.nodes)


def test_status_of_a_plain_graph():
    gm = fxrewrite.trace(aux_branch_model(), X)
    g = fxrewrite.to_networkx(gm, status={"main_1": "collapsed"})
    assert g.nodes["main_1"]["status"] == "collapsed" and g.nodes["stem_conv"]["status"] == "kept"


def test_the_rewritten_graph_has_the_structure_of_the_model_without_its_auxiliary_branch():
    """An independent oracle: the same network written by hand without the auxiliary branch and the
    identity, traced; networkx finds the two graphs isomorphic, node kinds and classes matching."""
    model = aux_branch_model()
    result = fxrewrite.rewrite(fxrewrite.trace(model, X), fxrewrite.load_rules(DEMO_RULES))

    class MainOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.main, self.main_head = model.stem, nn.Sequential(model.main[0], model.main[2]), \
                model.main_head

        def forward(self, x):
            return self.main_head(self.main(self.stem(x)))

    ours, reference = fxrewrite.to_networkx(result.module), fxrewrite.to_networkx(fxrewrite.trace(MainOnly(), X))
    assert nx.is_isomorphic(ours, reference, node_match=same_kind)
    # and not to the original: the rewrite changed the structure
    assert not nx.is_isomorphic(fxrewrite.to_networkx(result.original), reference, node_match=same_kind)


def test_rebinding_keeps_the_structure():
    result = fxrewrite.rewrite(fxrewrite.trace(aux_branch_model(), X), fxrewrite.load_rules(DEMO_RULES))
    rebound = fxrewrite.rebind(result, {"main": "body"})
    same = nx.utils.graphs_equal(fxrewrite.to_networkx(rebound.module), fxrewrite.to_networkx(result.module))
    assert not same  # targets were renamed...
    assert nx.is_isomorphic(fxrewrite.to_networkx(rebound.module), fxrewrite.to_networkx(result.module),
                            node_match=same_kind)  # ...the structure was not
