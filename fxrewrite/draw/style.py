"""How drawings look: colours, border styles and fonts per node and edge status, and the limits
that switch large graphs to a faster layout. Owns every visual constant of :mod:`fxrewrite.draw`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..context import COLLAPSED, EDGE_ADDED, EDGE_DROPPED, EDGE_KEPT, KEPT, NEW, PRUNED, REMOVED, REPLACED

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
RIGHT = "\u2192"
