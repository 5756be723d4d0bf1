"""Drawings of traced graphs and of rewrites: before, after, and the difference marked.

A small package, one concern per module: :mod:`~fxrewrite.draw.picture` (what is drawn:
nodes, edges, statuses), :mod:`~fxrewrite.draw.labels` (what is written),
:mod:`~fxrewrite.draw.clusters` (boxes), :mod:`~fxrewrite.draw.chains` (chain folding),
:mod:`~fxrewrite.draw.dot` (DOT output and layout hints), :mod:`~fxrewrite.draw.files`
(the :class:`Drawing` object: rendering, files, notebooks), :mod:`~fxrewrite.draw.style`
(colours and limits); this module holds the three public functions.

:func:`draw_rewrite` draws a :class:`~fxrewrite.result.RewriteResult`:

* ``view="overlay"`` (the default): the original graph with every node coloured by
  what the rewrite did to it, plus the nodes and edges the rewrite created;
  edges the rewrite dropped are dashed, edges it added are drawn bold;
* ``"before"`` / ``"after"``: the original / rewritten graph alone;
* ``"side_by_side"``: both, next to each other, "before" on the left.

With ``rename`` (new module path per old one, e.g. a plug-in's layer renumbering), the
"after" picture names each renamed module by its new name and its origin
(``model.22 ← model.38``).

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

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import graphviz
from torch import fx

from ..errors import GraphvizMissing
from ..naming import Rename
from ..tensors import named_tensors
from .clusters import ClusterLabel, Clusters
from .dot import emit_picture, finish, new_digraph, quote
from .files import INSTALL_HINT, Drawing
from .labels import Texts, format_shape, legend, param_rows, param_table_label
from .picture import picture_of_graph, picture_of_rewrite, status_counts, without_unused_inputs
from .style import (EDGE_ADDED, EDGE_DROPPED, LARGE_GRAPH_LAYOUT, LARGE_GRAPH_NODES, LEGEND_ORDER, MUTED,
                    STATUS_STYLES, StatusStyle)

VIEWS = ("overlay", "before", "after", "side_by_side")
_VIEW_ALIASES = {"diff": "overlay", "side-by-side": "side_by_side", "sidebyside": "side_by_side"}


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
    pic = picture_of_graph(gm, status, edge_shapes, shapes)
    if not show_unused_inputs:
        pic = without_unused_inputs(pic)
    g = new_digraph(type(gm).__name__, rankdir)
    counts = status_counts(pic) if status is not None else None
    fold = should_fold(fold_chains, len(pic.nodes))
    table = None
    if param_table:
        tensors = dict(named_tensors(gm))
        rows = param_rows({k: k for k in tensors}, {k: tuple(v.shape) for k, v in tensors.items()},
                          table_mode(param_table))
        table = param_table_label(rows, max_table_rows, "parameters and buffers", with_origin=False)
    placed: dict[str, tuple[str, ...]] = {}
    chains: dict[str, list[str]] = {}

    def body(sub: graphviz.Digraph) -> None:
        placed.update(emit_picture(sub, pic, prefix="", clusters=clusters, status_text=status_text,
                                   cluster_ids=[0], fold=fold, chains=chains))

    finish(g, body, table, len(pic.nodes))
    label = legend(title, counts, None, note=fold_note(chains))
    if label:
        g.attr(label=label)
    return Drawing(g, {n.name: n.status for n in pic.nodes}, placed, chains)


def draw_rewrite(result: Any, *, view: str = "overlay", clusters: Clusters = None,
                 title: str | None = None, shapes: bool = True, edge_shapes: bool = False,
                 param_table: bool | str = False, rankdir: str = "TB", status_text: bool = True,
                 show_unused_inputs: bool = False, max_table_rows: int = 80,
                 fold_chains: bool | None = None, rename: Rename | None = None) -> Drawing:
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
    nodes) as in :func:`draw_graph`. ``rename`` (module paths: a mapping of dotted prefixes, longest
    first, or a function) labels renamed modules and boxes of the "after" picture with their new
    name and their origin (``model.22 ← model.38``).

    ``result`` is a :class:`~fxrewrite.result.RewriteResult`.

    The drawing's :attr:`Drawing.statuses` maps every drawn node id to its status
    (ids are node names, prefixed ``before/`` / ``after/`` side by side) and
    :attr:`Drawing.clusters` to the boxes it was drawn in.
    """
    view = _VIEW_ALIASES.get(view, view)
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)} (or 'diff'), not {view!r}")
    name = type(result.original).__name__
    g = new_digraph(f"{name}_{view}", rankdir)
    table = None
    if param_table:
        shapes_of = {k: tuple(v.shape) for k, v in named_tensors(result.module)}
        rows = param_rows(result.param_map, shapes_of, table_mode(param_table))
        table = param_table_label(rows, max_table_rows, f"parameter map ({len(result.param_map)} tensors): "
                                                    f"rewritten \u2190 original")
    statuses: dict[str, str | None] = {}
    placed: dict[str, tuple[str, ...]] = {}
    views = ("before", "after") if view == "side_by_side" else (view,)
    texts = Texts()
    pictures = {v: picture_of_rewrite(result, v, shapes, edge_shapes, texts, rename) for v in views}
    if not show_unused_inputs:
        pictures = {v: without_unused_inputs(pic) for v, pic in pictures.items()}
    n_nodes = sum(len(pic.nodes) for pic in pictures.values())
    fold = should_fold(fold_chains, n_nodes)
    chains: dict[str, list[str]] = {}

    def body(sub: graphviz.Digraph) -> None:
        ids = [0]
        for v in views:
            pic = pictures[v]
            prefix = f"{v}/" if view == "side_by_side" else ""
            names = rename if v == "after" else None
            if view == "side_by_side":
                with sub.subgraph(name=f"cluster_{v}") as c:
                    c.attr(label=f"<<FONT POINT-SIZE=\"14\"><B>{v}</B></FONT>  <FONT COLOR=\"{MUTED}\">"
                                 f"{len(pic.nodes)} nodes</FONT>>", labelloc="t", labeljust="c", style="rounded",
                           color="#8C8C8C", penwidth="1.2", margin="12", peripheries="1", fontsize="11",
                           **{"class": f"fx-view view-{v}"})
                    placed.update(emit_picture(c, pic, prefix=prefix, clusters=clusters, status_text=status_text,
                                               cluster_ids=ids, fold=fold, chains=chains, rename=names))
            else:
                placed.update(emit_picture(sub, pic, prefix=prefix, clusters=clusters, status_text=status_text,
                                           cluster_ids=ids, fold=fold, chains=chains, rename=names))
        for v in views:
            prefix = f"{v}/" if view == "side_by_side" else ""
            statuses.update({prefix + n.name: n.status for n in pictures[v].nodes})
        if view == "side_by_side":
            _before_left_of_after(sub, pictures)

    finish(g, body, table, n_nodes)
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
    label = legend(title or None, counts, subtitle, [k for k in (EDGE_DROPPED, EDGE_ADDED) if k in edge_kinds],
                   note=fold_note(chains))
    g.attr(label=label)
    return Drawing(g, statuses, placed, chains)


def _before_left_of_after(g: graphviz.Digraph, pictures: Mapping[str, Any]) -> None:
    """Put the "before" picture left of the "after" one: an invisible node above both, with edges to
    their first nodes in that order and ``ordering=out`` (dot keeps a node's out-edges in the order
    they are written). Left to itself, dot orders the two disconnected pictures as crossing
    minimisation happens to leave them (the YOLO drawings came out with "after" first)."""
    firsts = [quote(f"{v}/" + next(n.name for n in pictures[v].nodes if n.op in ("placeholder", "output")))
              for v in ("before", "after")]  # never folded into a chain box
    g.body.append('\t"views/order" [label="" ordering=out shape=point style=invis width=0]\n')
    g.body.extend(f'\t"views/order" -> {first} [style=invis]\n' for first in firsts)


def table_mode(param_table: bool | str) -> str:
    if param_table is True or param_table == "tensor":
        return "tensor"
    if param_table == "module":
        return "module"
    raise ValueError(f"param_table must be False, True, 'tensor' or 'module', not {param_table!r}")


def should_fold(fold_chains: bool | None, n_nodes: int) -> bool:
    if fold_chains is None:
        return n_nodes > LARGE_GRAPH_NODES
    if not isinstance(fold_chains, bool):
        raise ValueError(f"fold_chains must be True, False or None (automatic), not {fold_chains!r}")
    return fold_chains


def fold_note(chains: Mapping[str, Sequence[str]]) -> str | None:
    if not chains:
        return None
    n = sum(len(members) for members in chains.values())
    return (f"{n} nodes in chains (each the only reader of the previous one) are drawn as {len(chains)} boxes "
            f"listing them in order; fold_chains=False draws one box per node")


_VIEW_TITLES = {"overlay": "rewrite (original graph, changes marked)", "before": "before the rewrite",
                "after": "after the rewrite", "side_by_side": "before and after the rewrite"}


def write_rewrite_drawings(result: Any, folder: str | os.PathLike, *, formats: Sequence[str] = ("svg",),
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


__all__ = ["Drawing", "draw_graph", "draw_rewrite", "write_rewrite_drawings", "param_rows", "format_shape",
           "STATUS_STYLES", "StatusStyle", "VIEWS", "INSTALL_HINT", "LARGE_GRAPH_NODES", "LARGE_GRAPH_LAYOUT",
           "Clusters", "ClusterLabel"]
