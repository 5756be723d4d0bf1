"""``remove``: delete the matched node; with ``cascade``, also everything computed from it.

Outputs computed from a removed node are dropped from the output structure; a
node that still has users without ``cascade`` is refused (it would dangle).

>>> import torch, fxrewrite
>>> from fxrewrite import Rule, Pattern
>>> class TwoOut(torch.nn.Module):
...     def forward(self, x):
...         return torch.relu(x), torch.neg(x)
>>> rule = Rule("no-neg", "remove", Pattern(function="neg"), args={"cascade": True})
>>> [n.name for n in fxrewrite.rewrite(fxrewrite.trace(TwoOut()), [rule]).module.graph.nodes]
['x', 'relu', 'output']
"""
from __future__ import annotations

from torch import fx

from ..context import REMOVED, RewriteContext, reachable
from ..pattern import Match
from ..registry import BUILTINS, Param, register_action


@register_action("remove", registry=BUILTINS, only_deletes=True, params={
    "node": Param((str,), default="$root", doc="capture of the node to remove (default: the pattern's root)"),
    "cascade": Param((bool,), default=False, doc="also remove every node computed from it"),
}, doc="Delete the node; with cascade, its transitive users too (outputs that used them are dropped).")
def remove(ctx: RewriteContext, match: Match, *, node: fx.Node, cascade: bool) -> None:
    if not isinstance(node, fx.Node):
        ctx.refuse(f"{node} is not a node of the graph")
    if node.op in ("placeholder", "output"):  # the model's signature stays as it is
        ctx.refuse(f"cannot remove {node.name}: it is the model's "
                   f"{'input' if node.op == 'placeholder' else 'output'} node")
    if node.users and not cascade:
        ctx.refuse(f"cannot remove {node.name}: still used by {', '.join(u.name for u in node.users)} "
                   f"(use cascade: true, or collapse)")
    doomed = reachable(node, users=True)
    output = ctx.output_node()
    if output in doomed:
        doomed.discard(output)
        _drop_outputs(ctx, output, doomed, node)
    for n in _users_first(node, doomed):
        ctx.erase(n, REMOVED)


def _users_first(start: fx.Node, nodes: set[fx.Node]) -> list[fx.Node]:
    """``nodes`` (``start`` and what is computed from it) ordered so that each comes after all its users
    (a depth-first post-order over users): the order they can be erased in, in time linear in them
    rather than in the graph."""
    order: list[fx.Node] = []
    seen = {start}
    stack = [(start, iter(start.users))]
    while stack:
        node, users = stack[-1]
        user = next((u for u in users if u in nodes and u not in seen), None)
        if user is None:
            stack.pop()
            order.append(node)
        else:
            seen.add(user)
            stack.append((user, iter(user.users)))
    return order


def _drop_outputs(ctx: RewriteContext, output: fx.Node, doomed: set[fx.Node], removed: fx.Node) -> None:
    """Drop, from the output structure, every entry computed from a removed node."""

    def keep(value):
        if isinstance(value, fx.Node):
            return value not in doomed
        if isinstance(value, (list, tuple)):
            return all(keep(v) for v in value)
        if isinstance(value, dict):
            return all(keep(v) for v in value.values())
        return True

    value = output.args[0]
    if not isinstance(value, (list, tuple)) or not any(keep(v) for v in value):
        ctx.refuse(f"cannot remove {removed.name}: every output of the model depends on it")
    ctx.set_args(output, (type(value)(v for v in value if keep(v)),))
