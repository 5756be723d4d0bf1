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

An action is ``fn(ctx, match, **args)``: ``args`` are the rule's ``args`` with every
``$reference`` resolved (here, the two captured nodes); ``ctx``
(:class:`fxrewrite.RewriteContext`) holds the graph being rewritten, and the action
changes it only through the context's verbs (``add_module``, ``insert_call``,
``replace_uses``, ``erase``, ``refuse``...), which keep node status and tensor
provenance right.

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
from fxrewrite.context import REMOVED
from fxrewrite.pattern import Match


@register_action("swish_to_silu", params={
    "mul": Param((str,), required=True, doc="capture of the multiplication node x * sigmoid(x)"),
    "sigmoid": Param((str,), required=True, doc="capture of the sigmoid(x) node"),
    "prefix": Param((str,), default="silu", doc="name prefix of the new SiLU modules"),
}, doc="Replace x * sigmoid(x) by one call of a new nn.SiLU module.")
def swish_to_silu(ctx: RewriteContext, match: Match, *, mul: fx.Node, sigmoid: fx.Node, prefix: str) -> None:
    (x,) = sigmoid.args
    if set(sigmoid.users) != {mul}:  # the rule checks it too (num_users: 1): never trust a pattern alone
        ctx.refuse(f"{sigmoid.name} is used elsewhere too")
    silu = ctx.add_module(nn.SiLU(), prefix)  # a new module without tensors: no provenance to record
    call = ctx.insert_call(silu, (x,), before=mul, like=mul)  # status "new", the multiplication's provenance
    ctx.replace_uses(mul, call)
    ctx.erase(mul, REMOVED)
    ctx.erase(sigmoid, REMOVED)


__all__ = ["swish_to_silu"]
