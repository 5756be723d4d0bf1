"""DOT output: each picture's nodes, boxes and edges written as Graphviz source, with the layout
hints that keep big drawings readable and fast (the spine, chain boxes, iteration limits).
Owns everything Graphviz-specific but rendering (:mod:`fxrewrite.draw.files`).
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import graphviz
from graphviz.quoting import quote as _graphviz_quote

from ..context import EDGE_DROPPED, KEPT
from ..naming import Rename
from .chains import find_chains
from .clusters import Box, Clusters, cluster_paths, cluster_tree
from .labels import cluster_label, esc, node_label
from .picture import DrawnNode, Picture
from .style import (CLUSTER_FILLS, EDGE_STYLES, FONT, LARGE_GRAPH_LAYOUT, LARGE_GRAPH_NODES, MUTED, STATUS_STYLES,
                    TEXT, StatusStyle)


def node_attrs(n: DrawnNode, status_text: bool, group: str | None = None) -> str:
    """The node's DOT attribute list (``label`` first, then sorted, as the graphviz package writes it)."""
    before_group, after_group = node_style(n.op, n.status)
    group_text = f" group={quote(group)}" if group else ""
    return (f"label={quote(node_label(n, status_text))} {before_group}{group_text} {after_group} "
            f"tooltip={quote(n.tooltip)}")


_NODE_STYLES: dict[tuple[str, str | None, StatusStyle], tuple[str, str]] = {}


def node_style(op: str, status: str | None) -> tuple[str, str]:
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
        text = {k: f"{k}={quote(v)}" for k, v in attrs.items()}
        _NODE_STYLES[key] = (" ".join(text[k] for k in ("class", "color", "fillcolor")),
                             " ".join(text[k] for k in ("penwidth", "shape", "style")))
    return _NODE_STYLES[key]


_PLAIN_ID = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*|-?(\.[0-9]+|[0-9]+(\.[0-9]*)?))$")
_KEYWORDS = {"node", "edge", "graph", "digraph", "subgraph", "strict"}


def quote(value: str) -> str:
    """``graphviz.quoting.quote`` (same text), with fast paths for the common cases."""
    if value.startswith("<"):  # an HTML-like label
        return value if value.endswith(">") else _graphviz_quote(value)
    if _PLAIN_ID.match(value):
        return value if value.lower() not in _KEYWORDS else f'"{value}"'
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    return _graphviz_quote(value)


def a_list(attrs: Mapping[str, str]) -> str:
    """``key=value ...`` as the graphviz package writes it: ``label`` first, then sorted, values quoted."""
    label = attrs.get("label")
    parts = [f"label={quote(label)}"] if label is not None else []
    parts += [f"{k}={quote(v)}" for k, v in sorted(attrs.items()) if k != "label" and v is not None]
    return " ".join(parts)


def emit_picture(g: graphviz.Digraph, pic: Picture, *, prefix: str, clusters: Clusters, status_text: bool,
                 cluster_ids: list[int], fold: bool = False, chains: dict[str, list[str]] | None = None,
                 rename: Rename | None = None) -> dict[str, tuple[str, ...]]:
    """Add ``pic``'s nodes (grouped into clusters) and edges to ``g``; node ids are ``prefix + name``.

    ``rename`` (module paths) names renamed boxes by their new and old names.
    With ``fold``, each chain of operations (see :func:`find_chains`) is drawn as one box listing them,
    whose id is its first node's; ``chains`` then receives box id -> the ids of the nodes it lists.
    The DOT lines are written straight into the graphs' bodies (what ``Digraph.node`` / ``.edge``
    would write, without their per-call overhead: a big graph has thousands of nodes and edges).
    """
    paths = cluster_paths(pic.nodes, clusters)
    automatic = clusters is None or clusters is True or isinstance(clusters, int)
    io = {n.name for n in pic.nodes if n.op in ("placeholder", "output")}
    tree = cluster_tree([n.name for n in pic.nodes], paths, automatic, io)
    by_name = {n.name: n for n in pic.nodes}
    on_spine, spine_edges = spine_of(pic)
    placed: dict[str, tuple[str, ...]] = {}
    folded = find_chains(pic, paths) if fold else {}
    drawn_as = {m.name: head for head, members in folded.items() for m in members}  # node -> its box
    if chains is not None:
        chains.update({prefix + head: [prefix + m.name for m in members] for head, members in folded.items()})
    ids = {n.name: quote(prefix + n.name) for n in pic.nodes}
    spine_group = f"{prefix}spine"

    def add_nodes(sub: graphviz.Digraph, box: Box, depth: int) -> None:
        lines = sub.body
        for name in box.nodes:
            placed[prefix + name] = box.key
            head = drawn_as.get(name)
            if head is None:
                attrs = node_attrs(by_name[name], status_text, spine_group if name in on_spine else None)
            elif head == name:
                members = folded[name]
                attrs = chain_attrs(members, status_text,
                                    spine_group if any(m.name in on_spine for m in members) else None)
            else:  # drawn in its chain's box
                continue
            lines.append(f"\t{ids[name]} [{attrs}]\n")
        for key, child in box.boxes.items():
            cluster_ids[0] += 1
            with sub.subgraph(name=f"cluster_{cluster_ids[0]}") as c:
                c.attr(label=cluster_label(key, pic.module_classes, rename), labeljust="l", labelloc="t",
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
            text = a_list(attrs)
        else:
            text = edge_attrs.get((e.status, spine_edge))
            if text is None:
                attrs = dict(EDGE_STYLES[e.status])
                attrs["class"] = f"fx-edge edge-{e.status}"
                if spine_edge:
                    attrs["weight"] = "8"
                text = edge_attrs[e.status, spine_edge] = a_list(attrs)
        g.body.append(f"\t{ids.get(tail) or quote(prefix + tail)} -> "
                      f"{ids.get(head) or quote(prefix + head)} [{text}]\n")
    return placed


def chain_attrs(members: Sequence[DrawnNode], status_text: bool, group: str | None) -> str:
    """DOT attributes of a box listing a chain: one row per node (name and kind), its output shape
    where it differs from the next node's, the status tag once."""
    first = members[0]
    rows = []
    for i, n in enumerate(members):
        text = f"<B>{esc(n.name)}</B>"
        if n.kind != n.name:
            text += f'  <FONT POINT-SIZE="10">{esc(n.kind)}</FONT>'
        rows.append(f'<TR><TD ALIGN="LEFT">{text}</TD></TR>')
        if n.shape and (i == len(members) - 1 or members[i + 1].shape != n.shape):
            rows.append(f'<TR><TD ALIGN="LEFT"><FONT POINT-SIZE="9" COLOR="{MUTED}">{esc(n.shape)}</FONT></TD></TR>')
    if status_text and first.status and first.status != KEPT:
        style = STATUS_STYLES.get(first.status)
        rows.append(f'<TR><TD ALIGN="LEFT"><FONT POINT-SIZE="8" COLOR="{TEXT}"><I>'
                    f'{esc(style.tag if style else first.status)}</I></FONT></TD></TR>')
    label = '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">' + "".join(rows) + "</TABLE>>"
    ops = {n.op for n in members}
    before_group, after_group = node_style(ops.pop() if len(ops) == 1 else "call_function", first.status)
    before_group = before_group.replace('class="fx-node ', 'class="fx-node fx-chain ', 1)
    group_text = f" group={quote(group)}" if group else ""
    tooltip = f"{len(members)} operations, one after the other:\n\n" + "\n\n".join(n.tooltip for n in members)
    return f"label={label} {before_group}{group_text} {after_group} tooltip={quote(tooltip)}"


def spine_of(pic: Picture) -> tuple[set[str], set[tuple[str, str]]]:
    """The longest chain of surviving nodes (networkx's ``dag_longest_path``), and its edges.

    Why: dot places each edge so as to minimise the sum of weight x length, so
    giving the edges of the longest path a high weight (and its nodes one
    ``group``) keeps that main chain straight and vertical, and the skip
    connections and side branches are routed around it instead of the main path
    zig-zagging between them. Dropped edges count little, so in an overlay the
    chain follows what survives the rewrite.
    """
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(n.name for n in pic.nodes)
    for e in pic.edges:  # a repeated edge: the last one counts
        g.add_edge(e.tail, e.head, weight=0.1 if e.status == EDGE_DROPPED else 1.0)
    if not g:
        return set(), set()
    try:
        path = nx.dag_longest_path(g, weight="weight")
    except nx.NetworkXUnfeasible:  # a cycle (only possible in a hand-made overlay): no hints
        return set(), set()
    return set(path), set(zip(path, path[1:]))


def new_digraph(name: str, rankdir: str) -> graphviz.Digraph:
    if rankdir not in ("TB", "LR", "BT", "RL"):
        raise ValueError(f"rankdir must be TB, LR, BT or RL, not {rankdir!r}")
    g = graphviz.Digraph(name=name)
    g.attr(rankdir=rankdir, compound="true", fontname=FONT, nodesep="0.25", ranksep="0.32",
           bgcolor="white", pad="0.2", labelloc="t", labeljust="l")
    g.attr("node", fontname=FONT, fontsize="12", fontcolor=TEXT, margin="0.12,0.05", height="0.3")
    g.attr("edge", fontname=FONT, arrowsize="0.7")
    return g


def finish(g: graphviz.Digraph, body: Callable[[graphviz.Digraph], None], table: str | None,
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


__all__ = ["emit_picture", "new_digraph", "finish", "spine_of", "quote", "a_list"]
