"""Chain folding: a run of operations that execute one after the other (a conv -> batch norm ->
activation block) drawn as one box listing them, which halves the boxes and ranks of a big
graph. Owns the rule for what forms a chain.
"""
from __future__ import annotations

from typing import Mapping

from ..context import EDGE_ADDED, EDGE_DROPPED, EDGE_KEPT, NEW, PRUNED, REMOVED
from .picture import DrawnNode, Picture

_UNFOLDED_OPS = ("placeholder", "output", "get_attr")


def find_chains(pic: Picture, paths: Mapping[str, tuple[str, ...]]) -> dict[str, list[DrawnNode]]:
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
    chains: dict[str, list[DrawnNode]] = {}
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


__all__ = ["find_chains"]
