"""What drawings say: each node's label, kind, shape and tooltip, cluster labels, the legend and the
parameter table, as Graphviz HTML-like labels. Owns every text of :mod:`fxrewrite.draw`.
"""
from __future__ import annotations

import html
import operator
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from torch import fx

from ..context import KEPT, NEW, REMOVED
from ..naming import Rename, rename_path
from ..provenance import META_KEY
from ..shapes import shape_tree
from .style import (ARROW_FONT, EDGE_DROPPED, EDGE_ADDED, EDGE_STYLES, LEFT, LEGEND_ORDER, MUTED, RIGHT,
                    STATUS_STYLES, TEXT)

if TYPE_CHECKING:  # pragma: no cover
    from .picture import DrawnNode

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


class Texts:
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


def node_label(n: DrawnNode, status_text: bool) -> str:
    """A node's HTML-like label: its name (or new name and old one), kind, shape, and status tag."""
    rows = [f'<B>{esc(n.renamed[0])}</B> <FONT COLOR="{MUTED}">{esc(LEFT)} {esc(n.renamed[1])}</FONT>'
            if n.renamed else f'<B>{esc(n.name)}</B>']
    if n.kind != n.name:
        rows.append(f'<FONT POINT-SIZE="10">{esc(n.kind)}</FONT>')
    if n.shape:
        rows.append(f'<FONT POINT-SIZE="9" COLOR="{MUTED}">{esc(n.shape)}</FONT>')
    if status_text and n.status and n.status != KEPT:
        style = STATUS_STYLES.get(n.status)
        tag = style.tag if style else n.status
        rows.append(f'<FONT POINT-SIZE="8" COLOR="{TEXT}"><I>{esc(tag)}</I></FONT>')
    return "<" + "<BR/>".join(rows) + ">"


def cluster_label(key: tuple[str, ...], classes: Mapping[str, str], rename: Rename | None = None) -> str:
    """A box's label: its name (with ``rename``, the new name and the old one where they differ) and,
    when it is a module path, the module's class."""
    name = key[-1]
    new = rename_path(name, rename) if rename is not None else name
    text = f"<B>{esc(new)}</B>"
    if new != name:
        text += f" <FONT COLOR=\"{MUTED}\">{esc(LEFT)} {esc(name)}</FONT>"
    cls = classes.get(name)
    if cls:
        return f"<{text}  <FONT COLOR=\"{MUTED}\">{esc(cls)}</FONT>>"
    return f"<{text}>"


def legend(title: str | None, counts: Mapping[str, int] | None, subtitle: str | None,
           edges: Iterable[str] = (), note: str | None = None) -> str | None:
    """An HTML-like label: the title, then one swatch per status (with its count) and the edge styles."""
    rows = []
    if title:
        rows.append(f'<TR><TD ALIGN="LEFT" COLSPAN="20"><FONT POINT-SIZE="16"><B>{esc(title)}</B></FONT></TD></TR>')
    if subtitle:
        rows.append(f'<TR><TD ALIGN="LEFT" COLSPAN="20"><FONT POINT-SIZE="10" COLOR="{MUTED}">{esc(subtitle)}'
                    f'</FONT></TD></TR>')
    if counts is not None:
        cells = []
        for status in LEGEND_ORDER:
            if status == REMOVED and not counts.get(status):
                continue
            s = STATUS_STYLES[status]
            border_style = f' STYLE="{s.border_style}"' if s.border_style else ""
            cells.append(f'<TD BGCOLOR="{s.fill}" COLOR="{s.border}" BORDER="{2 if s.penwidth > 2 else 1}"'
                         f'{border_style} CELLPADDING="4" TITLE="{esc(s.description)}">'
                         f'<FONT POINT-SIZE="10">{esc(s.label)} ({counts.get(status, 0)})</FONT></TD>')
        edge_cells = []
        names = {EDGE_DROPPED: "edge dropped \u2013 \u2013 \u25b7", EDGE_ADDED: "edge added \u2501\u2501\u25b6"}
        for e in edges:
            if e in names:
                color = EDGE_STYLES[e]["color"]
                edge_cells.append(f'<TD CELLPADDING="4"><FONT POINT-SIZE="10" COLOR="{color}">{names[e]}</FONT></TD>')
        rows.append('<TR><TD ALIGN="LEFT" CELLPADDING="4"><FONT POINT-SIZE="10"><B>legend</B></FONT></TD>'
                    + "".join(cells) + "".join(edge_cells) + "</TR>")
    if note:
        rows.append(f'<TR><TD ALIGN="LEFT" COLSPAN="20"><FONT POINT-SIZE="10" COLOR="{MUTED}"><I>{esc(note)}</I>'
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


def param_table_label(rows: list[tuple[str, str | None, str]], max_rows: int, title: str,
                 with_origin: bool = True) -> str:
    head = (f'<TR><TD COLSPAN="4" ALIGN="LEFT"><FONT POINT-SIZE="11"><B>{esc(title)}</B></FONT></TD></TR>'
            '<TR><TD ALIGN="LEFT" BGCOLOR="#E9E9E9"><B>new name</B></TD>'
            + ('<TD BGCOLOR="#E9E9E9"></TD><TD ALIGN="LEFT" BGCOLOR="#E9E9E9"><B>original name</B></TD>'
               if with_origin else "")
            + '<TD ALIGN="LEFT" BGCOLOR="#E9E9E9"><B>shape</B></TD></TR>')
    body = []
    for new, old, shape in rows[:max_rows]:
        if not with_origin:
            origin = ""
        elif old is None:
            origin = (f'<TD>{esc(LEFT)}</TD><TD ALIGN="LEFT"><FONT COLOR="{STATUS_STYLES[NEW].border}">'
                      f'<I>(new tensor)</I></FONT></TD>')
        elif old == new:
            origin = f'<TD>{esc(LEFT)}</TD><TD ALIGN="LEFT"><FONT COLOR="{MUTED}">{esc(old)}</FONT></TD>'
        else:
            origin = f'<TD>{esc(LEFT)}</TD><TD ALIGN="LEFT"><B>{esc(old)}</B></TD>'
        body.append(f'<TR><TD ALIGN="LEFT">{esc(new)}</TD>{origin}'
                    f'<TD ALIGN="LEFT"><FONT COLOR="{MUTED}">{esc(shape)}</FONT></TD></TR>')
    if len(rows) > max_rows:
        body.append(f'<TR><TD COLSPAN="4" ALIGN="LEFT"><I>\u2026 {len(rows) - max_rows} more rows '
                    f'(param_table="module" folds them by module)</I></TD></TR>')
    return ('<<TABLE BORDER="1" COLOR="#B5B5B5" CELLBORDER="0" CELLSPACING="0" CELLPADDING="3" '
            'BGCOLOR="#FFFFFF"><TR><TD>'
            '<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="2">'
            + head + "".join(body) + "</TABLE></TD></TR></TABLE>>")



def esc(text: Any) -> str:
    """Escape for an HTML-like label; arrows in DejaVu Sans, whose arrows are legible at small sizes."""
    text = html.escape(str(text), quote=True)
    for arrow in (RIGHT, LEFT):
        text = text.replace(arrow, f'<FONT FACE="{ARROW_FONT}">{arrow}</FONT>')
    return text



__all__ = ["format_shape", "param_rows", "Texts", "node_label", "cluster_label", "legend", "param_table_label", "esc"]
