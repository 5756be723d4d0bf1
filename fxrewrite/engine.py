"""The rewrite engine: apply a :class:`~fxrewrite.rules.RuleSet` to a traced module.

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

import contextlib
import copy
import gc
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import fx, nn
from torch.fx.node import map_arg

from . import registry
from .errors import RewriteError
from .pattern import Match, input_nodes
from .provenance import derive, mark_changed
from .rules import Rule, RuleSet
from .shapes import EXAMPLE_INPUTS_META, VALUES_META, propagate_shapes, shape_tree
from .tensors import bind_tensor, named_tensors
from .tracing import TRACE_META

try:  # generates the module's Python code on first use (call, .code, print), not when it is built
    from torch.fx._lazy_graph_module import _LazyGraphModule as _ResultModule
except ImportError:  # pragma: no cover - older torch
    _ResultModule = fx.GraphModule

# Where a tensor of a rewritten module comes from: the original tensor it is (its name), the
# original tensors it was computed from (a tuple of names), or nothing (None, a new tensor).
Origin = str | tuple[str, ...] | None

# What happened to a node of the input graph (``node_status``); nodes created by rules are "new".
KEPT, PRUNED, COLLAPSED, REPLACED, REMOVED, NEW = "kept", "pruned", "collapsed", "replaced", "removed", "new"


@dataclass
class Rejection:
    node: str
    reason: str


@dataclass
class RuleLog:
    """What one rule did: matches found, rewrites done, matches its checks rejected (with why)."""

    rule: str
    action: str
    matches: int = 0
    rewrites: int = 0
    iterations: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # original tensor names the rule dropped
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.rule} ({self.action}): {self.matches} matched, {self.rewrites} rewritten"
        if self.rejected:
            text += f", {len(self.rejected)} rejected"
        if self.dropped:
            text += f", {len(self.dropped)} tensor{'s' if len(self.dropped) != 1 else ''} dropped"
        return text


@dataclass
class RewriteResult:
    """The rewritten module, the per-rule log, and provenance of its nodes and tensors.

    ``param_map`` maps every parameter/buffer name of ``module`` to the name of the
    original tensor it is, to a tuple of the original tensors it was *computed*
    from (a convolution with a BatchNorm folded in lists the convolution weight
    and the BatchNorm tensors), or to ``None`` for a tensor a rule created
    without a source.
    ``node_status`` says, for every node of ``original`` and every node a rule
    created, whether it was kept, pruned, collapsed, replaced, removed, or is new.
    """

    module: fx.GraphModule
    original: fx.GraphModule
    log: list[RuleLog]
    param_map: dict[str, Origin]
    node_status: dict[str, str]

    def nodes_with_status(self, status: str) -> list[str]:
        return [name for name, s in self.node_status.items() if s == status]

    def summary(self) -> str:
        lines = [str(entry) for entry in self.log]
        for entry in self.log:
            lines += [f"  rejected {r.node}: {r.reason}" for r in entry.rejected]
        counts = {s: len(self.nodes_with_status(s)) for s in (KEPT, PRUNED, COLLAPSED, REPLACED, REMOVED, NEW)}
        lines.append("nodes: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        return "\n".join(lines)

    def draw(self, **kwargs):
        """Before/after drawing of this rewrite (see :func:`fxrewrite.draw.draw_rewrite`)."""
        from .draw import draw_rewrite

        return draw_rewrite(self, **kwargs)


class RewriteContext:
    """The mutable state actions work on: a copy of the graph and the modules it calls.

    Actions change the graph through these helpers so that node status, tensor
    provenance and the change counter stay right; they may also edit
    ``ctx.graph`` directly and call :meth:`note_new` / :meth:`mark` themselves.
    """

    def __init__(self, gm: fx.GraphModule):
        self.graph, self._val_map = copy_graph(gm.graph)
        # Node values from the last shape propagation, and what each node computed when the
        # current rule started: validation re-runs only what the rule changed (see _validate).
        self.values: dict[str, Any] = {}
        self.signatures: dict[str, tuple] = {}
        self.original_names = [n.name for n in gm.graph.nodes]
        self.modules: dict[str, Any] = {}
        self.param_origin: dict[str, Origin] = {}  # current tensor name -> its origin (see RewriteResult)
        for node in self.graph.nodes:
            if node.op in ("call_module", "get_attr") and node.target not in self.modules:
                value = _get_attr(gm, node.target)
                self.modules[node.target] = value
                if isinstance(value, nn.Module):
                    self.param_origin.update((n, n) for n, _ in named_tensors(value, node.target))
                elif isinstance(value, torch.Tensor):
                    self.param_origin[node.target] = node.target
        self.status: dict[str, str] = {}
        self.marked: set[str] = set()  # nodes marked by the current rule (a node replaced twice stays "replaced")
        self.changes = 0
        self.actions_run = 0  # calls of actions: one that edited the graph without counting is validated too
        self.rule: Rule | None = None
        self.log: RuleLog | None = None

    # -- lookups ------------------------------------------------------------
    def module(self, node: fx.Node) -> nn.Module:
        if node.op != "call_module":
            raise RewriteError(self._rule_name(), f"node {node.name} is a {node.op}, not a module call")
        return self.modules[node.target]

    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    def resolve(self, value: Any, match: Match | None, extra: Mapping[str, Any] | None = None) -> Any:
        """Replace ``$capture`` by the captured node and ``$capture.attr`` by its module's attribute.

        ``$capture.shape`` is the captured node's propagated output shape; ``extra``
        provides action-specific names (``$kept_inputs`` in ``replace``).
        """
        if isinstance(value, str) and value.startswith("$"):
            head, *path = value[1:].split(".")
            if extra and head in extra:
                obj: Any = extra[head]
            elif match is not None and head == "root":
                obj = match.root
            elif match is not None and head in match.captures:
                obj = match.captures[head]
            else:
                raise RewriteError(self._rule_name(), f"{value} refers to nothing bound by the match")
            for i, attr in enumerate(path):
                obj = self._attribute(obj, attr, value)
            return obj
        if isinstance(value, Mapping):
            return {k: self.resolve(v, match, extra) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, match, extra) for v in value]
        return value

    def _attribute(self, obj: Any, attr: str, ref: str) -> Any:
        if isinstance(obj, fx.Node):
            if attr == "shape":
                return shape_tree(obj)
            if obj.op == "call_module":
                obj = self.modules[obj.target]
        if isinstance(obj, Mapping) and attr in obj:
            return obj[attr]
        if not hasattr(obj, attr):
            raise RewriteError(self._rule_name(), f"{ref}: {type(obj).__name__} has no attribute {attr!r}")
        value = getattr(obj, attr)
        return value.tolist() if isinstance(value, torch.Tensor) and value.numel() < 64 else value

    # -- edits ----------------------------------------------------------------
    def mark(self, node: fx.Node, status: str) -> None:
        """Record what happened to ``node`` (by name) and count a change."""
        self.marked.add(node.name)
        if node.name in self.status and self.status[node.name] == NEW and status in (PRUNED, REMOVED, COLLAPSED):
            del self.status[node.name]  # created and gone again within this rewrite
        else:
            self.status[node.name] = status
        self.changes += 1

    def note_new(self, node: fx.Node, like: fx.Node | None = None) -> None:
        """Record a node an action created; with ``like``, it inherits that node's provenance."""
        self.status[node.name] = NEW
        if like is not None:
            derive(node, like, self._rule_name())
        self.changes += 1

    def erase(self, node: fx.Node, status: str) -> None:
        if node.users:
            raise RewriteError(self._rule_name(), f"cannot erase {node.name}: it is still used by "
                                                  f"{', '.join(u.name for u in node.users)}")
        self.mark(node, status)
        self.graph.erase_node(node)

    def replace_uses(self, node: fx.Node, by: fx.Node) -> None:
        for user in list(node.users):
            mark_changed(user, self._rule_name())
        node.replace_all_uses_with(by)
        self.changes += 1

    def install_module(self, node: fx.Node, module: nn.Module, sources: Mapping[str, str | tuple[str, ...] | None]) -> None:
        """Make ``node`` call ``module`` (at the same target); ``sources``: new local tensor name ->
        old local tensor name, a tuple of old local tensor names it was computed from (its
        origin becomes the tuple of their origins), or None for a new tensor."""
        target = node.target
        old_origin = {k[len(target) + 1:]: v for k, v in self.param_origin.items() if k.startswith(target + ".")}
        for key in [k for k in self.param_origin if k.startswith(target + ".")]:
            del self.param_origin[key]
        for new_name, old_name in sources.items():
            if isinstance(old_name, tuple):
                origin = computed_origin(old_origin.get(name) for name in old_name)
            else:
                origin = old_origin.get(old_name) if old_name else None
            self.param_origin[f"{target}.{new_name}"] = origin
        if any(n is not node and n.op == "call_module" and n.target == target for n in self.graph.nodes):
            raise RewriteError(self._rule_name(), f"module {target} is called by several nodes; cannot replace it for one")
        self.modules[target] = module
        self.mark(node, REPLACED if self.status.get(node.name) != NEW else NEW)

    def _rule_name(self) -> str:
        return self.rule.name if self.rule else "<none>"

    # -- result ---------------------------------------------------------------
    def build(self, original: fx.GraphModule) -> fx.GraphModule:
        used = {n.target for n in self.graph.nodes if n.op in ("call_module", "get_attr")}
        # Lazy: validation only interprets the graph (shape propagation), and code
        # generation is linear but costly (3-4x a dead-code pass on large graphs).
        gm = _ResultModule({t: self.modules[t] for t in used}, self.graph, class_name=type(original).__name__)
        gm.meta.update({k: v for k, v in original.meta.items() if k in (TRACE_META, EXAMPLE_INPUTS_META)})
        return gm


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector (restoring its state after).

    Copying a large graph allocates many long-lived objects; each allocation burst
    triggers collections that traverse the whole heap, which made copying a
    100k-node graph about twice as slow and its cost grow faster than linearly.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# What the ``Node.args`` / ``Node.kwargs`` setters call, without ``Node.__setattr__``'s overhead.
_set_args_kwargs = getattr(fx.Node, "_update_args_kwargs", None)


def copy_graph(graph: fx.Graph) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``graph`` with the same node names and metadata (output node included).

    Equivalent to ``Graph.graph_copy`` plus the output node, but each node is created
    without arguments and given them afterwards: ``Graph.create_node`` scans the
    arguments of every new node with pytree (a check for raw SymInts that a copy of
    a valid graph does not need), which made copying the dominant cost of a rewrite.
    """
    new = fx.Graph(tracer_cls=graph._tracer_cls)
    new._codegen = copy.deepcopy(graph._codegen)
    val_map: dict[fx.Node, fx.Node] = {}
    lookup = val_map.__getitem__
    create = new.create_node
    with _gc_paused():  # only live objects are created: collecting would scan the heap for nothing
        for node in graph.nodes:
            copied = create(node.op, node.target, None, None, node.name, node.type)
            if node.args or node.kwargs:
                args, kwargs = map_arg(node.args, lookup), map_arg(node.kwargs, lookup)
                if _set_args_kwargs is not None:
                    _set_args_kwargs(copied, args, kwargs)
                else:  # pragma: no cover - older torch: the public setters (slower)
                    copied.args, copied.kwargs = args, kwargs
            copied.meta.update(node.meta)  # a shallow copy, like Graph.node_copy
            val_map[node] = copied
    return new, val_map


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
    for rule in rules:
        ctx.rule, ctx.log = rule, RuleLog(rule.name, rule.action)
        logs.append(ctx.log)
        before, acted = ctx.changes, ctx.actions_run
        touched_before = dict(ctx.status)
        ctx.signatures = _signatures(ctx) if example is not None else {}
        ctx.marked = set()
        # Validating the previous rule built a probe module that now owns the graph; an action adding
        # a call_module node for a module only ctx.modules has would be refused by fx against it.
        ctx.graph.owning_module = None
        _apply_rule(ctx, rule, rules.max_iterations)
        if ctx.changes != before or ctx.actions_run != acted:
            _validate(ctx, rule, gm, example, touched_before)
    ctx.rule = None
    # Shapes on the nodes are current: the trace propagated them, and so did every
    # validation after a rule that could change them.
    result_gm = ctx.build(gm)
    if ctx.values:
        result_gm.meta[VALUES_META] = ctx.values
    return RewriteResult(result_gm, gm, logs, _param_map(ctx, result_gm), _node_status(ctx, result_gm))


def _signature(ctx: "RewriteContext", node: fx.Node) -> tuple:
    """What a node computes, as far as a rule can change it: its operation, target, inputs, and
    the module object it calls (``replace`` swaps the module behind an unchanged target)."""
    inputs = map_arg((node.args, node.kwargs), lambda n: n.name)
    module = id(ctx.modules.get(node.target)) if node.op in ("call_module", "get_attr") else None
    return node.op, str(node.target), repr(inputs), module


def _signatures(ctx: "RewriteContext") -> dict[str, tuple]:
    return {node.name: _signature(ctx, node) for node in ctx.graph.nodes}


def _unchanged_values(ctx: "RewriteContext") -> dict[str, Any]:
    """Cached values of the nodes whose computation this rule changed neither directly nor upstream
    (actions never modify modules in place, so an unchanged signature means an unchanged value)."""
    affected: set[str] = set()
    for node in ctx.graph.nodes:
        if node.name not in ctx.values or ctx.signatures.get(node.name) != _signature(ctx, node) \
                or any(i.name in affected for i in node.all_input_nodes):
            affected.add(node.name)
    return {name: value for name, value in ctx.values.items() if name not in affected}


def _apply_rule(ctx: RewriteContext, rule: Rule, max_iterations: int) -> None:
    spec = registry.action(rule.action)
    seen_rejections: set[tuple[str, str]] = set()
    while True:
        ctx.log.iterations += 1
        before = ctx.changes
        _apply_pass(ctx, rule, spec, seen_rejections)
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


def _rejection(ctx: RewriteContext, rule: Rule, match: Match) -> str | None:
    """The first failing check's reason, or None when every check passes."""
    for check in rule.checks:
        spec = registry.check(check.name)
        args = ctx.resolve(list(check.args), match)
        kwargs = ctx.resolve(dict(check.kwargs), match)
        try:
            reason = spec.fn(ctx, match, *args, **kwargs)
        except RewriteError:
            raise
        except Exception as exc:  # wrong argument types, a bug in a user check: refuse, naming rule and node
            first = str(exc).strip().splitlines()
            raise RewriteError(rule.name, f"check {check.name!r} failed on {match.root.name}: {type(exc).__name__}"
                                          + (f": {first[0]}" if first else "")) from exc
        if reason:
            return f"{check.name}: {reason}"
    return None


def _apply_pass(ctx: RewriteContext, rule: Rule, spec: registry.ActionSpec, seen: set) -> None:
    matches = _find_matches(ctx, rule)
    ctx.log.matches += len(matches)
    accepted = []
    for m in matches:
        reason = _rejection(ctx, rule, m)
        if reason is None:
            accepted.append(m)
        elif (m.root.name, reason) not in seen:
            seen.add((m.root.name, reason))
            ctx.log.rejected.append(Rejection(m.root.name, reason))
    if not spec.per_match:
        before = ctx.changes
        _run_action(spec, rule, ctx, accepted, None)
        ctx.log.rewrites += ctx.changes != before
        return
    for m in accepted:
        if any(getattr(n, "_erased", False) for n in m.nodes()):
            continue  # an earlier rewrite in this pass removed part of it
        fresh = rule.pattern.match(m.root, ctx.modules)  # earlier rewrites may have changed it
        if fresh is None or _rejection(ctx, rule, fresh) is not None:
            continue
        _run_action(spec, rule, ctx, fresh, fresh.root)
        ctx.log.rewrites += 1


def _run_action(spec: registry.ActionSpec, rule: Rule, ctx: RewriteContext, match, root: fx.Node | None) -> None:
    """Call the action; any error but a RewriteError (a bug in a user action, fx refusing an edit)
    becomes a RewriteError naming the rule and the node, so that nothing is half-applied silently."""
    ctx.actions_run += 1
    try:
        spec.fn(ctx, match, **dict(rule.args))
    except RewriteError:
        raise
    except Exception as exc:
        where = f" on {root.name}" if root is not None else ""
        first = str(exc).strip().splitlines()
        raise RewriteError(rule.name, f"action {rule.action!r} failed{where}: {type(exc).__name__}"
                                      + (f": {first[0]}" if first else "")) from exc


def _validate(ctx: RewriteContext, rule: Rule, original: fx.GraphModule, example, touched_before) -> None:
    if registry.action(rule.action).only_deletes:
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
    probe = ctx.build(original)
    try:
        # Only what the rule changed, and what is downstream of it, is run again.
        propagate_shapes(probe, *example, known=_unchanged_values(ctx))
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


def computed_origin(origins) -> tuple[str, ...] | None:
    """The origin of a tensor computed from tensors with ``origins``: their original names,
    flattened (an origin may itself be a tuple), in order, without repeats; None if none is known."""
    found: list[str] = []
    for origin in origins:
        for name in (origin if isinstance(origin, tuple) else (origin,)):
            if name is not None and name not in found:
                found.append(name)
    return tuple(found) or None


def _param_map(ctx: RewriteContext, gm: fx.GraphModule) -> dict[str, Origin]:
    result = {}
    for name, _ in named_tensors(gm):
        if name not in ctx.param_origin:
            raise RewriteError("<result>", f"tensor {name} of the result has no recorded origin")
        result[name] = ctx.param_origin[name]
    return result


def _node_status(ctx: RewriteContext, gm: fx.GraphModule) -> dict[str, str]:
    alive = {n.name for n in gm.graph.nodes}
    status = {name: ctx.status.get(name, KEPT) for name in ctx.original_names}
    for name, s in ctx.status.items():
        if s == NEW and name in alive:
            status[name] = NEW
    return status


__all__ = ["rewrite", "RewriteResult", "RewriteContext", "RuleLog", "Rejection", "copy_graph", "bind_tensor",
           "Origin", "computed_origin"]
