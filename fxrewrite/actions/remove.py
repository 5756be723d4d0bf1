"""``remove``: delete the matched node; with ``cascade``, also everything computed from it.

Outputs computed from a removed node are dropped from the output structure; a
node that still has users without ``cascade`` is refused (it would dangle).
"""
from __future__ import annotations

from torch import fx

from ..engine import REMOVED, RewriteContext
from ..errors import RewriteError
from ..pattern import Match
from ..registry import Param, register_action


@register_action("remove", only_deletes=True, params={
    "node": Param((str,), doc="capture of the node to remove (default: the pattern's root)"),
    "cascade": Param((bool,), default=False, doc="also remove every node computed from it"),
}, doc="Delete the node; with cascade, its transitive users too (outputs that used them are dropped).")
def remove(ctx: RewriteContext, match: Match, node: str = "$root", cascade: bool = False) -> None:
    target = ctx.resolve(node, match)
    if not isinstance(target, fx.Node):
        raise RewriteError(ctx.rule.name, f"{node} is not a node of the graph")
    if target.op in ("placeholder", "output"):  # the model's signature stays as it is
        raise RewriteError(ctx.rule.name, f"cannot remove {target.name}: it is the model's "
                                          f"{'input' if target.op == 'placeholder' else 'output'} node")
    users = [u for u in target.users]
    if users and not cascade:
        raise RewriteError(ctx.rule.name, f"cannot remove {target.name}: still used by "
                                          f"{', '.join(u.name for u in users)} (use cascade: true, or collapse)")
    doomed = _transitive_users(target)
    output = ctx.output_node()
    if output in doomed:
        doomed.discard(output)
        _drop_outputs(ctx, output, doomed, target)
    for n in reversed(list(ctx.graph.nodes)):
        if n in doomed:
            ctx.erase(n, REMOVED)


def _transitive_users(node: fx.Node) -> set[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


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
        raise RewriteError(ctx.rule.name, f"cannot remove {removed.name}: every output of the model depends on it")
    output.args = (type(value)(v for v in value if keep(v)),)
    ctx.changes += 1
