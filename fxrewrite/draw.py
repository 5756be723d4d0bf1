"""Drawings of traced graphs and of rewrites: before, after, and the difference marked.

:func:`draw_rewrite` draws a :class:`~fxrewrite.engine.RewriteResult`:

* ``view="overlay"`` (the default): the original graph with every node coloured by
  what the rewrite did to it, plus the nodes and edges the rewrite created;
  edges the rewrite dropped are dashed, edges it added are drawn bold;
* ``"before"`` / ``"after"``: the original / rewritten graph alone;
* ``"side_by_side"``: both, next to each other.

:func:`draw_graph` draws any :class:`torch.fx.GraphModule` (for instance a plain
:func:`fxrewrite.trace` result). Both return a :class:`Drawing`: its
:attr:`~Drawing.source` is the DOT text, :meth:`~Drawing.save` writes ``.svg``,
``.png``, ``.pdf`` or ``.dot`` by suffix (atomically), and it displays inline in
Jupyter. Rendering needs Graphviz's ``dot`` program; without it
:class:`~fxrewrite.errors.GraphvizMissing` says how to install it, and the DOT
source is still written.

Every node shows its name, its module class (or function / method name) and,
where shapes were propagated, its output shape. The graph is drawn at the
granularity it was traced at (one node per layer for a model traced with
``max_depth``); nodes can be grouped into boxes (Graphviz clusters) by module
path or by a caller's mapping (``clusters=``). Colours come from the Okabe-Ito
palette, which stays distinguishable for colour-blind readers; every status also
has its own border style and is written in the node, so nothing depends on
colour alone.

Large graphs: an op-level trace of a big model (YOLOv9-e: 1,400 nodes) renders in
seconds (dot gets an iteration limit above :data:`LARGE_GRAPH_NODES` nodes), but
a bitmap that big exceeds cairo's 32,767-pixel limit and is scaled down: prefer
SVG for those, or draw the layer-level trace (``fxrewrite.trace(..., max_depth=...)``).

>>> import torch, fxrewrite
>>> from fxrewrite.examples import DEMO_RULES, aux_branch_model
>>> gm = fxrewrite.trace(aux_branch_model(), torch.zeros(1, 3, 32, 32))
>>> result = fxrewrite.rewrite(gm, fxrewrite.load_rules(DEMO_RULES))
>>> drawing = draw_rewrite(result, title="demo")
>>> 'aux_0_conv' in drawing.source and STATUS_STYLES["pruned"].fill in drawing.source
True
>>> sorted(drawing.nodes_with_status("collapsed"))
['main_1']
"""
from __future__ import annotations

import html
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import graphviz
import networkx as nx
from torch import fx

from .engine import COLLAPSED, KEPT, NEW, PRUNED, REMOVED, REPLACED, RewriteResult
from .io import atomic_write
from .errors import DrawError, GraphvizMissing
from .provenance import META_KEY
from .shapes import shape_tree
from .tensors import named_tensors

VIEWS = ("overlay", "before", "after", "side_by_side")
_VIEW_ALIASES = {"diff": "overlay", "side-by-side": "side_by_side", "sidebyside": "side_by_side"}

# A cluster label: one name, or a tuple of names for nested boxes (outermost first).
ClusterLabel = Union[str, Sequence[str], None]
Clusters = Union[None, bool, int, Mapping[str, ClusterLabel], Callable[[fx.Node], ClusterLabel]]

INSTALL_HINT = (
    "Install Graphviz (the pip package 'graphviz' only calls it): "
    "Debian/Ubuntu: `sudo apt-get install graphviz`; Fedora: `sudo dnf install graphviz`; "
    "macOS: `brew install graphviz`; conda: `conda install -c conda-forge graphviz`; "
    "Windows: `winget install graphviz` (or https://graphviz.org/download/), then add its bin folder to PATH. "
    "Check with `dot -V`."
)

FONT = "Helvetica,Arial,sans-serif"
ARROW_FONT = "DejaVu Sans"
TEXT = "#1A1A1A"
MUTED = "#5F5F5F"


@dataclass(frozen=True)
class StatusStyle:
    """How nodes of one status are drawn: a tint of an Okabe-Ito hue as fill, a darker hue as border.

    The tints were chosen so that every pair of fills stays apart (CIELAB distance
    above 10) for normal vision and simulated deuteranopia, protanopia and
    tritanopia (Machado et al. 2009), with dark text still legible on each.
    """

    label: str
    fill: str
    border: str
    border_style: str = ""  # "", "dashed", "dotted"
    penwidth: float = 1.0
    tag: str = ""  # written in the node, so the status does not depend on colour alone
    description: str = ""


STATUS_STYLES: dict[str, StatusStyle] = {
    KEPT: StatusStyle("kept", "#FFFFFF", "#4D4D4D", description="unchanged"),
    PRUNED: StatusStyle("pruned", "#ECB78C", "#D55E00", "dashed", 1.6, "pruned",
                        "not needed by the kept outputs"),
    COLLAPSED: StatusStyle("collapsed", "#BBE1F6", "#0072B2", "dotted", 2.0, "collapsed",
                           "pass-through, bypassed"),
    REPLACED: StatusStyle("replaced", "#E0AFCA", "#A2487A", "", 2.6, "replaced",
                          "module swapped for another class"),
    REMOVED: StatusStyle("removed", "#DEDEDE", "#6E6E6E", "dashed", 1.6, "removed",
                         "deleted by a rule"),
    NEW: StatusStyle("new", "#59C0A4", "#007A5A", "", 2.6, "NEW", "created by a rule"),
}
LEGEND_ORDER = (KEPT, PRUNED, COLLAPSED, REPLACED, REMOVED, NEW)

EDGE_KEPT, EDGE_DROPPED, EDGE_ADDED = "kept", "dropped", "added"
EDGE_STYLES = {
    EDGE_KEPT: {"color": "#4D4D4D", "penwidth": "1.1"},
    EDGE_DROPPED: {"color": "#9A9A9A", "style": "dashed", "penwidth": "1.1", "arrowhead": "empty"},
    EDGE_ADDED: {"color": "#007A5A", "penwidth": "2.6"},
}
CLUSTER_FILLS = ("#F4F4F4", "#E9E9E9")
# Above this many drawn nodes, dot's x-positioning (network simplex) gets an iteration limit:
# 5x faster on an op-level YOLOv9-e (1,400 nodes), and the layout stays as readable.
LARGE_GRAPH_NODES = 300
LEFT = "\u2190"


# --------------------------------------------------------------------------------------------------
# The drawing object
# --------------------------------------------------------------------------------------------------
class Drawing:
    """A rendered-on-demand Graphviz drawing: DOT source, SVG/PNG files, inline display in Jupyter.

    ``graph`` is the underlying :class:`graphviz.Digraph` (change its attributes freely
    before saving). ``statuses`` maps every drawn node id to its status (``None`` for
    plain drawings); ``clusters`` maps every drawn node id to its cluster path.
    """

    def __init__(self, graph: graphviz.Digraph, statuses: Mapping[str, str | None] | None = None,
                 clusters: Mapping[str, tuple[str, ...]] | None = None):
        self.graph = graph
        self.statuses = dict(statuses or {})
        self.clusters = dict(clusters or {})

    @property
    def source(self) -> str:
        """The DOT text."""
        return self.graph.source

    def nodes_with_status(self, status: str) -> list[str]:
        return [node_id for node_id, s in self.statuses.items() if s == status]

    def pipe(self, format: str = "svg") -> bytes:
        """Render with ``dot`` and return the bytes; :class:`GraphvizMissing` when ``dot`` is not installed."""
        try:
            return self.graph.pipe(format=format, quiet=True)
        except graphviz.ExecutableNotFound:
            raise GraphvizMissing(f"cannot render the drawing as {format}: Graphviz's `dot` program was not found "
                                  f"on PATH. {INSTALL_HINT}") from None
        except graphviz.CalledProcessError as exc:
            detail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
            raise DrawError(f"Graphviz failed to render the drawing as {format}: "
                            f"{' '.join(detail[-3:]) or exc}") from None

    def svg(self) -> str:
        return self.pipe("svg").decode("utf-8")

    def png(self) -> bytes:
        return self.pipe("png")

    def save(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Write the drawing to ``path``; the format comes from the suffix (``.svg``, ``.png``,
        ``.pdf``, ``.dot``/``.gv`` for the DOT source) unless ``format`` is given.

        The file is written atomically (a temporary file in the same folder, then
        renamed), so a failure never leaves a partial file. When ``dot`` is missing the
        DOT source is written next to ``path`` (same name, ``.dot``) and
        :class:`GraphvizMissing` is raised, naming that file.
        """
        path = Path(path)
        fmt = (format or path.suffix.lstrip(".")).lower()
        if fmt in ("dot", "gv"):
            _write_atomic(path, self.source.encode("utf-8"))
            return path
        if fmt not in graphviz.FORMATS:
            raise DrawError(f"cannot save a drawing as {path.name!r}: unknown format {fmt or '(no suffix)'!r}; "
                            f"use .svg, .png, .pdf, or .dot for the DOT source")
        try:
            data = self.pipe(fmt)
        except GraphvizMissing as exc:
            dot_path = path.with_suffix(".dot")
            _write_atomic(dot_path, self.source.encode("utf-8"))
            raise GraphvizMissing(f"cannot write {path}: Graphviz's `dot` program was not found on PATH; "
                                  f"the DOT source was written to {dot_path} instead (render it later with "
                                  f"`dot -T{fmt} {dot_path} -o {path}`). {INSTALL_HINT}", dot_path) from exc
        _write_atomic(path, data)
        return path

    # -- Jupyter -------------------------------------------------------------------------------------
    def _repr_mimebundle_(self, include=None, exclude=None):
        try:
            bundle = {"image/svg+xml": self.svg()}
        except (GraphvizMissing, DrawError) as exc:
            bundle = {"text/plain": f"{exc}\n\n(DOT source: Drawing.source)"}
        if include:
            bundle = {k: v for k, v in bundle.items() if k in include}
        if exclude:
            bundle = {k: v for k, v in bundle.items() if k not in exclude}
        return bundle

    def _repr_svg_(self):
        try:
            return self.svg()
        except (GraphvizMissing, DrawError):
            return None  # Jupyter then falls back to the text representation

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for status in self.statuses.values():
            counts[status or "node"] = counts.get(status or "node", 0) + 1
        what = ", ".join(f"{n} {s}" for s, n in counts.items())
        return f"<Drawing {self.graph.name!r}: {what}>"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, force=True) as handle:
        handle.write(data)


# --------------------------------------------------------------------------------------------------
# What is drawn: nodes and edges of one picture, independent of Graphviz
# --------------------------------------------------------------------------------------------------
@dataclass
class _Node:
    name: str
    node: fx.Node  # the node given to a ``clusters`` callable
    op: str
    kind: str  # class, function or method name
    shape: str | None
    status: str | None
    tooltip: str


@dataclass
class _Edge:
    tail: str
    head: str
    status: str = EDGE_KEPT
    label: str | None = None


@dataclass
class _Picture:
    nodes: list[_Node] = field(default_factory=list)
    edges: list[_Edge] = field(default_factory=list)
    module_classes: dict[str, str] = field(default_factory=dict)  # module path -> class, for cluster labels


def _picture_of_graph(gm: fx.GraphModule, status: Mapping[str, str] | None, edge_shapes: bool,
                      shapes: bool) -> _Picture:
    pic = _Picture(module_classes=_module_classes(gm))
    for node in gm.graph.nodes:
        pic.nodes.append(_Node(node.name, node, node.op, _kind(node, gm), _shape_text(node) if shapes else None,
                               status.get(node.name, KEPT) if status is not None else None,
                               _tooltip(node)))
        for tail in node.all_input_nodes:
            pic.edges.append(_Edge(tail.name, node.name, label=_shape_text(tail) if edge_shapes else None))
    return pic


def _picture_of_rewrite(result: RewriteResult, view: str, shapes: bool, edge_shapes: bool) -> _Picture:
    """The nodes and edges of ``view`` ("overlay", "before" or "after") with their statuses."""
    before, after = result.original, result.module
    old = {n.name: n for n in before.graph.nodes}
    new = {n.name: n for n in after.graph.nodes}
    old_edges = [(t.name, n.name) for n in before.graph.nodes for t in n.all_input_nodes]
    new_edges = [(t.name, n.name) for n in after.graph.nodes for t in n.all_input_nodes]
    old_set, new_set = set(old_edges), set(new_edges)
    pic = _Picture(module_classes={**_module_classes(before), **_module_classes(after)})

    def status_of(name: str) -> str:
        return result.node_status.get(name, NEW if name not in old else KEPT)

    if view == "after":
        names = list(new)
        edges = [(e, EDGE_KEPT if e in old_set else EDGE_ADDED) for e in new_edges]
    elif view == "before":
        names = list(old)
        edges = [(e, EDGE_KEPT if e in new_set else EDGE_DROPPED) for e in old_edges]
    else:  # overlay: every original node, then the new ones; the union of the edges
        names = list(old) + [n for n in new if n not in old]
        edges = [(e, EDGE_KEPT if e in new_set else EDGE_DROPPED) for e in old_edges]
        edges += [(e, EDGE_ADDED) for e in new_edges if e not in old_set]

    for name in names:
        o, n = old.get(name), new.get(name)
        node = n if (view == "after" or o is None) else o
        status = status_of(name)
        kind = _kind(node, after if node is n else before)
        if status == REPLACED and o is not None and n is not None and view != "before":
            old_kind, new_kind = _kind(o, before), _kind(n, after)
            kind = new_kind if view == "after" or old_kind == new_kind else f"{old_kind} \u2192 {new_kind}"
        shape = None
        if shapes:
            shape = _shape_text(node)
            if view == "overlay" and o is not None and n is not None:
                old_shape, new_shape = _shape_text(o), _shape_text(n)
                if old_shape != new_shape and old_shape and new_shape:
                    shape = f"{old_shape} \u2192 {new_shape}"
        pic.nodes.append(_Node(name, node, node.op, kind, shape, status, _tooltip(node, status)))
    for (tail, head), edge_status in edges:
        label = None
        if edge_shapes:
            source = new.get(tail) if (view != "before" and tail in new) else old.get(tail)
            label = _shape_text(source) if source is not None else None
        pic.edges.append(_Edge(tail, head, edge_status, label))
    return pic


def _without_unused_inputs(pic: _Picture) -> _Picture:
    """Drop inputs nothing uses (``augment``/``profile`` flags of a forward signature): they only add noise."""
    used = {e.tail for e in pic.edges}
    pic.nodes = [n for n in pic.nodes if n.op != "placeholder" or n.name in used]
    return pic


def _module_classes(gm: fx.GraphModule) -> dict[str, str]:
    """Module path -> class name for every module a node was traced inside (from ``nn_module_stack``)."""
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            found.setdefault(path, cls.__name__ if isinstance(cls, type) else str(cls).rpartition(".")[2])
        prov = node.meta.get(META_KEY)
        if prov is not None and prov.module:
            found.setdefault(prov.module, prov.module_class)
    return found


def _kind(node: fx.Node, gm: fx.GraphModule | None) -> str:
    """What the node computes: module class, function or method name."""
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(node.target)).__name__
        except (AttributeError, TypeError):
            prov = node.meta.get(META_KEY)
            return prov.module_class if prov is not None else str(node.target)
    if node.op == "call_function":
        if node.target is operator.getitem and len(node.args) > 1 and isinstance(node.args[1], (int, str)):
            return f"getitem [{node.args[1]!r}]"
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return f"attribute {node.target}"
    return "output"


def format_shape(tree: Any, limit: int = 3) -> str | None:
    """A compact text for a shape tree: ``1×16×8×8``; ``[1×10, 1×10]`` for several tensors."""
    if tree is None:
        return None
    if isinstance(tree, tuple) and all(isinstance(d, int) for d in tree):
        return "\u00d7".join(str(d) for d in tree) if tree else "scalar"
    if isinstance(tree, (tuple, list)):
        parts = [format_shape(t, limit) or "?" for t in tree[:limit]]
        more = f", +{len(tree) - limit}" if len(tree) > limit else ""
        return f"[{', '.join(parts)}{more}]"
    if isinstance(tree, dict):
        items = list(tree.items())
        parts = [f"{k}: {format_shape(v, limit) or '?'}" for k, v in items[:limit]]
        more = f", +{len(items) - limit}" if len(items) > limit else ""
        return "{" + ", ".join(parts) + more + "}"
    return None


def _shape_text(node: fx.Node, max_chars: int | None = 44) -> str | None:
    """The node's output shape as text, cut to ``max_chars`` (the tooltip has it whole)."""
    tree = shape_tree(node)
    if tree is None or (isinstance(tree, (tuple, list)) and tree and all(t is None for t in tree)):
        return None
    text = format_shape(tree)
    if text and max_chars and len(text) > max_chars:
        text = text[:max_chars - 1].rstrip(", ") + "\u2026"
    return text


def _tooltip(node: fx.Node, status: str | None = None) -> str:
    prov = node.meta.get(META_KEY)
    lines = [f"{node.name} ({node.op})"]
    if node.op in ("call_module", "get_attr"):
        lines.append(f"target: {node.target}")
    if prov is not None:
        lines.append(f"module: {prov.module or '(root)'} [{prov.module_class}]")
        if prov.origins and prov.origins != (node.name,):
            lines.append("from: " + ", ".join(prov.origins))
        if prov.rules:
            lines.append("rules: " + ", ".join(prov.rules))
    shape = _shape_text(node, None)
    if shape:
        lines.append(f"output: {shape}")
    if status is not None:
        lines.append(f"status: {status}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Clusters
# --------------------------------------------------------------------------------------------------
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


def _group_path(n: _Node) -> str:
    """The module path a node is grouped by: its module's path, or for a module call the path of
    the module's parent (a box named after a module holds what runs inside it, not the call itself)."""
    path = _module_path(n.node)
    if n.op == "call_module" and path == n.node.target:
        return path.rpartition(".")[0]
    return path


def _auto_depth(nodes: Sequence[_Node]) -> int | None:
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


def _cluster_paths(nodes: Sequence[_Node], clusters: Clusters) -> dict[str, tuple[str, ...]]:
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
class _Box:
    key: tuple[str, ...]
    nodes: list[str] = field(default_factory=list)
    boxes: dict[tuple[str, ...], "_Box"] = field(default_factory=dict)

    def size(self) -> int:
        return len(self.nodes) + len(self.boxes)


def _cluster_tree(order: Sequence[str], paths: Mapping[str, tuple[str, ...]], automatic: bool,
                  io: set[str]) -> _Box:
    """Nest nodes into boxes. Boxes made from module paths (``automatic``) are simplified: a box
    holding a single member is dropped, and so is one box holding everything but the inputs
    and outputs. A caller's boxes are drawn as given."""
    root = _Box(())
    for name in order:
        box = root
        for i in range(len(paths.get(name, ()))):
            key = paths[name][:i + 1]
            box = box.boxes.setdefault(key, _Box(key))
        box.nodes.append(name)
    if not automatic:
        return root

    def simplify(box: _Box) -> None:
        for key, child in list(box.boxes.items()):
            simplify(child)
            if child.size() <= 1:  # a box around one thing says nothing: lift its content
                del box.boxes[key]
                box.nodes += child.nodes
                box.boxes.update(child.boxes)

    simplify(root)
    while len(root.boxes) == 1 and set(root.nodes) <= io:  # one frame around everything
        (only,) = root.boxes.values()
        root = _Box((), root.nodes + only.nodes, only.boxes)
    return root


# --------------------------------------------------------------------------------------------------
# Emitting DOT
# --------------------------------------------------------------------------------------------------
def _node_label(n: _Node, status_text: bool) -> str:
    rows = [f'<B>{_esc(n.name)}</B>']
    if n.kind != n.name:
        rows.append(f'<FONT POINT-SIZE="10">{_esc(n.kind)}</FONT>')
    if n.shape:
        rows.append(f'<FONT POINT-SIZE="9" COLOR="{MUTED}">{_esc(n.shape)}</FONT>')
    if status_text and n.status and n.status != KEPT:
        style = STATUS_STYLES.get(n.status)
        tag = style.tag if style else n.status
        rows.append(f'<FONT POINT-SIZE="8" COLOR="{TEXT}"><I>{_esc(tag)}</I></FONT>')
    return "<" + "<BR/>".join(rows) + ">"


def _node_attrs(n: _Node, status_text: bool) -> dict[str, str]:
    style = STATUS_STYLES.get(n.status or KEPT, STATUS_STYLES[KEPT])
    styles = ["filled"]
    if n.op in ("call_module", "placeholder", "output", "get_attr"):
        styles.insert(0, "rounded")
    if style.border_style:
        styles.append(style.border_style)
    attrs = {
        "label": _node_label(n, status_text),
        "shape": "note" if n.op == "get_attr" else "box",
        "style": ",".join(styles),
        "fillcolor": style.fill if n.op not in ("placeholder", "output") or n.status not in (None, KEPT) else "#FFF7D6",
        "color": style.border,
        "penwidth": f"{style.penwidth if n.op not in ('placeholder', 'output') else max(style.penwidth, 1.6):g}",
        "tooltip": n.tooltip,
        "class": " ".join(["fx-node", f"op-{n.op}"] + ([f"status-{n.status}"] if n.status else [])),
    }
    return attrs


def _emit_picture(g: graphviz.Digraph, pic: _Picture, *, prefix: str, clusters: Clusters, status_text: bool,
                  cluster_ids: list[int]) -> dict[str, tuple[str, ...]]:
    """Add ``pic``'s nodes (grouped into clusters) and edges to ``g``; node ids are ``prefix + name``."""
    paths = _cluster_paths(pic.nodes, clusters)
    automatic = clusters is None or clusters is True or isinstance(clusters, int)
    io = {n.name for n in pic.nodes if n.op in ("placeholder", "output")}
    tree = _cluster_tree([n.name for n in pic.nodes], paths, automatic, io)
    by_name = {n.name: n for n in pic.nodes}
    spine, spine_edges = _spine(pic)
    placed: dict[str, tuple[str, ...]] = {}

    def add_nodes(sub: graphviz.Digraph, box: _Box, depth: int) -> None:
        for name in box.nodes:
            attrs = _node_attrs(by_name[name], status_text)
            if name in spine:
                attrs["group"] = f"{prefix}spine"
            sub.node(prefix + name, **attrs)
            placed[prefix + name] = box.key
        for key, child in box.boxes.items():
            cluster_ids[0] += 1
            with sub.subgraph(name=f"cluster_{cluster_ids[0]}") as c:
                c.attr(label=_cluster_label(key, pic.module_classes), labeljust="l", labelloc="t",
                       style="rounded,filled", fillcolor=CLUSTER_FILLS[depth % 2], color="#B5B5B5",
                       fontname=FONT, fontsize="11", fontcolor=MUTED, penwidth="1", margin="10", peripheries="1",
                       **{"class": "fx-cluster", "tooltip": key[-1],
                          "id": f"cluster:{prefix}{key[-1] if automatic else '/'.join(key)}"})
                add_nodes(c, child, depth + 1)

    add_nodes(g, tree, 0)
    for e in pic.edges:
        attrs = dict(EDGE_STYLES[e.status])
        attrs["class"] = f"fx-edge edge-{e.status}"
        if (e.tail, e.head) in spine_edges:
            attrs["weight"] = "8"
        if e.label:
            attrs.update(label=f" {e.label}", fontsize="8", fontcolor=MUTED, fontname=FONT)
        g.edge(prefix + e.tail, prefix + e.head, **attrs)
    return placed


def _spine(pic: _Picture) -> tuple[set[str], set[tuple[str, str]]]:
    """The longest chain of surviving nodes, found with networkx.

    Why: dot places each edge so as to minimise the sum of weight x length, so
    giving the edges of the longest path a high weight (and its nodes one
    ``group``) keeps that main chain straight and vertical, and the skip
    connections and side branches are routed around it instead of the main path
    zig-zagging between them. Dropped edges count little, so in an overlay the
    chain follows what survives the rewrite.
    """
    dag = nx.DiGraph()
    dag.add_nodes_from(n.name for n in pic.nodes)
    for e in pic.edges:
        dag.add_edge(e.tail, e.head, w=0.1 if e.status == EDGE_DROPPED else 1.0)
    try:
        path = nx.dag_longest_path(dag, weight="w")
    except nx.NetworkXUnfeasible:  # a cycle (only possible in a hand-made overlay): no hints
        return set(), set()
    return set(path), set(zip(path, path[1:]))


def _cluster_label(key: tuple[str, ...], classes: Mapping[str, str]) -> str:
    name = key[-1]
    cls = classes.get(name)
    if cls:
        return f"<<B>{_esc(name)}</B>  <FONT COLOR=\"{MUTED}\">{_esc(cls)}</FONT>>"
    return f"<<B>{_esc(name)}</B>>"


def _legend(title: str | None, counts: Mapping[str, int] | None, subtitle: str | None,
            edges: Iterable[str] = ()) -> str | None:
    """An HTML-like label: the title, then one swatch per status (with its count) and the edge styles."""
    rows = []
    if title:
        rows.append(f'<TR><TD ALIGN="LEFT" COLSPAN="20"><FONT POINT-SIZE="16"><B>{_esc(title)}</B></FONT></TD></TR>')
    if subtitle:
        rows.append(f'<TR><TD ALIGN="LEFT" COLSPAN="20"><FONT POINT-SIZE="10" COLOR="{MUTED}">{_esc(subtitle)}'
                    f'</FONT></TD></TR>')
    if counts is not None:
        cells = []
        for status in LEGEND_ORDER:
            if status == REMOVED and not counts.get(status):
                continue
            s = STATUS_STYLES[status]
            border_style = f' STYLE="{s.border_style}"' if s.border_style else ""
            cells.append(f'<TD BGCOLOR="{s.fill}" COLOR="{s.border}" BORDER="{2 if s.penwidth > 2 else 1}"'
                         f'{border_style} CELLPADDING="4" TITLE="{_esc(s.description)}">'
                         f'<FONT POINT-SIZE="10">{_esc(s.label)} ({counts.get(status, 0)})</FONT></TD>')
        edge_cells = []
        names = {EDGE_DROPPED: "edge dropped \u2013 \u2013 \u25b7", EDGE_ADDED: "edge added \u2501\u2501\u25b6"}
        for e in edges:
            if e in names:
                color = EDGE_STYLES[e]["color"]
                edge_cells.append(f'<TD CELLPADDING="4"><FONT POINT-SIZE="10" COLOR="{color}">{names[e]}</FONT></TD>')
        rows.append('<TR><TD ALIGN="LEFT" CELLPADDING="4"><FONT POINT-SIZE="10"><B>legend</B></FONT></TD>'
                    + "".join(cells) + "".join(edge_cells) + "</TR>")
    if not rows:
        return None
    return ('<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="4" CELLPADDING="0">'
            + "".join(rows) + "</TABLE>>")


# --------------------------------------------------------------------------------------------------
# The parameter table
# --------------------------------------------------------------------------------------------------
def param_rows(param_map: Mapping[str, str | None], shapes: Mapping[str, tuple[int, ...]],
               per: str = "tensor") -> list[tuple[str, str | None, str]]:
    """Rows ``(new name, original name or None, shape text)`` of a parameter table.

    ``per="module"`` folds the tensors of a module that all come from one original
    module under the same local names (``M.weight <- O.weight``, ``M.bias <- O.bias``...,
    ``O`` may differ from ``M``) into one row ``M.* <- O.*``; a module whose tensors
    come from several places, or are new, keeps one row per tensor.
    """
    if per == "tensor":
        return [(new, old, format_shape(shapes.get(new)) or "") for new, old in param_map.items()]
    if per != "module":
        raise ValueError(f"param_table must be False, True, 'tensor' or 'module', not {per!r}")
    groups: dict[str, list[tuple[str, str | None]]] = {}
    for new, old in param_map.items():
        groups.setdefault(new.rpartition(".")[0], []).append((new, old))
    rows = []
    for module, items in groups.items():
        owners = set()
        for new, old in items:
            leaf = new.rpartition(".")[2]
            owners.add(old[:-len(leaf) - 1] if old and old.endswith("." + leaf) else None)
        if len(owners) == 1 and None not in owners:
            (owner,) = owners
            main = next((n for n, _ in items if n.endswith(".weight")), items[0][0])
            text = f"{main.rpartition('.')[2]} {format_shape(shapes.get(main)) or '?'}"
            if len(items) > 1:
                text += f" +{len(items) - 1} more"
            rows.append((f"{module}.*" if module else "*", f"{owner}.*" if owner else "*", text))
        else:
            rows += [(new, old, format_shape(shapes.get(new)) or "") for new, old in items]
    return rows


def _param_table(rows: list[tuple[str, str | None, str]], max_rows: int, title: str,
                 with_origin: bool = True) -> str:
    head = (f'<TR><TD COLSPAN="4" ALIGN="LEFT"><FONT POINT-SIZE="11"><B>{_esc(title)}</B></FONT></TD></TR>'
            '<TR><TD ALIGN="LEFT" BGCOLOR="#E9E9E9"><B>new name</B></TD>'
            + ('<TD BGCOLOR="#E9E9E9"></TD><TD ALIGN="LEFT" BGCOLOR="#E9E9E9"><B>original name</B></TD>'
               if with_origin else "")
            + '<TD ALIGN="LEFT" BGCOLOR="#E9E9E9"><B>shape</B></TD></TR>')
    body = []
    for new, old, shape in rows[:max_rows]:
        if not with_origin:
            origin = ""
        elif old is None:
            origin = (f'<TD>{_esc(LEFT)}</TD><TD ALIGN="LEFT"><FONT COLOR="{STATUS_STYLES[NEW].border}">'
                      f'<I>(new tensor)</I></FONT></TD>')
        elif old == new:
            origin = f'<TD>{_esc(LEFT)}</TD><TD ALIGN="LEFT"><FONT COLOR="{MUTED}">{_esc(old)}</FONT></TD>'
        else:
            origin = f'<TD>{_esc(LEFT)}</TD><TD ALIGN="LEFT"><B>{_esc(old)}</B></TD>'
        body.append(f'<TR><TD ALIGN="LEFT">{_esc(new)}</TD>{origin}'
                    f'<TD ALIGN="LEFT"><FONT COLOR="{MUTED}">{_esc(shape)}</FONT></TD></TR>')
    if len(rows) > max_rows:
        body.append(f'<TR><TD COLSPAN="4" ALIGN="LEFT"><I>\u2026 {len(rows) - max_rows} more rows '
                    f'(param_table="module" folds them by module)</I></TD></TR>')
    return ('<<TABLE BORDER="1" COLOR="#B5B5B5" CELLBORDER="0" CELLSPACING="0" CELLPADDING="3" '
            'BGCOLOR="#FFFFFF"><TR><TD>'
            '<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="2">'
            + head + "".join(body) + "</TABLE></TD></TR></TABLE>>")



# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------
def _new_digraph(name: str, rankdir: str) -> graphviz.Digraph:
    if rankdir not in ("TB", "LR", "BT", "RL"):
        raise ValueError(f"rankdir must be TB, LR, BT or RL, not {rankdir!r}")
    g = graphviz.Digraph(name=name)
    g.attr(rankdir=rankdir, compound="true", fontname=FONT, nodesep="0.25", ranksep="0.32",
           bgcolor="white", pad="0.2", labelloc="t", labeljust="l")
    g.attr("node", fontname=FONT, fontsize="12", fontcolor=TEXT, margin="0.12,0.05", height="0.3")
    g.attr("edge", fontname=FONT, arrowsize="0.7")
    return g


def _finish(g: graphviz.Digraph, body: Callable[[graphviz.Digraph], None], table: str | None,
            n_nodes: int) -> None:
    """Add the drawing's body to ``g``, inside a frameless box whose label (at the bottom) is ``table``."""
    if n_nodes > LARGE_GRAPH_NODES:
        g.attr(nslimit="2")
    if table is None:
        body(g)
        return
    with g.subgraph(name="cluster_params") as c:
        c.attr(label=table, labelloc="b", labeljust="l", peripheries="0", style="", margin="4", fontsize="10",
               **{"class": "fx-param-box"})
        body(c)


def draw_graph(gm: fx.GraphModule, *, clusters: Clusters = None, title: str | None = None, shapes: bool = True,
               edge_shapes: bool = False, param_table: bool | str = False, rankdir: str = "TB",
               status: Mapping[str, str] | None = None, status_text: bool = True,
               show_unused_inputs: bool = False, max_table_rows: int = 80) -> Drawing:
    """Draw a traced GraphModule, one box per node, at the granularity it was traced at.

    ``clusters`` groups nodes into boxes: ``None`` groups by module path at the
    shallowest depth that splits the graph (no boxes for a layer-level graph),
    an ``int`` by module path prefix up to that depth (nested), a mapping node
    name -> label or a callable ``fx.Node -> label`` (a label may be a tuple for
    nested boxes; ``None`` leaves the node outside), ``False`` no boxes.
    ``status`` (node name -> one of :data:`STATUS_STYLES`) colours nodes and adds
    the legend; ``param_table`` lists the module's parameters and buffers (``"module"``:
    one row per module); ``shapes`` / ``edge_shapes`` write output shapes in nodes / on
    edges; ``rankdir`` is Graphviz's flow direction (``"TB"``, ``"LR"``...); inputs
    nothing uses are left out unless ``show_unused_inputs``.
    """
    pic = _picture_of_graph(gm, status, edge_shapes, shapes)
    if not show_unused_inputs:
        pic = _without_unused_inputs(pic)
    g = _new_digraph(type(gm).__name__, rankdir)
    counts = _counts(pic) if status is not None else None
    label = _legend(title, counts, None)
    if label:
        g.attr(label=label)
    table = None
    if param_table:
        tensors = dict(named_tensors(gm))
        rows = param_rows({k: k for k in tensors}, {k: tuple(v.shape) for k, v in tensors.items()},
                          _table_mode(param_table))
        table = _param_table(rows, max_table_rows, "parameters and buffers", with_origin=False)
    placed: dict[str, tuple[str, ...]] = {}

    def body(sub: graphviz.Digraph) -> None:
        placed.update(_emit_picture(sub, pic, prefix="", clusters=clusters, status_text=status_text,
                                    cluster_ids=[0]))

    _finish(g, body, table, len(pic.nodes))
    return Drawing(g, {n.name: n.status for n in pic.nodes}, placed)


def draw_rewrite(result: RewriteResult, *, view: str = "overlay", clusters: Clusters = None,
                 title: str | None = None, shapes: bool = True, edge_shapes: bool = False,
                 param_table: bool | str = False, rankdir: str = "TB", status_text: bool = True,
                 show_unused_inputs: bool = False, max_table_rows: int = 80) -> Drawing:
    """Draw a rewrite: ``view`` is ``"overlay"`` (original graph coloured by status, plus new nodes;
    alias ``"diff"``), ``"before"``, ``"after"`` or ``"side_by_side"``.

    ``clusters``: see :func:`draw_graph` (a plug-in passes e.g. a dict node name ->
    ``"backbone"`` / ``"head"`` / ``"auxiliary"``); ``title`` heads the drawing (default:
    the model class and the node counts; ``""`` for none); ``shapes`` writes output
    shapes in nodes, ``edge_shapes`` on edges; ``param_table`` adds the parameter
    map (new name <- original name, shape) under the drawing, one row per tensor
    (``True``/``"tensor"``) or per module (``"module"``), at most ``max_table_rows`` rows;
    ``status_text`` writes the status in each changed node so that colour is not the
    only cue; ``rankdir`` and ``show_unused_inputs`` as in :func:`draw_graph`.

    The drawing's :attr:`Drawing.statuses` maps every drawn node id to its status
    (ids are node names, prefixed ``before/`` / ``after/`` side by side) and
    :attr:`Drawing.clusters` to the boxes it was drawn in.
    """
    view = _VIEW_ALIASES.get(view, view)
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)} (or 'diff'), not {view!r}")
    name = type(result.original).__name__
    g = _new_digraph(f"{name}_{view}", rankdir)
    table = None
    if param_table:
        shapes_of = {k: tuple(v.shape) for k, v in named_tensors(result.module)}
        rows = param_rows(result.param_map, shapes_of, _table_mode(param_table))
        table = _param_table(rows, max_table_rows, f"parameter map ({len(result.param_map)} tensors): "
                                                    f"rewritten \u2190 original")
    statuses: dict[str, str | None] = {}
    placed: dict[str, tuple[str, ...]] = {}
    views = ("before", "after") if view == "side_by_side" else (view,)
    pictures = {v: _picture_of_rewrite(result, v, shapes, edge_shapes) for v in views}
    if not show_unused_inputs:
        pictures = {v: _without_unused_inputs(pic) for v, pic in pictures.items()}

    def body(sub: graphviz.Digraph) -> None:
        ids = [0]
        # dot places disconnected clusters right to left in the order they are written, so "after"
        # is written first to come out on the right (tests/core/test_draw.py checks the positions)
        for v in reversed(views):
            pic = pictures[v]
            prefix = f"{v}/" if view == "side_by_side" else ""
            if view == "side_by_side":
                with sub.subgraph(name=f"cluster_{v}") as c:
                    c.attr(label=f"<<FONT POINT-SIZE=\"14\"><B>{v}</B></FONT>  <FONT COLOR=\"{MUTED}\">"
                                 f"{len(pic.nodes)} nodes</FONT>>", labelloc="t", labeljust="c", style="rounded",
                           color="#8C8C8C", penwidth="1.2", margin="12", peripheries="1", fontsize="11",
                           **{"class": f"fx-view view-{v}"})
                    placed.update(_emit_picture(c, pic, prefix=prefix, clusters=clusters, status_text=status_text,
                                                cluster_ids=ids))
            else:
                placed.update(_emit_picture(sub, pic, prefix=prefix, clusters=clusters, status_text=status_text,
                                            cluster_ids=ids))
        for v in views:
            prefix = f"{v}/" if view == "side_by_side" else ""
            statuses.update({prefix + n.name: n.status for n in pictures[v].nodes})

    _finish(g, body, table, sum(len(pic.nodes) for pic in pictures.values()))
    # the legend counts what happened to the original nodes (and the new ones), whatever the view
    counts = {s: len(result.nodes_with_status(s)) for s in LEGEND_ORDER}
    if title is None:
        n_before, n_after = len(result.original.graph.nodes), len(result.module.graph.nodes)
        title = f"{name}: {_VIEW_TITLES[view]}"
        subtitle = f"{n_before} nodes \u2192 {n_after} nodes; rules: " + \
                   (", ".join(entry.rule for entry in result.log) or "none")
    else:
        subtitle = None
    edge_kinds = {e.status for pic in pictures.values() for e in pic.edges}
    label = _legend(title or None, counts, subtitle, [k for k in (EDGE_DROPPED, EDGE_ADDED) if k in edge_kinds])
    g.attr(label=label)
    return Drawing(g, statuses, placed)


_VIEW_TITLES = {"overlay": "rewrite (original graph, changes marked)", "before": "before the rewrite",
                "after": "after the rewrite", "side_by_side": "before and after the rewrite"}


def write_rewrite_drawings(result: RewriteResult, folder: str | os.PathLike, *, formats: Sequence[str] = ("svg",),
                           **kwargs: Any) -> dict[str, Path]:
    """Write ``before``, ``after`` and ``diff`` (the overlay) drawings into ``folder``, one file per format
    (``svg``, ``png``, ``pdf``, ``dot``); return ``{"before.svg": path, ...}``.

    ``kwargs`` go to :func:`draw_rewrite` (not ``view``). When ``dot`` is missing every
    drawing is still written as ``.dot`` and :class:`GraphvizMissing` is raised once.
    """
    if "view" in kwargs:
        raise TypeError("write_rewrite_drawings draws every view; do not pass view=")
    folder = Path(folder)
    written: dict[str, Path] = {}
    missing: GraphvizMissing | None = None
    for stem, view in (("before", "before"), ("after", "after"), ("diff", "overlay")):
        drawing = draw_rewrite(result, view=view, **kwargs)
        for fmt in formats:
            path = folder / f"{stem}.{fmt.lstrip('.')}"
            try:
                written[path.name] = drawing.save(path)
            except GraphvizMissing as exc:
                missing = exc
                written[Path(exc.dot_path).name] = Path(exc.dot_path)
    if missing is not None:
        dots = ", ".join(str(p) for name, p in written.items() if name.endswith(".dot"))
        raise GraphvizMissing(f"cannot render drawings into {folder}: Graphviz's `dot` program was not found on "
                              f"PATH; the DOT sources were written instead ({dots}). {INSTALL_HINT}",
                              folder)
    return written


def _table_mode(param_table: bool | str) -> str:
    if param_table is True or param_table == "tensor":
        return "tensor"
    if param_table == "module":
        return "module"
    raise ValueError(f"param_table must be False, True, 'tensor' or 'module', not {param_table!r}")


def _counts(pic: _Picture) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in pic.nodes:
        counts[n.status or KEPT] = counts.get(n.status or KEPT, 0) + 1
    return counts


def _esc(text: Any) -> str:
    """Escape for an HTML-like label; arrows in DejaVu Sans, whose arrows are legible at small sizes."""
    text = html.escape(str(text), quote=True)
    for arrow in ("\u2192", "\u2190"):
        text = text.replace(arrow, f'<FONT FACE="{ARROW_FONT}">{arrow}</FONT>')
    return text


__all__ = ["Drawing", "draw_graph", "draw_rewrite", "write_rewrite_drawings", "param_rows", "format_shape",
           "STATUS_STYLES", "VIEWS", "INSTALL_HINT"]
