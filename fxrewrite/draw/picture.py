"""What a drawing shows, independent of Graphviz: the nodes and edges of one picture (a traced
graph, or one view of a rewrite) with their status, kind and shape. Owns the picture model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import fx

from ..context import EDGE_KEPT, KEPT, NEW, REPLACED
from ..naming import Rename, rename_path
from ..provenance import META_KEY
from .labels import Texts
from .style import RIGHT


@dataclass
class DrawnNode:
    name: str
    node: fx.Node  # the node given to a ``clusters`` callable
    op: str
    kind: str  # class, function or method name
    shape: str | None
    status: str | None
    tooltip: str
    renamed: tuple[str, str] | None = None  # (new name, old name) of a renamed module, in "after" pictures


@dataclass
class DrawnEdge:
    tail: str
    head: str
    status: str = EDGE_KEPT
    label: str | None = None


@dataclass
class Picture:
    nodes: list[DrawnNode] = field(default_factory=list)
    edges: list[DrawnEdge] = field(default_factory=list)
    module_classes: dict[str, str] = field(default_factory=dict)  # module path -> class, for cluster labels


def picture_of_graph(gm: fx.GraphModule, status: Mapping[str, str] | None, edge_shapes: bool,
                     shapes: bool) -> Picture:
    pic = Picture(module_classes=module_classes(gm))
    texts = Texts()
    for node in gm.graph.nodes:
        pic.nodes.append(DrawnNode(node.name, node, node.op, texts.kind(node, gm),
                                   texts.shape(node) if shapes else None,
                                   status.get(node.name, KEPT) if status is not None else None, texts.tooltip(node)))
        for tail in node.all_input_nodes:
            pic.edges.append(DrawnEdge(tail.name, node.name, label=texts.shape(tail) if edge_shapes else None))
    return pic


def picture_of_rewrite(result: Any, view: str, shapes: bool, edge_shapes: bool, texts: Texts | None = None,
                       rename: Rename | None = None) -> Picture:
    """The nodes and edges of ``view`` ("overlay", "before" or "after") of a rewrite, with their statuses.

    ``result`` is a :class:`~fxrewrite.result.RewriteResult`; with ``rename`` (module paths, see
    :func:`fxrewrite.naming.rename_path`), the "after" picture names renamed modules by both names.
    """
    texts = texts if texts is not None else Texts()
    before, after = result.original, result.module
    old = {n.name: n for n in before.graph.nodes}
    new = {n.name: n for n in after.graph.nodes}
    pic = Picture(module_classes={**module_classes(before), **module_classes(after)})

    def status_of(name: str) -> str:
        return result.node_status.get(name, NEW if name not in old else KEPT)

    if view == "after":
        names = list(new)
    elif view == "before":
        names = list(old)
    else:  # overlay: every original node, then the new ones; the union of the edges
        names = list(old) + [n for n in new if n not in old]
    for name in names:
        o, n = old.get(name), new.get(name)
        node = n if (view == "after" or o is None) else o
        status = status_of(name)
        kind = texts.kind(node, after if node is n else before)
        if status == REPLACED and o is not None and n is not None and view != "before":
            old_kind, new_kind = texts.kind(o, before), texts.kind(n, after)
            kind = new_kind if view == "after" or old_kind == new_kind else f"{old_kind} {RIGHT} {new_kind}"
        shape = None
        if shapes:
            shape = texts.shape(node)
            if view == "overlay" and o is not None and n is not None:
                old_shape, new_shape = texts.shape(o), texts.shape(n)
                if old_shape != new_shape and old_shape and new_shape:
                    shape = f"{old_shape} {RIGHT} {new_shape}"
        renamed = None
        if rename is not None and view == "after" and node.op in ("call_module", "get_attr"):
            new_name = rename_path(node.target, rename)
            renamed = (new_name, node.target) if new_name != node.target else None
        pic.nodes.append(DrawnNode(name, node, node.op, kind, shape, status, texts.tooltip(node, status), renamed))
    for (tail, head), edge_status in result.edges(view):
        label = None
        if edge_shapes:
            source = new.get(tail) if (view != "before" and tail in new) else old.get(tail)
            label = texts.shape(source) if source is not None else None
        pic.edges.append(DrawnEdge(tail, head, edge_status, label))
    return pic


def without_unused_inputs(pic: Picture) -> Picture:
    """Drop inputs nothing uses (``augment``/``profile`` flags of a forward signature): they only add noise."""
    used = {e.tail for e in pic.edges}
    pic.nodes = [n for n in pic.nodes if n.op != "placeholder" or n.name in used]
    return pic


def module_classes(gm: fx.GraphModule) -> dict[str, str]:
    """Module path -> class name for every module a node was traced inside (from ``nn_module_stack``)."""
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            found.setdefault(path, cls.__name__ if isinstance(cls, type) else str(cls).rpartition(".")[2])
        prov = node.meta.get(META_KEY)
        if prov is not None and prov.module:
            found.setdefault(prov.module, prov.module_class)
    return found


def status_counts(pic: Picture) -> dict[str, int]:
    """How many nodes of the picture have each status."""
    counts: dict[str, int] = {}
    for n in pic.nodes:
        counts[n.status or KEPT] = counts.get(n.status or KEPT, 0) + 1
    return counts


__all__ = ["DrawnNode", "DrawnEdge", "Picture", "picture_of_graph", "picture_of_rewrite", "without_unused_inputs",
           "module_classes", "status_counts"]
