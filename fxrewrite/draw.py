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

Large graphs (more than :data:`LARGE_GRAPH_NODES` nodes, such as an op-level trace
of a big model): each chain of operations that run one after the other (a conv ->
batch norm -> activation block) is drawn as one box listing them, and the drawing
says so under its title (``fold_chains=False`` draws one box per node); dot gets
iteration limits (:data:`LARGE_GRAPH_LAYOUT`); and nodes are best grouped into boxes
per layer (the default module-path boxes do that). An op-level YOLOv9-e overlay
(1,400 nodes) then takes about 0.4 s to draw and render as SVG, seven times its
layer-level drawing (``benchmarks/test_bench_draw.py``). A bitmap that big still
exceeds cairo's 32,767-pixel limit and is scaled down: prefer SVG for those, or
draw the layer-level trace (``fxrewrite.trace(..., max_depth=...)``).

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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import graphviz
from graphviz.quoting import quote as _graphviz_quote
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
# Above this many drawn nodes, chains of operations are folded into one box each (``fold_chains``)
# and dot gets iteration limits: x-positioning (network simplex, ``nslimit``: iterations per node)
# and crossing minimisation (``mclimit``: a factor on its passes). Measured on an op-level YOLOv9-e
# overlay (1,400 nodes, 900 ranks, 7,600 virtual nodes for its long skip connections), dot -Tsvg
# CPU seconds in one run: 2.6 with nslimit=2, backbone/head boxes and one box per node; 0.75 with
# these limits and a box per layer (which keeps the long edges out of the layers; with the three
# big boxes only, a low nslimit makes spline routing slower instead); 0.32 with chains folded too
# (570 boxes, 330 ranks; nslimit 0.2 to 2 then makes little difference). Its layer-level drawing:
# 0.04. The layout stays as readable: the spine hints straighten the main chain anyway.
LARGE_GRAPH_NODES = 300
LARGE_GRAPH_LAYOUT = {"nslimit": "0.2", "mclimit": "0.5"}
LEFT = "\u2190"


# --------------------------------------------------------------------------------------------------
# The drawing object
# --------------------------------------------------------------------------------------------------
class Drawing:
    """A rendered-on-demand Graphviz drawing: DOT source, SVG/PNG files, inline display in Jupyter.

    ``graph`` is the underlying :class:`graphviz.Digraph` (change its attributes freely
    before saving). ``statuses`` maps every drawn node id to its status (``None`` for
    plain drawings); ``clusters`` maps every drawn node id to its cluster path;
    ``chains`` maps the id of every box that lists a chain of nodes (``fold_chains``)
    to the ids of those nodes, in order (they are in ``statuses`` and ``clusters`` too).
    """

    def __init__(self, graph: graphviz.Digraph, statuses: Mapping[str, str | None] | None = None,
                 clusters: Mapping[str, tuple[str, ...]] | None = None,
                 chains: Mapping[str, Sequence[str]] | None = None):
        self.graph = graph
        self.statuses = dict(statuses or {})
        self.clusters = dict(clusters or {})
        self.chains = {box: list(members) for box, members in (chains or {}).items()}

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
    texts = _Texts()
    for node in gm.graph.nodes:
        pic.nodes.append(_Node(node.name, node, node.op, texts.kind(node, gm), texts.shape(node) if shapes else None,
                               status.get(node.name, KEPT) if status is not None else None,
                               texts.tooltip(node)))
        for tail in node.all_input_nodes:
            pic.edges.append(_Edge(tail.name, node.name, label=texts.shape(tail) if edge_shapes else None))
    return pic


def _picture_of_rewrite(result: RewriteResult, view: str, shapes: bool, edge_shapes: bool,
                        texts: _Texts | None = None) -> _Picture:
    """The nodes and edges of ``view`` ("overlay", "before" or "after") with their statuses."""
    texts = texts if texts is not None else _Texts()
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
        kind = texts.kind(node, after if node is n else before)
        if status == REPLACED and o is not None and n is not None and view != "before":
            old_kind, new_kind = texts.kind(o, before), texts.kind(n, after)
            kind = new_kind if view == "after" or old_kind == new_kind else f"{old_kind} \u2192 {new_kind}"
        shape = None
        if shapes:
            shape = texts.shape(node)
            if view == "overlay" and o is not None and n is not None:
                old_shape, new_shape = texts.shape(o), texts.shape(n)
                if old_shape != new_shape and old_shape and new_shape:
                    shape = f"{old_shape} \u2192 {new_shape}"
        pic.nodes.append(_Node(name, node, node.op, kind, shape, status, texts.tooltip(node, status)))
    for (tail, head), edge_status in edges:
        label = None
        if edge_shapes:
            source = new.get(tail) if (view != "before" and tail in new) else old.get(tail)
            label = texts.shape(source) if source is not None else None
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


def _tooltip(node: fx.Node, status: str | None = None, shape: str | None = "") -> str:
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
    if shape == "":  # not given: work it out
        shape = _shape_text(node, None)
    if shape:
        lines.append(f"output: {shape}")
    if status is not None:
        lines.append(f"status: {status}")
    return "\n".join(lines)


class _Texts:
    """What is written about nodes (kind, shape, tooltip), computed once per node for a whole drawing:
    an overlay asks for a node's shape up to four times (node, tooltip, edge labels, old vs new)."""

    def __init__(self) -> None:
        self._shapes: dict[fx.Node, str | None] = {}
        self._modules: dict[int, dict[str, str]] = {}  # id(GraphModule) -> module path -> class name

    def full_shape(self, node: fx.Node) -> str | None:
        try:
            return self._shapes[node]
        except KeyError:
            text = self._shapes[node] = _shape_text(node, None)
            return text

    def shape(self, node: fx.Node, max_chars: int = 44) -> str | None:
        text = self.full_shape(node)
        if text and len(text) > max_chars:
            text = text[:max_chars - 1].rstrip(", ") + "\u2026"
        return text

    def kind(self, node: fx.Node, gm: fx.GraphModule | None) -> str:
        if node.op != "call_module" or gm is None:
            return _kind(node, gm)
        modules = self._modules.get(id(gm))
        if modules is None:  # one walk over the modules instead of a get_submodule per node
            modules = self._modules[id(gm)] = {name: type(m).__name__ for name, m in gm.named_modules()}
        kind = modules.get(node.target) if isinstance(node.target, str) else None
        return kind if kind is not None else _kind(node, gm)

    def tooltip(self, node: fx.Node, status: str | None = None) -> str:
        return _tooltip(node, status, self.full_shape(node))


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


def _node_attrs(n: _Node, status_text: bool, group: str | None = None) -> str:
    """The node's DOT attribute list (``label`` first, then sorted, as the graphviz package writes it)."""
    before_group, after_group = _node_style(n.op, n.status)
    group_text = f" group={_quote(group)}" if group else ""
    return (f"label={_quote(_node_label(n, status_text))} {before_group}{group_text} {after_group} "
            f"tooltip={_quote(n.tooltip)}")


_NODE_STYLES: dict[tuple[str, str | None, StatusStyle], tuple[str, str]] = {}


def _node_style(op: str, status: str | None) -> tuple[str, str]:
    """The attributes every node of one kind (``op``) and status shares, as DOT text: those sorted
    before ``group`` and those after (cached: a big graph has thousands of nodes)."""
    style = STATUS_STYLES.get(status or KEPT, STATUS_STYLES[KEPT])
    key = (op, status, style)  # the style too: STATUS_STYLES may be changed between drawings
    if key not in _NODE_STYLES:
        styles = ["filled"]
        if op in ("call_module", "placeholder", "output", "get_attr"):
            styles.insert(0, "rounded")
        if style.border_style:
            styles.append(style.border_style)
        io = op in ("placeholder", "output")
        attrs = {
            "class": " ".join(["fx-node", f"op-{op}"] + ([f"status-{status}"] if status else [])),
            "color": style.border,
            "fillcolor": style.fill if not io or status not in (None, KEPT) else "#FFF7D6",
            "penwidth": f"{style.penwidth if not io else max(style.penwidth, 1.6):g}",
            "shape": "note" if op == "get_attr" else "box",
            "style": ",".join(styles),
        }
        text = {k: f"{k}={_quote(v)}" for k, v in attrs.items()}
        _NODE_STYLES[key] = (" ".join(text[k] for k in ("class", "color", "fillcolor")),
                             " ".join(text[k] for k in ("penwidth", "shape", "style")))
    return _NODE_STYLES[key]


_PLAIN_ID = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*|-?(\.[0-9]+|[0-9]+(\.[0-9]*)?))$")
_KEYWORDS = {"node", "edge", "graph", "digraph", "subgraph", "strict"}


def _quote(value: str) -> str:
    """``graphviz.quoting.quote`` (same text), with fast paths for the common cases."""
    if value.startswith("<"):  # an HTML-like label
        return value if value.endswith(">") else _graphviz_quote(value)
    if _PLAIN_ID.match(value):
        return value if value.lower() not in _KEYWORDS else f'"{value}"'
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    return _graphviz_quote(value)


def _a_list(attrs: Mapping[str, str]) -> str:
    """``key=value ...`` as the graphviz package writes it: ``label`` first, then sorted, values quoted."""
    label = attrs.get("label")
    parts = [f"label={_quote(label)}"] if label is not None else []
    parts += [f"{k}={_quote(v)}" for k, v in sorted(attrs.items()) if k != "label" and v is not None]
    return " ".join(parts)


def _emit_picture(g: graphviz.Digraph, pic: _Picture, *, prefix: str, clusters: Clusters, status_text: bool,
                  cluster_ids: list[int], fold: bool = False,
                  chains: dict[str, list[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """Add ``pic``'s nodes (grouped into clusters) and edges to ``g``; node ids are ``prefix + name``.

    With ``fold``, each chain of operations (see :func:`_chains`) is drawn as one box listing them,
    whose id is its first node's; ``chains`` then receives box id -> the ids of the nodes it lists.
    The DOT lines are written straight into the graphs' bodies (what ``Digraph.node`` / ``.edge``
    would write, without their per-call overhead: a big graph has thousands of nodes and edges).
    """
    paths = _cluster_paths(pic.nodes, clusters)
    automatic = clusters is None or clusters is True or isinstance(clusters, int)
    io = {n.name for n in pic.nodes if n.op in ("placeholder", "output")}
    tree = _cluster_tree([n.name for n in pic.nodes], paths, automatic, io)
    by_name = {n.name: n for n in pic.nodes}
    spine, spine_edges = _spine(pic)
    placed: dict[str, tuple[str, ...]] = {}
    folded = _chains(pic, paths) if fold else {}
    drawn_as = {m.name: head for head, members in folded.items() for m in members}  # node -> its box
    if chains is not None:
        chains.update({prefix + head: [prefix + m.name for m in members] for head, members in folded.items()})
    ids = {n.name: _quote(prefix + n.name) for n in pic.nodes}
    spine_group = f"{prefix}spine"

    def add_nodes(sub: graphviz.Digraph, box: _Box, depth: int) -> None:
        lines = sub.body
        for name in box.nodes:
            placed[prefix + name] = box.key
            head = drawn_as.get(name)
            if head is None:
                attrs = _node_attrs(by_name[name], status_text, spine_group if name in spine else None)
            elif head == name:
                members = folded[name]
                on_spine = any(m.name in spine for m in members)
                attrs = _chain_attrs(members, status_text, spine_group if on_spine else None)
            else:  # drawn in its chain's box
                continue
            lines.append(f"\t{ids[name]} [{attrs}]\n")
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
    edge_attrs: dict[tuple[str, bool], str] = {}
    for e in pic.edges:
        tail, head = drawn_as.get(e.tail, e.tail), drawn_as.get(e.head, e.head)
        if tail == head and e.tail != e.head:  # inside a chain: the box lists the nodes in order
            continue
        spine_edge = (e.tail, e.head) in spine_edges
        if e.label:
            attrs = dict(EDGE_STYLES[e.status], label=f" {e.label}", fontsize="8", fontcolor=MUTED, fontname=FONT)
            attrs["class"] = f"fx-edge edge-{e.status}"
            if spine_edge:
                attrs["weight"] = "8"
            text = _a_list(attrs)
        else:
            text = edge_attrs.get((e.status, spine_edge))
            if text is None:
                attrs = dict(EDGE_STYLES[e.status])
                attrs["class"] = f"fx-edge edge-{e.status}"
                if spine_edge:
                    attrs["weight"] = "8"
                text = edge_attrs[e.status, spine_edge] = _a_list(attrs)
        g.body.append(f"\t{ids.get(tail) or _quote(prefix + tail)} -> "
                      f"{ids.get(head) or _quote(prefix + head)} [{text}]\n")
    return placed


_UNFOLDED_OPS = ("placeholder", "output", "get_attr")


def _chains(pic: _Picture, paths: Mapping[str, tuple[str, ...]]) -> dict[str, list[_Node]]:
    """Chains of operations that run one after the other: first node's name -> the nodes, in order.

    Two nodes are chained when the first's output goes only to the second and the second
    reads only the first (so no edge enters or leaves the chain midway), both have the same
    status and the same box, and the edge between them says nothing their status does not
    (kept; dropped between pruned or removed nodes; added between new ones); inputs, outputs
    and attributes are never chained. A conv -> batch norm -> activation block is one chain.
    """
    by_name = {n.name: n for n in pic.nodes}
    outs: dict[str, int] = {}
    ins: dict[str, int] = {}
    for e in pic.edges:
        outs[e.tail] = outs.get(e.tail, 0) + 1
        ins[e.head] = ins.get(e.head, 0) + 1
    following: dict[str, str] = {}
    for e in pic.edges:
        t, h = by_name.get(e.tail), by_name.get(e.head)
        if (t is not None and h is not None and t is not h and _implied(e.status, t.status)
                and outs[e.tail] == 1 and ins[e.head] == 1 and t.status == h.status
                and t.op not in _UNFOLDED_OPS and h.op not in _UNFOLDED_OPS
                and paths.get(t.name, ()) == paths.get(h.name, ())):
            following[t.name] = h.name
    preceded = set(following.values())
    chains: dict[str, list[_Node]] = {}
    for n in pic.nodes:
        if n.name in following and n.name not in preceded:
            members, name = [n], n.name
            while name in following:
                name = following[name]
                members.append(by_name[name])
            chains[n.name] = members
    return chains


def _implied(edge_status: str, node_status: str | None) -> bool:
    """Whether an edge between two nodes of ``node_status`` looks as their statuses say it must."""
    if edge_status == EDGE_KEPT:
        return True
    if edge_status == EDGE_DROPPED:
        return node_status in (PRUNED, REMOVED)
    return edge_status == EDGE_ADDED and node_status == NEW


def _chain_attrs(members: Sequence[_Node], status_text: bool, group: str | None) -> str:
    """DOT attributes of a box listing a chain: one row per node (name and kind), its output shape
    where it differs from the next node's, the status tag once."""
    first = members[0]
    rows = []
    for i, n in enumerate(members):
        text = f"<B>{_esc(n.name)}</B>"
        if n.kind != n.name:
            text += f'  <FONT POINT-SIZE="10">{_esc(n.kind)}</FONT>'
        rows.append(f'<TR><TD ALIGN="LEFT">{text}</TD></TR>')
        if n.shape and (i == len(members) - 1 or members[i + 1].shape != n.shape):
            rows.append(f'<TR><TD ALIGN="LEFT"><FONT POINT-SIZE="9" COLOR="{MUTED}">{_esc(n.shape)}</FONT></TD></TR>')
    if status_text and first.status and first.status != KEPT:
        style = STATUS_STYLES.get(first.status)
        rows.append(f'<TR><TD ALIGN="LEFT"><FONT POINT-SIZE="8" COLOR="{TEXT}"><I>'
                    f'{_esc(style.tag if style else first.status)}</I></FONT></TD></TR>')
    label = '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">' + "".join(rows) + "</TABLE>>"
    ops = {n.op for n in members}
    before_group, after_group = _node_style(ops.pop() if len(ops) == 1 else "call_function", first.status)
    before_group = before_group.replace('class="fx-node ', 'class="fx-node fx-chain ', 1)
    group_text = f" group={_quote(group)}" if group else ""
    tooltip = f"{len(members)} operations, one after the other:\n\n" + "\n\n".join(n.tooltip for n in members)
    return f"label={label} {before_group}{group_text} {after_group} tooltip={_quote(tooltip)}"


def _spine(pic: _Picture) -> tuple[set[str], set[tuple[str, str]]]:
    """The longest chain of surviving nodes.

    Why: dot places each edge so as to minimise the sum of weight x length, so
    giving the edges of the longest path a high weight (and its nodes one
    ``group``) keeps that main chain straight and vertical, and the skip
    connections and side branches are routed around it instead of the main path
    zig-zagging between them. Dropped edges count little, so in an overlay the
    chain follows what survives the rewrite.

    The same path as networkx's ``dag_longest_path(weight=...)`` on the same graph
    (ties broken alike), in plain Python: this runs on every drawing.
    """
    preds: dict[str, dict[str, float]] = {n.name: {} for n in pic.nodes}
    succs: dict[str, dict[str, None]] = {n.name: {} for n in pic.nodes}
    for e in pic.edges:
        for name in (e.tail, e.head):
            if name not in preds:
                preds[name], succs[name] = {}, {}
        preds[e.head][e.tail] = 0.1 if e.status == EDGE_DROPPED else 1.0  # a repeated edge: the last one counts
        succs[e.tail][e.head] = None
    # Kahn's algorithm, generation by generation (networkx's topological order)
    indegree = {v: len(p) for v, p in preds.items() if p}
    generation = [v for v, p in preds.items() if not p]
    order: list[str] = []
    while generation:
        order += generation
        following = []
        for v in generation:
            for child in succs[v]:
                indegree[child] -= 1
                if not indegree[child]:
                    following.append(child)
                    del indegree[child]
        generation = following
    if indegree:  # a cycle (only possible in a hand-made overlay): no hints
        return set(), set()
    if not order:
        return set(), set()
    dist: dict[str, tuple[float, str]] = {}
    for v in order:
        best = (0.0, v)
        first = True
        for u, w in preds[v].items():
            length = dist[u][0] + w
            if first or length > best[0]:
                best, first = (length, u), False
        dist[v] = best if best[0] >= 0 else (0.0, v)
    v = max(dist, key=lambda x: dist[x][0])
    path, u = [], None
    while u != v:
        path.append(v)
        u, v = v, dist[v][1]
    path.reverse()
    return set(path), set(zip(path, path[1:]))


def _cluster_label(key: tuple[str, ...], classes: Mapping[str, str]) -> str:
    name = key[-1]
    cls = classes.get(name)
    if cls:
        return f"<<B>{_esc(name)}</B>  <FONT COLOR=\"{MUTED}\">{_esc(cls)}</FONT>>"
    return f"<<B>{_esc(name)}</B>>"


def _legend(title: str | None, counts: Mapping[str, int] | None, subtitle: str | None,
            edges: Iterable[str] = (), note: str | None = None) -> str | None:
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
    if note:
        rows.append(f'<TR><TD ALIGN="LEFT" COLSPAN="20"><FONT POINT-SIZE="10" COLOR="{MUTED}"><I>{_esc(note)}</I>'
                    f'</FONT></TD></TR>')
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
        g.attr(**LARGE_GRAPH_LAYOUT)
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
               show_unused_inputs: bool = False, max_table_rows: int = 80,
               fold_chains: bool | None = None) -> Drawing:
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

    ``fold_chains`` draws each chain of operations that run one after the other (each
    the only reader of the previous one's output, same box, same status; a conv ->
    batch norm -> activation block) as one box listing them in order, with the shape
    where it changes. ``None`` (the default) folds graphs of more than
    :data:`LARGE_GRAPH_NODES` nodes (an op-level trace of a big model: half the boxes
    and ranks, so the picture is shorter and dot lays it out several times faster),
    and the drawing says so under its title; ``False`` draws one box per node always.
    """
    pic = _picture_of_graph(gm, status, edge_shapes, shapes)
    if not show_unused_inputs:
        pic = _without_unused_inputs(pic)
    g = _new_digraph(type(gm).__name__, rankdir)
    counts = _counts(pic) if status is not None else None
    fold = _should_fold(fold_chains, len(pic.nodes))
    table = None
    if param_table:
        tensors = dict(named_tensors(gm))
        rows = param_rows({k: k for k in tensors}, {k: tuple(v.shape) for k, v in tensors.items()},
                          _table_mode(param_table))
        table = _param_table(rows, max_table_rows, "parameters and buffers", with_origin=False)
    placed: dict[str, tuple[str, ...]] = {}
    chains: dict[str, list[str]] = {}

    def body(sub: graphviz.Digraph) -> None:
        placed.update(_emit_picture(sub, pic, prefix="", clusters=clusters, status_text=status_text,
                                    cluster_ids=[0], fold=fold, chains=chains))

    _finish(g, body, table, len(pic.nodes))
    label = _legend(title, counts, None, note=_fold_note(chains))
    if label:
        g.attr(label=label)
    return Drawing(g, {n.name: n.status for n in pic.nodes}, placed, chains)


def draw_rewrite(result: RewriteResult, *, view: str = "overlay", clusters: Clusters = None,
                 title: str | None = None, shapes: bool = True, edge_shapes: bool = False,
                 param_table: bool | str = False, rankdir: str = "TB", status_text: bool = True,
                 show_unused_inputs: bool = False, max_table_rows: int = 80,
                 fold_chains: bool | None = None) -> Drawing:
    """Draw a rewrite: ``view`` is ``"overlay"`` (original graph coloured by status, plus new nodes;
    alias ``"diff"``), ``"before"``, ``"after"`` or ``"side_by_side"``.

    ``clusters``: see :func:`draw_graph` (a plug-in passes e.g. a dict node name ->
    ``"backbone"`` / ``"head"`` / ``"auxiliary"``); ``title`` heads the drawing (default:
    the model class and the node counts; ``""`` for none); ``shapes`` writes output
    shapes in nodes, ``edge_shapes`` on edges; ``param_table`` adds the parameter
    map (new name <- original name, shape) under the drawing, one row per tensor
    (``True``/``"tensor"``) or per module (``"module"``), at most ``max_table_rows`` rows;
    ``status_text`` writes the status in each changed node so that colour is not the
    only cue; ``rankdir``, ``show_unused_inputs`` and ``fold_chains`` (a chain of
    operations as one box, by default in graphs of more than :data:`LARGE_GRAPH_NODES`
    nodes) as in :func:`draw_graph`.

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
    texts = _Texts()
    pictures = {v: _picture_of_rewrite(result, v, shapes, edge_shapes, texts) for v in views}
    if not show_unused_inputs:
        pictures = {v: _without_unused_inputs(pic) for v, pic in pictures.items()}
    n_nodes = sum(len(pic.nodes) for pic in pictures.values())
    fold = _should_fold(fold_chains, n_nodes)
    chains: dict[str, list[str]] = {}

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
                                                cluster_ids=ids, fold=fold, chains=chains))
            else:
                placed.update(_emit_picture(sub, pic, prefix=prefix, clusters=clusters, status_text=status_text,
                                            cluster_ids=ids, fold=fold, chains=chains))
        for v in views:
            prefix = f"{v}/" if view == "side_by_side" else ""
            statuses.update({prefix + n.name: n.status for n in pictures[v].nodes})

    _finish(g, body, table, n_nodes)
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
    label = _legend(title or None, counts, subtitle, [k for k in (EDGE_DROPPED, EDGE_ADDED) if k in edge_kinds],
                    note=_fold_note(chains))
    g.attr(label=label)
    return Drawing(g, statuses, placed, chains)


def _should_fold(fold_chains: bool | None, n_nodes: int) -> bool:
    if fold_chains is None:
        return n_nodes > LARGE_GRAPH_NODES
    if not isinstance(fold_chains, bool):
        raise ValueError(f"fold_chains must be True, False or None (automatic), not {fold_chains!r}")
    return fold_chains


def _fold_note(chains: Mapping[str, Sequence[str]]) -> str | None:
    if not chains:
        return None
    n = sum(len(members) for members in chains.values())
    return (f"{n} nodes in chains (each the only reader of the previous one) are drawn as {len(chains)} boxes "
            f"listing them in order; fold_chains=False draws one box per node")


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
