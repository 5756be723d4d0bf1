"""``prune_unreachable``: keep only what the selected outputs need.

Outputs are chosen by position in the output structure (``outputs: [0]``,
``outputs: [[0, 1]]`` for a nested position), by key in a dict output
(``outputs: [p3, p5]``; a position there is an index into the keys in order), by
the rule's pattern (every matched node becomes an output), or left as they are.
The output keeps its container: a dict stays a dict with the selected keys, several
positions of a list stay a list (of a tuple, a tuple), and one position of a list or
tuple is that value itself. Every node the outputs
do not depend on is deleted; placeholders stay, so the signature is unchanged.
The tensors of the modules no remaining node calls are listed in the rule log as
dropped. The walk is linear in the size of the graph and of the dropped modules.

>>> import torch, fxrewrite
>>> from fxrewrite import Rule
>>> class TwoHeads(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.main, self.aux = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
...     def forward(self, x):
...         return self.main(x), self.aux(x)
>>> result = fxrewrite.rewrite(fxrewrite.trace(TwoHeads()), [Rule("main-only", "prune_unreachable", args={"outputs": [0]})])
>>> [n.name for n in result.module.graph.nodes], result.node_status["aux"]
(['x', 'main', 'output'], 'pruned')
>>> result.log[0].dropped
['aux.weight', 'aux.bias']
"""
from __future__ import annotations

from typing import Any

from torch import fx

from ..context import PRUNED, RewriteContext, reachable
from ..pattern import Match
from ..registry import BUILTINS, Param, register_action


@register_action("prune_unreachable", registry=BUILTINS, per_match=False, only_deletes=True, params={
    "outputs": Param((list,), doc="outputs to keep: positions, keys of a dict output, or [i, j, ...] paths"),
}, doc="Keep only the selected outputs (by position or by the rule's pattern) and what they need.")
def prune_unreachable(ctx: RewriteContext, matches: list[Match], outputs: list | None = None) -> None:
    output = ctx.output_node()
    value = output.args[0]
    selected = [] if outputs is None else [_at(ctx, value, p) for p in outputs]
    roots = []
    if ctx.rule.pattern is not None:
        roots = [m.root for m in matches if m.root.op != "output"]  # the output node cannot output itself
        if not roots:
            ctx.refuse("no node matched the output pattern; refusing to prune everything")
    if selected or roots:
        if isinstance(value, dict) and outputs and not roots and all(not isinstance(p, list) for p in outputs):
            keys = [_key(value, p) for p in outputs]  # a dict stays a dict, with the selected keys
            new_value = {k: value[k] for k in dict.fromkeys(keys)}
        else:
            chosen = selected + roots
            same = list if isinstance(value, list) and not roots else tuple  # fx keeps lists as immutable_list
            new_value = chosen[0] if len(chosen) == 1 else same(chosen)
        if new_value != value:
            ctx.set_args(output, (new_value,))
    keep = reachable(output, users=False)
    gone: list[str] = []
    for node in reversed(list(ctx.graph.nodes)):
        if node not in keep and node.op != "placeholder":
            if node.op in ("call_module", "get_attr"):
                gone.append(node.target)
            ctx.erase(node, PRUNED)
    used = {n.target for n in ctx.graph.nodes if n.op in ("call_module", "get_attr")}
    for target in reversed(gone):  # in graph order
        if target not in used:
            used.add(target)
            ctx.drop_tensors(target)


def _at(ctx: RewriteContext, value: Any, position: Any) -> Any:
    path = position if isinstance(position, list) else [position]
    for step in path:
        if isinstance(value, (list, tuple)) and isinstance(step, int) and -len(value) <= step < len(value):
            value = value[step]
        elif isinstance(value, dict) and not isinstance(step, bool) and (step in value or (
                isinstance(step, int) and -len(value) <= step < len(value))):
            value = value[step] if step in value else list(value.values())[step]  # a key, or a position
        elif isinstance(value, fx.Node) and step == 0 and len(path) == 1:
            return value  # a single output is position 0
        else:
            ctx.refuse(f"output position {position} does not exist in the output structure {_describe(value)}")
    return value


def _key(value: dict, position: Any) -> Any:
    """The key of a dict output a position names: the key itself, or an index into the keys in order."""
    return position if position in value else list(value)[position]  # _at has checked it exists


def _describe(value: Any) -> str:
    if isinstance(value, fx.Node):
        return f"(a single value, {value.name})"
    return repr(fx.node.map_arg(value, lambda n: n.name))
