"""The Python half of ``swish-to-silu.yaml``: an action registered by name, ``swish_to_silu``.

Some models spell the SiLU ("swish") activation out as operations,
``x * torch.sigmoid(x)``. The rule file finds that pair of nodes; this action
replaces it by one call of a new ``nn.SiLU`` module, which exporters and the
fusion rules recognise. Importing this module registers the action, so import it
before loading the rule file (a rule naming an unregistered action is refused
when the file is loaded, not when it runs)::

    import fxrewrite
    import fxrewrite.rulesets.examples.swish_to_silu   # registers "swish_to_silu"

    rules = fxrewrite.load_rules("examples/swish-to-silu")
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), rules)

An action is ``fn(ctx, match, **args)``: ``ctx`` (:class:`fxrewrite.RewriteContext`)
holds the graph being rewritten and the modules it calls; ``match`` the nodes the
pattern captured; ``args`` the rule's ``args`` (``$name`` references are passed
as written: ``ctx.resolve`` turns them into nodes). It edits the graph through the
context's helpers, which keep node status and tensor provenance right.

>>> import torch, fxrewrite
>>> class Net(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fc = torch.nn.Linear(4, 4)
...     def forward(self, x):
...         y = self.fc(x)
...         return y * torch.sigmoid(y)
>>> result = fxrewrite.rewrite(fxrewrite.trace(Net(), torch.zeros(1, 4)),
...                            fxrewrite.load_rules("examples/swish-to-silu"))
>>> [n.name for n in result.module.graph.nodes], result.node_status["mul"]
(['x', 'fc', 'silu_0', 'output'], 'removed')
"""
from __future__ import annotations

from torch import fx, nn

from fxrewrite import Param, RewriteContext, register_action
from fxrewrite.engine import REMOVED
from fxrewrite.errors import RewriteError
from fxrewrite.pattern import Match


@register_action("swish_to_silu", params={
    "mul": Param((str,), required=True, doc="capture of the multiplication node x * sigmoid(x)"),
    "sigmoid": Param((str,), required=True, doc="capture of the sigmoid(x) node"),
    "prefix": Param((str,), default="silu", doc="name prefix of the new SiLU modules"),
}, doc="Replace x * sigmoid(x) by one call of a new nn.SiLU module.")
def swish_to_silu(ctx: RewriteContext, match: Match, *, mul: str, sigmoid: str, prefix: str = "silu") -> None:
    mul_node, sigmoid_node = ctx.resolve(mul, match), ctx.resolve(sigmoid, match)
    (x,) = sigmoid_node.args
    if set(sigmoid_node.users) != {mul_node}:  # the rule checks it too (num_users: 1): never trust a pattern alone
        raise RewriteError(ctx.rule.name, f"{sigmoid_node.name} is used elsewhere too")
    target = _free_target(ctx, prefix)
    ctx.modules[target] = nn.SiLU()  # a new module: no tensors, so no provenance to record
    with ctx.graph.inserting_before(mul_node):
        silu = ctx.graph.call_module(target, (x,))
    ctx.note_new(silu, like=mul_node)  # status "new"; it inherits the multiplication's provenance
    ctx.replace_uses(mul_node, silu)
    ctx.erase(mul_node, REMOVED)
    ctx.erase(sigmoid_node, REMOVED)


def _free_target(ctx: RewriteContext, prefix: str) -> str:
    """The first ``prefix_N`` that is neither a module nor a node name of the graph."""
    names = {n.name for n in ctx.graph.nodes}
    k = 0
    while f"{prefix}_{k}" in ctx.modules or f"{prefix}_{k}" in names:
        k += 1
    return f"{prefix}_{k}"


__all__ = ["swish_to_silu"]
