"""Which box (Graphviz cluster) each drawn node goes in: by module path (automatic), or by a
caller's mapping or function; and the nesting of the boxes. Owns the grouping of a drawing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

from torch import fx

from ..provenance import META_KEY
from .picture import DrawnNode

# A cluster label: one name, or a tuple of names for nested boxes (outermost first).
ClusterLabel = Union[str, Sequence[str], None]
Clusters = Union[None, bool, int, Mapping[str, ClusterLabel], Callable[[fx.Node], ClusterLabel]]


def _module_path(node: fx.Node) -> str:
    prov = node.meta.get(META_KEY)
    if prov is not None:
        return prov.module
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return node.target if node.op == "call_module" else ""


def _prefix(path: str, depth: int) -> str | None:
    parts = path.split(".") if path else []
    return ".".join(parts[:depth]) if len(parts) >= depth else None


def _group_path(n: DrawnNode) -> str:
    """The module path a node is grouped by: its module's path, or for a module call the path of
    the module's parent (a box named after a module holds what runs inside it, not the call itself)."""
    path = _module_path(n.node)
    if n.op == "call_module" and path == n.node.target:
        return path.rpartition(".")[0]
    return path


def _auto_depth(nodes: Sequence[DrawnNode]) -> int | None:
    """The shallowest module-path depth that splits the graph into several groups, one of them
    holding more than one node; ``None`` when no depth does (a layer-level graph: no boxes)."""
    paths = [_group_path(n) for n in nodes if n.op not in ("placeholder", "output")]
    deepest = max((p.count(".") + 1 for p in paths if p), default=0)
    for depth in range(1, deepest + 1):
        groups: dict[str, int] = {}
        for p in paths:
            key = _prefix(p, depth)
            if key is not None:
                groups[key] = groups.get(key, 0) + 1
        if len(groups) >= 2 and max(groups.values()) >= 2:
            return depth
        if groups and max(groups.values()) < 2:
            return None
    return None


def cluster_paths(nodes: Sequence[DrawnNode], clusters: Clusters) -> dict[str, tuple[str, ...]]:
    """Node name -> its cluster path (outermost first; empty: not in a cluster)."""
    if clusters is False:
        return {}
    result: dict[str, tuple[str, ...]] = {}
    if clusters is None or clusters is True or isinstance(clusters, int):
        if clusters is None or clusters is True:
            depth = _auto_depth(nodes)
            levels = [depth] if depth else []
        else:
            levels = list(range(1, clusters + 1))
        for n in nodes:
            if n.op in ("placeholder", "output"):
                continue
            path = _group_path(n)
            keys = tuple(k for k in (_prefix(path, d) for d in levels) if k is not None)
            if keys:
                result[n.name] = keys
        return result
    for n in nodes:
        label = clusters.get(n.name) if isinstance(clusters, Mapping) else clusters(n.node)
        if label is None or label == "" or label == ():
            continue
        result[n.name] = (str(label),) if isinstance(label, str) else tuple(str(x) for x in label)
    return result


@dataclass
class Box:
    key: tuple[str, ...]
    nodes: list[str] = field(default_factory=list)
    boxes: dict[tuple[str, ...], "Box"] = field(default_factory=dict)

    def size(self) -> int:
        return len(self.nodes) + len(self.boxes)


def cluster_tree(order: Sequence[str], paths: Mapping[str, tuple[str, ...]], automatic: bool,
                 io: set[str]) -> Box:
    """Nest nodes into boxes. Boxes made from module paths (``automatic``) are simplified: a box
    holding a single member is dropped, and so is one box holding everything but the inputs
    and outputs. A caller's boxes are drawn as given."""
    root = Box(())
    for name in order:
        box = root
        for i in range(len(paths.get(name, ()))):
            key = paths[name][:i + 1]
            box = box.boxes.setdefault(key, Box(key))
        box.nodes.append(name)
    if not automatic:
        return root

    def simplify(box: Box) -> None:
        for key, child in list(box.boxes.items()):
            simplify(child)
            if child.size() <= 1:  # a box around one thing says nothing: lift its content
                del box.boxes[key]
                box.nodes += child.nodes
                box.boxes.update(child.boxes)

    simplify(root)
    while len(root.boxes) == 1 and set(root.nodes) <= io:  # one frame around everything
        (only,) = root.boxes.values()
        root = Box((), root.nodes + only.nodes, only.boxes)
    return root


__all__ = ["ClusterLabel", "Clusters", "cluster_paths", "Box", "cluster_tree"]
