"""The rewrite context: the state a rule's action edits, and the verbs every action edits it with.

Owns the working copy of the graph, the modules it calls, what happened to every node
(its *status*) and where every tensor comes from (its *origin*). Actions, built-in or
written by users, change the graph only through these verbs, which keep status,
provenance and origins right:

=================================================  ==============================================
``ctx.module(node)``                               the module a ``call_module`` node calls
``ctx.add_module(module, prefix)``                 a new module under a free name (``prefix_0``...)
``ctx.insert_call(target, args, before=/after=)``  a new node calling a module or a function
``ctx.set_args(node, args, kwargs)``               change what a node reads
``ctx.replace_uses(node, by)``                     every reader of ``node`` reads ``by`` instead
``ctx.erase(node, status)``                        delete a node nothing reads any more
``ctx.set_module(node, module, sources)``          make a node call another module; ``sources``
                                                   say where its tensors come from
``ctx.record_origin(tensor, computed_from)``       a tensor is computed from these tensors
``ctx.drop_tensors(target, names)``                tensors leave the result (logged as dropped)
``ctx.refuse(reason)``                             refuse the rewrite (nothing is applied)
``ctx.note(text)``                                 a line in the rule's log
=================================================  ==============================================

Read-only: ``ctx.graph`` (walk it, never edit it directly), ``ctx.rule``, ``ctx.output_node()``.
An action receives its arguments with every ``$reference`` already resolved (a capture is
its node); modules are shared with the input model, so an action never changes one in
place: it builds a new one (:mod:`fxrewrite.modules` helps) and calls :meth:`set_module`.

>>> import torch, fxrewrite
>>> from fxrewrite import Pattern, Rule, register_action, registry
>>> with registry.scoped():
...     @register_action("negate_after")
...     def negate_after(ctx, match):
...         neg = ctx.insert_call(torch.neg, (match.root,), after=match.root, like=match.root)
...         ctx.replace_uses(match.root, neg)        # every reader but the new node itself
...     gm = fxrewrite.trace(torch.nn.Sequential(torch.nn.ReLU()), torch.zeros(2))
...     result = fxrewrite.rewrite(gm, [Rule("neg", "negate_after", Pattern(module_class="ReLU"))])
>>> [n.name for n in result.module.graph.nodes], result.node_status["neg"]
(['input_1', '_0', 'neg', 'output'], 'new')
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NoReturn

import torch
from torch import fx, nn

from .call_sites import calls_of as _calls_of, join_call_sites, split_call_site
from .errors import RewriteError
from .graph_copy import copy_graph
from .pattern import Match
from .provenance import derive, mark_changed
from .shapes import shape_tree
from .tensors import attribute_at, named_tensors
from .tracing import TRACE_META

# Where a tensor of a rewritten module comes from: the original tensor it is (its name), the
# original tensors it was computed from (a tuple of names), or nothing (None, a new tensor).
Origin = str | tuple[str, ...] | None

# What happened to a node of the input graph (``node_status``); nodes created by rules are "new".
KEPT, PRUNED, COLLAPSED, REPLACED, REMOVED, NEW = "kept", "pruned", "collapsed", "replaced", "removed", "new"
STATUSES = (KEPT, PRUNED, COLLAPSED, REPLACED, REMOVED, NEW)
# What happened to an edge (a node reading another): see RewriteResult.edges.
EDGE_KEPT, EDGE_DROPPED, EDGE_ADDED = "kept", "dropped", "added"

# A tensor's source inside a module being replaced (``set_module``): the old local name it is, the
# old local names it was computed from, or None (a new tensor).
Source = str | tuple[str, ...] | None


@dataclass(frozen=True)
class Construction:
    """How a rule built a module: ``cls(**kwargs)`` (the ``replace`` action); ``module`` is the
    module it built (a later rule may replace it again). A caller that would build the same
    call again to compare with it (a config check) can compare the calls instead."""

    cls: type
    kwargs: dict[str, Any] = field(hash=False)  # (hashed by class: the values may not be hashable)
    module: nn.Module = field(hash=False)


def computed_origin(origins: Iterable[Origin]) -> tuple[str, ...] | None:
    """The origin of a tensor computed from tensors with ``origins``: their original names,
    flattened (an origin may itself be a tuple), in order, without repeats; None if none is known."""
    found: dict[str, None] = {}
    for origin in origins:
        for name in (origin if isinstance(origin, tuple) else (origin,)):
            if name is not None:
                found.setdefault(name)
    return tuple(found) or None


class RewriteContext:
    """The state one :func:`fxrewrite.rewrite` works on, and the verbs actions edit it with
    (see the module docstring). The engine sets :attr:`rule` and :attr:`log` for each rule."""

    def __init__(self, gm: fx.GraphModule):
        self.graph, self._val_map = copy_graph(gm.graph)
        self.original_names = [n.name for n in gm.graph.nodes]
        self.modules: dict[str, Any] = {}  # target -> module or tensor (read with module(); add with add_module())
        # Tensor origins, by current qualified name, and the names of each target's tensors: replacing
        # or dropping a module's tensors costs the size of that module, not of the whole model.
        self._origins: dict[str, Origin] = {}
        self._tensors_of: dict[str, list[str]] = {}
        # Tensors the root's forward computed while tracing are computed from the buffers it read.
        constants = getattr(gm.meta.get(TRACE_META), "constants", None) or {}
        for node in self.graph.nodes:
            if node.op in ("call_module", "get_attr") and node.target not in self.modules:
                value = attribute_at(gm, node.target)
                self.modules[node.target] = value
                if isinstance(value, nn.Module):
                    self._index(node.target, {name: name for name, _ in named_tensors(value, node.target)})
                elif isinstance(value, torch.Tensor):
                    self._index(node.target, {node.target: constants.get(node.target, node.target)})
        self.status: dict[str, str] = {}
        self.marked: set[str] = set()  # nodes marked by the current rule (a node replaced twice stays "replaced")
        self.changes = 0
        self.actions_run = 0  # calls of actions: one that edited the graph without counting is validated too
        # Node values from the last shape propagation, and what each node computed when the
        # current rule started: validation re-runs only what the rule changed (see the engine).
        self.values: dict[str, Any] = {}
        self.signatures: dict[str, tuple] = {}
        self.rule = None  # the Rule being applied (fxrewrite.rules.Rule)
        self.log = None  # its RuleLog (fxrewrite.result.RuleLog)
        self._dropped: set[str] = set()  # origins the current rule logged as dropped
        self._free: dict[str, int] = {}  # prefix -> next number to try in add_module
        self.copies: dict[str, str] = {}  # call-site target -> the shared module's, made by the current rule
        self.split_from: set[str] = set()  # the shared modules the current rule split
        self.constructions: dict[str, Construction] = {}  # node name -> how a rule built its module

    # -- reading --------------------------------------------------------------------------
    @property
    def rule_name(self) -> str:
        return self.rule.name if self.rule is not None else "<none>"

    def module(self, node: fx.Node) -> nn.Module:
        """The module ``node`` calls (refused when it calls none)."""
        if node.op != "call_module":
            self.refuse(f"node {node.name} is a {node.op}, not a module call")
        return self.modules[node.target]

    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    def origin(self, tensor: str) -> Origin:
        """The origin of the current tensor ``tensor`` (a qualified name such as ``conv.weight``)."""
        return self._origins.get(tensor)

    # -- the verbs ------------------------------------------------------------------------
    def refuse(self, reason: str) -> NoReturn:
        """Refuse the rewrite: :func:`fxrewrite.rewrite` raises a RewriteError naming the rule, and
        returns nothing."""
        raise RewriteError(self.rule_name, reason)

    def note(self, text: str) -> None:
        """Add a line to the rule's log (``RuleLog.notes``)."""
        self.log.notes.append(text)

    def add_module(self, module: nn.Module, prefix: str) -> str:
        """Add ``module`` under the first free name ``prefix_0``, ``prefix_1``...; return that name.

        Its tensors are new (their origin is None) unless :meth:`record_origin` says otherwise.
        """
        if not prefix or "." in prefix:
            self.refuse(f"add_module: {prefix!r} is not a plain name (a new module is added at the top level)")
        k = self._free.get(prefix, 0)
        names = self.graph._graph_namespace._used_names if hasattr(self.graph, "_graph_namespace") else {}
        while f"{prefix}_{k}" in self.modules or f"{prefix}_{k}" in names:
            k += 1
        self._free[prefix] = k + 1
        target = f"{prefix}_{k}"
        self.modules[target] = module
        self._index(target, {f"{target}.{name}": None for name, _ in named_tensors(module)})
        return target

    def insert_call(self, target: str | Callable, args: tuple = (), kwargs: Mapping[str, Any] | None = None, *,
                    before: fx.Node | None = None, after: fx.Node | None = None,
                    like: fx.Node | None = None) -> fx.Node:
        """A new node calling the module ``target`` (a name, see :meth:`add_module`) or the function
        ``target``, placed just ``before`` or ``after`` a node; status ``new``, and with ``like`` that
        node's provenance."""
        if (before is None) == (after is None):
            self.refuse("insert_call needs exactly one of before= and after=")
        if isinstance(target, str):
            if target not in self.modules:
                self.refuse(f"insert_call: no module {target} (add it with add_module first)")
            op = "call_module"
        elif callable(target):
            op = "call_function"
        else:
            self.refuse(f"insert_call: {target!r} is neither a module name nor a function")
        with (self.graph.inserting_before(before) if before is not None else self.graph.inserting_after(after)):
            node = self.graph.create_node(op, target, tuple(args), dict(kwargs or {}))
        self.status[node.name] = NEW
        if like is not None:
            derive(node, like, self.rule_name)
        self.changes += 1
        return node

    def set_args(self, node: fx.Node, args: tuple, kwargs: Mapping[str, Any] | None = None) -> None:
        """Make ``node`` read ``args`` / ``kwargs`` (its status is unchanged)."""
        node.args, node.kwargs = tuple(args), dict(kwargs or {})
        mark_changed(node, self.rule_name)
        self.marked.add(node.name)
        self.changes += 1

    def replace_uses(self, node: fx.Node, by: fx.Node) -> None:
        """Every node reading ``node`` reads ``by`` instead (``by`` itself, if it reads ``node``, still does)."""
        rule = self.rule_name
        for user in node.users:
            if user is not by:
                mark_changed(user, rule)
        if by in node.users:
            node.replace_all_uses_with(by, delete_user_cb=lambda user: user is not by)
        else:
            node.replace_all_uses_with(by)
        self.changes += 1

    def erase(self, node: fx.Node, status: str) -> None:
        """Delete ``node``, which nothing may read any more; record ``status`` (pruned, collapsed, removed)."""
        if node.users:
            self.refuse(f"cannot erase {node.name}: it is still used by {', '.join(u.name for u in node.users)}")
        self.mark(node, status)
        self.graph.erase_node(node)

    def set_module(self, node: fx.Node, module: nn.Module, sources: Mapping[str, Source]) -> None:
        """Make ``node`` call ``module`` (at the same target); status ``replaced``, and its provenance
        names the rule and the new module's class.

        ``sources`` maps each tensor of ``module`` (local name) to the old module's tensor it is
        (local name), to a tuple of old local names it was computed from (its origin becomes theirs,
        combined), or to None (a new tensor). Old tensors no source names are dropped (logged).
        """
        # Shared: called by other nodes too, or it was until this rule gave them their own targets.
        shared = node.target in self.split_from or any(n is not node for n in _calls_of(self.graph, node.target))
        if shared:
            split_call_site(self, node)  # this call site gets its own target (see end_rule)
        target = node.target
        old = {name[len(target) + 1:]: self._origins.pop(name, None) for name in self._tensors_of.pop(target, ())}
        used: set[str] = set()
        new: dict[str, Origin] = {}
        for name, source in sources.items():
            if isinstance(source, tuple):
                used.update(source)
                new[f"{target}.{name}"] = computed_origin(old.get(s) for s in source)
            else:
                used.add(source)
                new[f"{target}.{name}"] = old.get(source) if source else None
        if target not in self.copies:  # a split call site drops nothing: the shared module keeps its tensors
            self._log_dropped(origin for name, origin in old.items() if name not in used)
        self._index(target, new)
        self.modules[target] = module
        derive(node, node, self.rule_name, module_class=type(module).__name__)
        self.mark(node, REPLACED if self.status.get(node.name) != NEW else NEW)

    def end_rule(self) -> None:
        """After a rule: join again the call sites of a shared module that the rule replaced at every
        site by equivalent modules (see :mod:`fxrewrite.call_sites`)."""
        join_call_sites(self)

    def record_origin(self, tensor: str, computed_from: Iterable[str]) -> None:
        """Record that the current tensor ``tensor`` is computed from the current tensors
        ``computed_from`` (qualified names; ``tensor`` may be one of them)."""
        if tensor not in self._origins:
            self.refuse(f"record_origin: no tensor {tensor}")
        self._origins[tensor] = computed_origin(self._origins.get(name) for name in computed_from)

    def drop_tensors(self, target: str, names: Iterable[str] | None = None) -> None:
        """The tensors of ``target`` (all, or these local names) leave the result: their origins are
        listed in the rule's log as dropped."""
        prefix = target + "."
        chosen = None if names is None else {prefix + name for name in names}
        self._log_dropped(self._origins.get(name) for name in self._tensors_of.get(target, ())
                          if chosen is None or name in chosen)

    # -- bookkeeping (the engine's) ----------------------------------------------------------
    def mark(self, node: fx.Node, status: str) -> None:
        """Record what happened to ``node`` (by name) and count a change."""
        self.marked.add(node.name)
        if node.name in self.status and self.status[node.name] == NEW and status in (PRUNED, REMOVED, COLLAPSED):
            del self.status[node.name]  # created and gone again within this rewrite
        else:
            self.status[node.name] = status
        self.changes += 1

    def note_new(self, node: fx.Node, like: fx.Node | None = None) -> None:
        """Record a node created without :meth:`insert_call` (status ``new``; ``like``: its provenance)."""
        self.status[node.name] = NEW
        if like is not None:
            derive(node, like, self.rule_name)
        self.changes += 1

    def install_module(self, node: fx.Node, module: nn.Module, sources: Mapping[str, Source]) -> None:
        """The former name of :meth:`set_module`."""
        self.set_module(node, module, sources)

    def start_rule(self, rule, log) -> None:
        self.rule, self.log = rule, log
        self.marked = set()
        self._dropped = set()

    def param_map(self, tensor_names: Iterable[str]) -> dict[str, Origin]:
        """The origin of each of ``tensor_names`` (the tensors of the result)."""
        result = {}
        for name in tensor_names:
            if name not in self._origins:
                raise RewriteError("<result>", f"tensor {name} of the result has no recorded origin")
            result[name] = self._origins[name]
        return result

    def _index(self, target: str, origins: Mapping[str, Origin]) -> None:
        self._origins.update(origins)
        self._tensors_of.setdefault(target, []).extend(origins)

    def _log_dropped(self, origins: Iterable[Origin]) -> None:
        for origin in origins:
            for name in (origin if isinstance(origin, tuple) else (origin,)):
                if name is not None and name not in self._dropped:
                    self._dropped.add(name)
                    self.log.dropped.append(name)

    # -- references -----------------------------------------------------------------------------
    def resolve(self, value: Any, match: Match | None, extra: Mapping[str, Any] | None = None) -> Any:
        """Replace ``$capture`` by the captured node and ``$capture.attr`` by its module's attribute.

        ``$capture.shape`` is the captured node's propagated output shape; ``extra``
        provides action-specific names (``$kept_inputs`` in ``replace``). The engine resolves
        every action argument and check argument with this before the call; values without
        references (an already resolved node) come back unchanged.
        """
        if value == "$root" and match is not None and not isinstance(match, list):
            return match.root  # the most common reference: no parsing
        if isinstance(value, str) and value.startswith("$"):
            head, *path = value[1:].split(".")
            if extra and head in extra:
                obj: Any = extra[head]
            elif match is not None and head == "root":
                obj = match.root
            elif match is not None and head in match.captures:
                obj = match.captures[head]
            else:
                self.refuse(f"{value} refers to nothing bound by the match")
            for attr in path:
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
            self.refuse(f"{ref}: {type(obj).__name__} has no attribute {attr!r}")
        value = getattr(obj, attr)
        return value.tolist() if isinstance(value, torch.Tensor) and value.numel() < 64 else value


def reachable(start: fx.Node, *, users: bool) -> set[fx.Node]:
    """``start`` and every node computed from it (``users=True``) or every node it needs (``users=False``);
    linear in what it reaches."""
    seen, todo = {start}, [start]
    while todo:
        node = todo.pop()
        for other in (node.users if users else node.all_input_nodes):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


__all__ = ["RewriteContext", "Origin", "Source", "computed_origin", "reachable", "KEPT", "PRUNED", "COLLAPSED",
           "REPLACED", "REMOVED", "NEW", "STATUSES", "EDGE_KEPT", "EDGE_DROPPED", "EDGE_ADDED"]
