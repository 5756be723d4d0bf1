"""Shared modules: one module object called by several nodes (a residual block's ``self.relu``).

When an action replaces the module of one of its call sites
(:meth:`fxrewrite.context.RewriteContext.set_module`), that site first gets a target of its
own (``layer1.0.relu_1``: the same module object, so the same tensors and origins), and the
action replaces that. After the rule (:func:`join_call_sites`):

* if the rule replaced the module at *every* call site by equivalent modules (same class, same
  tensor objects, same settings), the module is replaced once: every site calls the new module
  under the original name, as if the module had never been shared;
* otherwise each replaced site keeps its own module (its tensors still shared with the original
  where the action kept them) and the sites the rule did not match keep the original module.

>>> import torch, fxrewrite
>>> from fxrewrite import Pattern, Rule
>>> class Twice(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.relu = torch.nn.ReLU()
...     def forward(self, x):
...         return self.relu(self.relu(x) - 1)
>>> gm = fxrewrite.trace(Twice(), torch.zeros(2))
>>> every = Rule("gelu", "replace", Pattern(module_class="ReLU"), args={"with": "nn.GELU"})
>>> [(n.name, n.target) for n in fxrewrite.rewrite(gm, [every]).module.graph.nodes if n.op == "call_module"]
[('relu', 'relu'), ('relu_1', 'relu')]
>>> after_sub = Rule("gelu", "replace", Pattern(module_class="ReLU", inputs=[Pattern(function="sub")]),
...                  args={"with": "nn.GELU"})
>>> result = fxrewrite.rewrite(gm, [after_sub])
>>> [(n.name, n.target, type(result.module.get_submodule(n.target)).__name__)
...  for n in result.module.graph.nodes if n.op == "call_module"]
[('relu', 'relu', 'ReLU'), ('relu_1', 'relu_1', 'GELU')]
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import fx, nn

from .tensors import named_tensors

# Plain settings compared between the modules of two call sites (eps, inplace, approximate...).
_SETTINGS = (bool, int, float, str, tuple, type(None))


def calls_of(graph: fx.Graph, target: str) -> Iterable[fx.Node]:
    """The nodes calling module ``target`` (fx's node index: no scan of the graph)."""
    find = getattr(graph, "find_nodes", None)
    if find is not None:
        return find(op="call_module", target=target)
    return [n for n in graph.nodes if n.op == "call_module" and n.target == target]  # pragma: no cover


def split_call_site(ctx: Any, node: fx.Node) -> None:
    """Give ``node``, one of several callers of a module, a target of its own: a new name for the same
    module object, whose tensors have the same origins (``ctx.copies`` remembers it for the rule)."""
    shared = node.target
    k = 1
    while f"{shared}_{k}" in ctx.modules or any(p in ctx.modules for p in _prefixes(f"{shared}_{k}")):
        k += 1
    target = f"{shared}_{k}"
    ctx.modules[target] = ctx.modules[shared]
    ctx._index(target, {target + name[len(shared):]: ctx.origin(name) for name in ctx._tensors_of.get(shared, ())})
    ctx.copies[target] = shared
    ctx.split_from.add(shared)
    node.target = target


def join_call_sites(ctx: Any) -> None:
    """At the end of a rule: a module the rule replaced at every call site, by equivalent modules, is
    one module again under its own name; see the module docstring."""
    by_shared: dict[str, list[str]] = {}
    for copy, shared in ctx.copies.items():
        by_shared.setdefault(shared, []).append(copy)
    ctx.copies, ctx.split_from = {}, set()
    for shared, copies in by_shared.items():
        if any(True for _ in calls_of(ctx.graph, shared)):
            continue  # some call sites kept the original module: each replaced one keeps its own
        modules = [ctx.modules[c] for c in copies]
        if all(_equivalent(modules[0], m) for m in modules[1:]):
            _join(ctx, shared, copies)
        else:  # every site has a module of its own now: what none of them took is dropped
            kept = {o for c in copies for name in ctx._tensors_of.get(c, ()) for o in _names(ctx.origin(name))}
            ctx._log_dropped(o for name in ctx._tensors_of.get(shared, ())
                             for o in _names(ctx.origin(name)) if o not in kept)


def _join(ctx: Any, shared: str, copies: list[str]) -> None:
    first = copies[0]
    origins = {shared + name[len(first):]: ctx.origin(name) for name in ctx._tensors_of.get(first, ())}
    kept = {o for origin in origins.values() for o in _names(origin)}
    ctx._log_dropped(o for name in ctx._tensors_of.get(shared, ()) for o in _names(ctx.origin(name)) if o not in kept)
    for target in (shared, *copies):
        for name in ctx._tensors_of.pop(target, ()):
            ctx._origins.pop(name, None)
    for copy in copies:
        for node in list(calls_of(ctx.graph, copy)):
            node.target = shared
    ctx._index(shared, origins)
    ctx.modules[shared] = ctx.modules[first]
    for copy in copies:
        del ctx.modules[copy]


def _names(origin: Any) -> tuple[str, ...]:
    return origin if isinstance(origin, tuple) else () if origin is None else (origin,)


def _prefixes(target: str) -> list[str]:
    """``a``, ``a.b`` for ``a.b.c``: the modules a new target would be placed under."""
    parts = target.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _equivalent(a: nn.Module, b: nn.Module) -> bool:
    """Two modules a rule built for two call sites compute the same thing: same class, the same
    tensor objects under the same names, the same plain settings, submodule by submodule."""
    ta, tb = dict(named_tensors(a)), dict(named_tensors(b))
    if ta.keys() != tb.keys() or any(ta[k] is not tb[k] for k in ta):
        return False
    ma, mb = dict(a.named_modules()), dict(b.named_modules())
    return ma.keys() == mb.keys() and all(type(ma[k]) is type(mb[k]) and _settings(ma[k]) == _settings(mb[k])
                                          for k in ma)


def _settings(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items() if isinstance(v, _SETTINGS)}


__all__ = ["calls_of", "split_call_site", "join_call_sites"]
