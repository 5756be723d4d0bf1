"""Graphs and rewrites as networkx graphs, for analysis with the library users know.

Owns :func:`to_networkx`. networkx is imported when it is called (about 0.3 s), not
when fxrewrite is.

>>> import torch, fxrewrite
>>> from fxrewrite.examples import DEMO_RULES, aux_branch_model
>>> gm = fxrewrite.trace(aux_branch_model(), torch.zeros(1, 3, 32, 32))
>>> g = fxrewrite.to_networkx(gm)
>>> g.nodes["main_0_conv"]["module_class"], g.nodes["main_0_conv"]["shape"]
('Conv2d', (1, 32, 8, 8))
>>> import networkx as nx
>>> len(nx.dag_longest_path(g))
14
>>> diff = fxrewrite.to_networkx(fxrewrite.rewrite(gm, fxrewrite.load_rules(DEMO_RULES)))
>>> diff.nodes["aux_head_fc"]["status"], diff.edges["main_0_act", "main_1"]["status"]
('pruned', 'dropped')
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from torch import fx

from .naming import function_names
from .provenance import META_KEY
from .shapes import shape_tree

if TYPE_CHECKING:  # pragma: no cover
    import networkx


def to_networkx(graph: Any, *, status: Mapping[str, str] | None = None) -> "networkx.DiGraph":
    """A :class:`networkx.DiGraph` of a traced module or of a rewrite.

    ``graph`` is a :class:`torch.fx.GraphModule` (or :class:`torch.fx.Graph`) or a
    :class:`~fxrewrite.result.RewriteResult`. Nodes are the fx node names, in graph order,
    with the attributes ``op``, ``target`` (text), ``module`` (the qualified name of the module
    the node belongs to, from its provenance), ``module_class``, ``shape`` (the recorded output
    shape, nested tuples; None when unknown) and, for a rewrite or with ``status`` (node name ->
    status), ``status`` (``kept``, ``pruned``, ``collapsed``, ``replaced``, ``removed``, ``new``).
    An edge ``u -> v`` means ``v`` reads ``u``; ``uses`` counts how often. A rewrite gives the
    overlay: every node of the original, then the new ones; edges carry ``status`` (``kept``,
    ``dropped``, ``added``).
    """
    import networkx as nx

    g = nx.DiGraph()
    if hasattr(graph, "node_status") and hasattr(graph, "original"):  # a RewriteResult
        old = {n.name: n for n in graph.original.graph.nodes}
        new = {n.name: n for n in graph.module.graph.nodes}
        modules = {**dict(graph.original.named_modules()), **dict(graph.module.named_modules())}
        for name in list(old) + [n for n in new if n not in old]:
            node = new.get(name, old.get(name))
            g.add_node(name, **_attributes(node, modules), status=graph.node_status.get(name, "new"))
        uses = _uses(list(graph.original.graph.nodes) + list(graph.module.graph.nodes))
        for (tail, head), edge_status in graph.edges("overlay"):
            g.add_edge(tail, head, uses=uses[tail, head], status=edge_status)
        return g
    fx_graph = graph.graph if isinstance(graph, fx.GraphModule) else graph
    modules = dict(graph.named_modules()) if isinstance(graph, fx.GraphModule) else {}
    for node in fx_graph.nodes:
        attrs = _attributes(node, modules)
        if status is not None:
            attrs["status"] = status.get(node.name, "kept")
        g.add_node(node.name, **attrs)
    for (tail, head), count in _uses(fx_graph.nodes).items():
        g.add_edge(tail, head, uses=count)
    return g


def _uses(nodes) -> dict[tuple[str, str], int]:
    """(tail, head) -> how many times ``head`` reads ``tail`` (the largest count where a node appears twice)."""
    found: dict[tuple[str, str], int] = {}
    for node in nodes:
        counts: dict[tuple[str, str], int] = {}
        fx.node.map_arg((node.args, node.kwargs), lambda n: counts.__setitem__((n.name, node.name),
                                                                           counts.get((n.name, node.name), 0) + 1))
        for edge, count in counts.items():
            found[edge] = max(found.get(edge, 0), count)
    return found


def _attributes(node: fx.Node, modules: Mapping[str, Any]) -> dict[str, Any]:
    prov = node.meta.get(META_KEY)
    module_class = None
    if node.op == "call_module" and node.target in modules:
        module_class = type(modules[node.target]).__name__
    elif prov is not None:
        module_class = prov.module_class
    if node.op == "call_function":
        target = function_names(node.target)[0]
    else:
        target = str(node.target)
    return {"op": node.op, "target": target,
            "module": prov.module if prov is not None else (node.target if node.op == "call_module" else ""),
            "module_class": module_class, "shape": shape_tree(node)}


__all__ = ["to_networkx"]
