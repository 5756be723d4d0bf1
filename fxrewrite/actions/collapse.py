"""``collapse``: replace a pass-through node by one of its inputs.

>>> import torch, fxrewrite
>>> from fxrewrite import Rule, Pattern
>>> gm = fxrewrite.trace(torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity(), torch.nn.ReLU()))
>>> rule = Rule("no-identity", "collapse", Pattern(module_class="Identity"), mode="fixed_point")
>>> [n.op for n in fxrewrite.rewrite(gm, [rule]).module.graph.nodes]
['placeholder', 'call_module', 'output']
"""
from __future__ import annotations

from ..engine import COLLAPSED, RewriteContext
from ..errors import RewriteError
from ..pattern import Match, input_nodes
from ..registry import Param, register_action
from ..shapes import shape_tree


@register_action("collapse", params={
    "node": Param((str,), doc="capture of the node to collapse (default: the pattern's root)"),
    "input": Param((int,), default=0, doc="which input (in argument order) takes its place"),
}, doc="Replace every use of the node by one of its inputs, then delete it.")
def collapse(ctx: RewriteContext, match: Match, node: str = "$root", input: int = 0) -> None:
    target = ctx.resolve(node, match)
    inputs = input_nodes(target)
    if not -len(inputs) <= input < len(inputs):
        raise RewriteError(ctx.rule.name, f"cannot collapse {target.name}: it has {len(inputs)} input(s), "
                                          f"no input {input}")
    replacement = inputs[input]
    before, after = shape_tree(target), shape_tree(replacement)
    if before is not None and after is not None and before != after:
        raise RewriteError(ctx.rule.name, f"cannot collapse {target.name}: it is not a pass-through "
                                          f"(input shape {after}, output shape {before})")
    ctx.replace_uses(target, replacement)
    ctx.erase(target, COLLAPSED)
