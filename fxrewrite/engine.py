"""The rewrite engine: apply a :class:`~fxrewrite.rules.RuleSet` to a traced module.

Owns the loop: for each rule, match its pattern, run its checks, resolve the
action's arguments and call the action on a :class:`~fxrewrite.context.RewriteContext`,
then validate the graph; finally build the result. It knows no particular action.

:func:`rewrite` never modifies its input: it copies the graph, shares the
submodules (which actions never mutate in place) and builds a new
:class:`torch.fx.GraphModule` holding only what the rewritten graph uses, so
unused submodules, parameters and buffers disappear from the result. After
every rule the graph is checked (``Graph.lint``, module targets, and, when the
trace recorded example inputs, shape propagation); a rule that would leave it
invalid raises :class:`~fxrewrite.errors.RewriteError` and nothing is returned.

>>> import torch, fxrewrite
>>> from fxrewrite import Rule, RuleSet, Pattern
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Identity(), torch.nn.ReLU())
>>> gm = fxrewrite.trace(model, torch.zeros(2, 4))
>>> result = fxrewrite.rewrite(gm, RuleSet([Rule("drop-identity", "collapse", Pattern(module_class="Identity"))]))
>>> [n.target for n in result.module.graph.nodes if n.op == "call_module"]
['0', '2']
>>> result.param_map
{'0.weight': '0.weight', '0.bias': '0.bias'}
>>> result.node_status["_1"]
'collapsed'
"""
from __future__ import annotations

from typing import Any

from torch import fx
from torch.fx.node import map_arg

from .context import COLLAPSED, KEPT, NEW, PRUNED, REMOVED, REPLACED, Origin, RewriteContext, computed_origin
from .graph_copy import copy_graph
from .errors import RewriteError
from .gcpause import gc_paused
from .pattern import Match
from .result import Rejection, RewriteResult, RuleLog
from .rules import BoundRule, Rule, RuleSet, references
from .shapes import EXAMPLE_INPUTS_META, SHAPES_ONLY_META, VALUES_META, propagate_shapes, shape_tree
from .tensors import named_tensors
from .tracing import TRACE_META

try:  # generates the module's Python code on first use (call, .code, print), not when it is built
    from torch.fx._lazy_graph_module import _LazyGraphModule as _ResultModule
except ImportError:  # pragma: no cover - older torch
    _ResultModule = fx.GraphModule


@gc_paused
def rewrite(gm: fx.GraphModule, rules: RuleSet | list[Rule], *, check_shapes: bool = True) -> RewriteResult:
    """Apply ``rules`` in order to a copy of ``gm`` and return the result with its log and provenance.

    ``gm`` should come from :func:`fxrewrite.trace`; when it was traced with
    example inputs and ``check_shapes`` is true, shapes are propagated again after
    each rule that changed the graph, and a rule that changes the shape of a node
    it did not touch (or makes propagation fail) is refused.
    """
    if not isinstance(rules, RuleSet):
        rules = RuleSet(list(rules))
    ctx = RewriteContext(gm)
    example = gm.meta.get(EXAMPLE_INPUTS_META) if check_shapes else None
    ctx.values = dict(gm.meta.get(VALUES_META) or {}) if example is not None else {}
    logs = []
    for bound in rules.bound:
        rule = bound.rule
        ctx.start_rule(rule, RuleLog(rule.name, rule.action))
        logs.append(ctx.log)
        before, acted = ctx.changes, ctx.actions_run
        touched_before = dict(ctx.status)
        ctx.signatures = _signatures(ctx) if example is not None else {}
        # Validating the previous rule built a probe module that now owns the graph; an action adding
        # a call_module node for a module only ctx.modules has would be refused by fx against it.
        ctx.graph.owning_module = None
        _apply_rule(ctx, bound, rules.max_iterations)
        ctx.end_rule()
        if ctx.changes != before or ctx.actions_run != acted:
            _validate(ctx, bound, gm, example, touched_before)
    ctx.rule = None
    # Shapes on the nodes are current: the trace propagated them, and so did every
    # validation after a rule that could change them.
    result_gm = _build(ctx, gm)
    if ctx.values:
        result_gm.meta[VALUES_META] = ctx.values
    param_map = ctx.param_map(name for name, _ in named_tensors(result_gm))
    calls = {n.name: n.target for n in result_gm.graph.nodes if n.op == "call_module"}
    constructions = {name: c for name, c in ctx.constructions.items()
                     if name in calls and ctx.modules[calls[name]] is c.module}  # still that module
    return RewriteResult(result_gm, gm, logs, param_map, _node_status(ctx, result_gm), constructions)


def _build(ctx: RewriteContext, original: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule of the current graph holding only the modules it uses."""
    used = {n.target for n in ctx.graph.nodes if n.op in ("call_module", "get_attr")}
    # Lazy: validation only interprets the graph (shape propagation), and code
    # generation is linear but costly (3-4x a dead-code pass on large graphs).
    gm = _ResultModule({t: ctx.modules[t] for t in used}, ctx.graph, class_name=type(original).__name__)
    gm.meta.update({k: v for k, v in original.meta.items() if k in (TRACE_META, EXAMPLE_INPUTS_META, SHAPES_ONLY_META)})
    return gm


def _signature(ctx: RewriteContext, node: fx.Node) -> tuple:
    """What a node computes, as far as a rule can change it: its operation, target, inputs, and
    the module object it calls (``replace`` swaps the module behind an unchanged target).

    An input with a cached value counts as that value object: a node that now reads another node
    holding the very same object (a collapsed pass-through returns its input itself) computes what
    it did, so neither it nor anything downstream is run again."""
    inputs = map_arg((node.args, node.kwargs),
                     lambda n: ("value", id(ctx.values[n.name])) if n.name in ctx.values else n.name)
    module = id(ctx.modules.get(node.target)) if node.op in ("call_module", "get_attr") else None
    return node.op, str(node.target), repr(inputs), module


def _signatures(ctx: RewriteContext) -> dict[str, tuple]:
    return {node.name: _signature(ctx, node) for node in ctx.graph.nodes}


def _unchanged_values(ctx: RewriteContext) -> dict[str, Any]:
    """Cached values of the nodes whose computation this rule changed neither directly nor upstream
    (actions never modify modules in place, so an unchanged signature means an unchanged value)."""
    affected: set[str] = set()
    for node in ctx.graph.nodes:
        if node.name not in ctx.values or ctx.signatures.get(node.name) != _signature(ctx, node) \
                or any(i.name in affected for i in node.all_input_nodes):
            affected.add(node.name)
    return {name: value for name, value in ctx.values.items() if name not in affected}


def _apply_rule(ctx: RewriteContext, bound: BoundRule, max_iterations: int) -> None:
    rule = bound.rule
    seen_rejections: set[tuple[str, str]] = set()
    while True:
        ctx.log.iterations += 1
        before = ctx.changes
        _apply_pass(ctx, bound, seen_rejections)
        if rule.mode == "once" or ctx.changes == before:
            return
        if ctx.log.iterations >= max_iterations:
            raise RewriteError(rule.name, f"did not reach a fixed point after {max_iterations} iterations "
                                          f"(each pass still rewrote; raise max_iterations or fix the rule)")


def _find_matches(ctx: RewriteContext, rule: Rule) -> list[Match]:
    if rule.pattern is None:
        return []
    found = []
    for node in list(ctx.graph.nodes):
        m = rule.pattern.match(node, ctx.modules)
        if m is not None:
            found.append(m)
    return found


def _rejection(ctx: RewriteContext, bound: BoundRule, match: Match) -> str | None:
    """The first failing check's reason, or None when every check passes."""
    for check, spec in zip(bound.rule.checks, bound.checks):
        args = ctx.resolve(list(check.args), match)
        kwargs = ctx.resolve(dict(check.kwargs), match)
        try:
            reason = spec.fn(ctx, match, *args, **kwargs)
        except RewriteError:
            raise
        except Exception as exc:  # wrong argument types, a bug in a user check: refuse, naming rule and node
            raise RewriteError(bound.rule.name, f"check {check.name!r} failed on {match.root.name}: "
                                                f"{_one_line(exc)}") from exc
        if reason:
            return f"{check.name}: {reason}"
    return None


def _apply_pass(ctx: RewriteContext, bound: BoundRule, seen: set) -> None:
    rule = bound.rule
    matches = _find_matches(ctx, rule)
    ctx.log.matches += len(matches)
    accepted = []
    for m in matches:
        reason = _rejection(ctx, bound, m)
        if reason is None:
            accepted.append(m)
        elif (m.root.name, reason) not in seen:
            seen.add((m.root.name, reason))
            ctx.log.rejected.append(Rejection(m.root.name, reason))
    if not bound.action.per_match:
        before = ctx.changes
        _run_action(ctx, bound, accepted, None)
        ctx.log.rewrites += ctx.changes != before
        return
    for m in accepted:
        if any(getattr(n, "_erased", False) for n in m.nodes()):
            continue  # an earlier rewrite in this pass removed part of it
        fresh = rule.pattern.match(m.root, ctx.modules)  # earlier rewrites may have changed it
        if fresh is None or _rejection(ctx, bound, fresh) is not None:
            continue
        _run_action(ctx, bound, fresh, fresh)
        ctx.log.rewrites += 1


def _arguments(ctx: RewriteContext, bound: BoundRule, match: Match | None) -> dict[str, Any]:
    """The action's arguments with every ``$reference`` resolved: captures first, then the values the
    action provides (computed from the other arguments) for the arguments that refer to them."""
    args = dict(bound.args)
    for key in bound.refs - bound.late if bound.late else bound.refs:
        args[key] = ctx.resolve(args[key], match)
    if bound.late:
        provides = bound.action.provides
        needed = {name for key in bound.late for name in references(bound.args[key]) if name in provides}
        extra = {name: provides[name](ctx, match, args) for name in sorted(needed)}
        args.update((key, ctx.resolve(bound.args[key], match, extra)) for key in bound.late)
    return args


def _run_action(ctx: RewriteContext, bound: BoundRule, match, root: Match | None) -> None:
    """Call the action; any error but a RewriteError (a bug in a user action, fx refusing an edit)
    becomes a RewriteError naming the rule and the node, so that nothing is half-applied silently."""
    ctx.actions_run += 1
    rule = bound.rule
    try:
        bound.action.fn(ctx, match, **_arguments(ctx, bound, root))
    except RewriteError:
        raise
    except Exception as exc:
        where = f" on {root.root.name}" if root is not None else ""
        raise RewriteError(rule.name, f"action {rule.action!r} failed{where}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return type(exc).__name__ + (f": {first[0]}" if first else "")


def _validate(ctx: RewriteContext, bound: BoundRule, original: fx.GraphModule, example, touched_before) -> None:
    rule = bound.rule
    if bound.action.only_deletes:
        # Erasing nodes (fx refuses to erase a used one) and dropping outputs cannot break
        # the topological order, add foreign nodes or targets, or change a remaining node's
        # shape: nothing to check (a lint is O(n), as long as a dead-code pass).
        return
    ctx.graph.owning_module = None  # lint against ctx.modules below, not a stale probe module
    try:
        ctx.graph.lint()
    except Exception as exc:
        first = str(exc).strip().splitlines()  # fx appends the whole graph: keep the one-line reason
        reason = first[0] if first else type(exc).__name__
        raise RewriteError(rule.name, f"the rewritten graph would be invalid: {reason}") from None
    for node in ctx.graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in ctx.modules:
            raise RewriteError(rule.name, f"node {node.name} refers to {node.target}, which does not exist")
    if example is None:
        return
    old_shapes = {n.name: shape_tree(n) for n in ctx.graph.nodes if n.op not in ("output",)}
    probe = _build(ctx, original)
    try:
        # Only what the rule changed, and what is downstream of it, is run again.
        propagate_shapes(probe, *example, known=_unchanged_values(ctx),
                         shapes_only=bool(original.meta.get(SHAPES_ONLY_META, False)))
        ctx.values = probe.meta.get(VALUES_META) or {}
    except Exception as exc:
        message = str(exc).strip().splitlines()
        raise RewriteError(rule.name, "shape propagation failed on the rewritten graph: "
                                      + (" ".join(message[:3]) or type(exc).__name__)) from None
    changed_now = {name for name, s in ctx.status.items() if touched_before.get(name) != s} | ctx.marked
    for node in ctx.graph.nodes:
        if node.op == "output" or node.name in changed_now:
            continue
        old, new = old_shapes.get(node.name), shape_tree(node)
        if old is not None and old != new:
            raise RewriteError(rule.name, f"shape mismatch at node {node.name}: it produced {old} "
                                          f"before this rule and {new} after it")


def _node_status(ctx: RewriteContext, gm: fx.GraphModule) -> dict[str, str]:
    alive = {n.name for n in gm.graph.nodes}
    status = {name: ctx.status.get(name, KEPT) for name in ctx.original_names}
    for name, s in ctx.status.items():
        if s == NEW and name in alive:
            status[name] = NEW
    return status


__all__ = ["rewrite", "RewriteResult", "RewriteContext", "RuleLog", "Rejection", "copy_graph", "Origin",
           "computed_origin", "KEPT", "PRUNED", "COLLAPSED", "REPLACED", "REMOVED", "NEW"]
