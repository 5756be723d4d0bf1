"""``collapse``: replace a pass-through node by one of its inputs.

>>> import torch, fxrewrite
>>> from fxrewrite import Rule, Pattern
>>> gm = fxrewrite.trace(torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity(), torch.nn.ReLU()))
>>> rule = Rule("no-identity", "collapse", Pattern(module_class="Identity"), mode="fixed_point")
>>> [n.op for n in fxrewrite.rewrite(gm, [rule]).module.graph.nodes]
['placeholder', 'call_module', 'output']
"""
from __future__ import annotations

from torch import fx

from ..context import COLLAPSED, RewriteContext
from ..pattern import Match, input_nodes
from ..registry import BUILTINS, Param, register_action
from ..shapes import shape_tree


@register_action("collapse", registry=BUILTINS, params={
    "node": Param((str,), default="$root", doc="capture of the node to collapse (default: the pattern's root)"),
    "input": Param((int,), default=0, doc="which input (in argument order) takes its place"),
}, doc="Replace every use of the node by one of its inputs, then delete it.")
def collapse(ctx: RewriteContext, match: Match, *, node: fx.Node, input: int) -> None:
    inputs = input_nodes(node)
    if not -len(inputs) <= input < len(inputs):
        ctx.refuse(f"cannot collapse {node.name}: it has {len(inputs)} input(s), no input {input}")
    replacement = inputs[input]
    before, after = shape_tree(node), shape_tree(replacement)
    if before is not None and after is not None and before != after:
        ctx.refuse(f"cannot collapse {node.name}: it is not a pass-through (input shape {after}, "
                   f"output shape {before})")
    ctx.replace_uses(node, replacement)
    ctx.erase(node, COLLAPSED)
