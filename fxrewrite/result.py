"""What a rewrite returns: the new module, a log per rule, and the provenance of nodes and tensors.

Owns :class:`RewriteResult`, :class:`RuleLog` and :class:`Rejection`: plain data the
engine fills in and every later layer reads (rebinding, verification, drawings,
:func:`fxrewrite.to_networkx`). ``RewriteResult.draw`` is the one convenience that
reaches a later layer: it imports :mod:`fxrewrite.draw` when called (drawing code is
never imported by the engine, and the drawing code does not import this module).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from .context import EDGE_ADDED, EDGE_DROPPED, EDGE_KEPT, STATUSES, Construction, Origin


@dataclass
class Rejection:
    node: str
    reason: str


@dataclass
class RuleLog:
    """What one rule did: matches found, rewrites done, matches its checks rejected (with why),
    the original tensors it left unused (``dropped``: names, in order, each once) and notes."""

    rule: str
    action: str
    matches: int = 0
    rewrites: int = 0
    iterations: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.rule} ({self.action}): {self.matches} matched, {self.rewrites} rewritten"
        if self.rejected:
            text += f", {len(self.rejected)} rejected"
        if self.dropped:
            text += f", {len(self.dropped)} tensor{'s' if len(self.dropped) != 1 else ''} dropped"
        return text


@dataclass
class RewriteResult:
    """The rewritten module, the per-rule log, and provenance of its nodes and tensors.

    ``param_map`` maps every parameter/buffer name of ``module`` to the name of the
    original tensor it is, to a tuple of the original tensors it was *computed*
    from (a convolution with a BatchNorm folded in lists the convolution weight
    and the BatchNorm tensors), or to ``None`` for a tensor a rule created
    without a source.
    ``node_status`` says, for every node of ``original`` and every node a rule
    created, whether it was kept, pruned, collapsed, replaced, removed, or is new.
    ``constructions`` says, for each node of ``module`` whose module a rule built from a
    constructor call (``replace``), which call.
    """

    module: fx.GraphModule
    original: fx.GraphModule
    log: list[RuleLog]
    param_map: dict[str, Origin]
    node_status: dict[str, str]
    constructions: dict[str, Construction] = field(default_factory=dict)

    def nodes_with_status(self, status: str) -> list[str]:
        return [name for name, s in self.node_status.items() if s == status]

    def summary(self) -> str:
        lines = [str(entry) for entry in self.log]
        for entry in self.log:
            lines += [f"  rejected {r.node}: {r.reason}" for r in entry.rejected]
        counts = {s: len(self.nodes_with_status(s)) for s in STATUSES}
        lines.append("nodes: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        return "\n".join(lines)

    def edges(self, view: str = "overlay") -> list[tuple[tuple[str, str], str]]:
        """``((tail, head), status)`` for the edges of ``view``, in graph order: ``"before"`` (the
        original's edges, ``kept`` or ``dropped``), ``"after"`` (the result's, ``kept`` or ``added``)
        or ``"overlay"`` (the original's, then the added ones)."""
        old = [(t.name, n.name) for n in self.original.graph.nodes for t in n.all_input_nodes]
        new = [(t.name, n.name) for n in self.module.graph.nodes for t in n.all_input_nodes]
        old_set, new_set = set(old), set(new)
        if view == "after":
            return [(e, EDGE_KEPT if e in old_set else EDGE_ADDED) for e in new]
        found = [(e, EDGE_KEPT if e in new_set else EDGE_DROPPED) for e in old]
        if view == "overlay":
            found += [(e, EDGE_ADDED) for e in new if e not in old_set]
        elif view != "before":
            raise ValueError(f"view must be before, after or overlay, not {view!r}")
        return found

    def draw(self, **kwargs):
        """Before/after drawing of this rewrite (see :func:`fxrewrite.draw.draw_rewrite`)."""
        from .draw import draw_rewrite

        return draw_rewrite(self, **kwargs)


__all__ = ["RewriteResult", "RuleLog", "Rejection", "EDGE_KEPT", "EDGE_DROPPED", "EDGE_ADDED"]
