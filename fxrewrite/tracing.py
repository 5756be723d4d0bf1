"""Symbolic tracing with a leaf policy, automatic leaves and provenance.

:func:`trace` is :func:`torch.fx.symbolic_trace` with three additions:

* a :class:`LeafPolicy` decides which submodules stay opaque ``call_module``
  nodes (by class name, by qualified-name glob, by depth);
* a submodule whose ``forward`` cannot be traced symbolically (iterating over a
  Proxy, ``len()`` of a Proxy, Python control flow on a traced value...) becomes
  a leaf automatically instead of failing the whole trace; the partial graph it
  had produced is rolled back and :class:`TraceReport` says which and why;
* every node gets a :class:`~fxrewrite.provenance.Provenance`.

Owns the first layer: turning a module into a graph. Class and name globs are those of
:mod:`fxrewrite.naming`, as in patterns.

>>> import torch, fxrewrite
>>> class Loopy(torch.nn.Module):
...     def forward(self, xs):
...         return sum(x for x in xs)          # iterating a Proxy: untraceable
>>> class Net(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.lin, self.loopy = torch.nn.Linear(2, 2), Loopy()
...     def forward(self, x):
...         return self.loopy(self.lin(x))
>>> gm = fxrewrite.trace(Net())
>>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
['lin', 'loopy']
>>> list(gm.meta["fxrewrite.trace"].auto_leaves)
['loopy']
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _assert_is_none

from .gcpause import gc_paused
from .naming import class_matches, glob_matches
from .provenance import META_KEY, Provenance
from .shapes import propagate_shapes
from .tensors import walk_modules

TRACE_META = "fxrewrite.trace"

try:
    from torch.fx._lazy_graph_module import _LazyGraphModule as _TracedModule
except ImportError:  # pragma: no cover - older torch
    _TracedModule = fx.GraphModule


@dataclass(frozen=True)
class LeafPolicy:
    """Which submodules are kept as single ``call_module`` nodes.

    A module is a leaf when any of these holds:

    * its class name (or fully qualified class name) matches one of ``classes`` (globs);
    * its qualified name matches one of ``names`` (globs, e.g. ``"model.*"``);
    * ``max_depth`` is set and its qualified name has at least that many dotted parts
      (``max_depth=1`` keeps every direct child as one node, ``max_depth=2`` every
      grandchild: ``model.0``, ``model.1``, ...);
    * ``torch_builtins`` is true and it is a ``torch.nn`` module other than a container
      (the torch.fx default).
    """

    classes: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    max_depth: int | None = None
    torch_builtins: bool = True

    def is_leaf(self, module: nn.Module, qualname: str) -> bool:
        cls = type(module)
        if self.classes and class_matches(cls, self.classes):
            return True
        if any(glob_matches(qualname, p) for p in self.names):
            return True
        if self.max_depth is not None and qualname and qualname.count(".") + 1 >= self.max_depth:
            return True
        if self.torch_builtins:
            is_torch = cls.__module__.startswith("torch.nn") and not cls.__module__.startswith("torch.nn.modules.container")
            return is_torch and not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
        return False


@dataclass
class TraceReport:
    """What :func:`trace` decided: the policy it used and the modules it made leaves on its own."""

    policy: LeafPolicy
    auto_leaves: dict[str, str] = field(default_factory=dict)  # qualified name -> why it could not be traced
    # Tensors the root's own forward computed while tracing (``_tensor_constant0``...) -> the buffers
    # it had read before: they are *computed* tensors (their ``param_map`` origin is that tuple).
    constants: dict[str, tuple[str, ...]] = field(default_factory=dict)


class TraceTimeConstant(Exception):
    """Raised inside a module traced through when its forward computes a tensor at trace time (from
    its buffers, or a fresh tensor): the module becomes a leaf, so its tensors stay its own."""


class ProvenanceTracer(fx.Tracer):
    """An fx tracer that applies a :class:`LeafPolicy` and falls back to leaves on trace errors."""

    def __init__(self, policy: LeafPolicy | None = None, auto_leaf: bool = True):
        # Defaults: unpickling a GraphModule re-traces its code with ``tracer_cls()``.
        super().__init__()
        self.policy = policy if policy is not None else LeafPolicy()
        self.auto_leaf = auto_leaf
        self.auto_leaves: dict[str, str] = {}
        self._param_cache: dict[str, Any] | None = None
        self._through: list[str] = []  # the modules being traced through, innermost last
        self._buffer_names: dict[int, str] | None = None
        self._buffers_read: list[str] = []  # buffers the traced code read (concrete values), in order
        self.constants: dict[str, tuple[str, ...]] = {}  # trace-time constant -> buffers read before it

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        # Remember the cache so that a rolled-back attempt can drop proxies of erased nodes.
        self._param_cache = parameter_proxy_cache
        if isinstance(attr_val, torch.Tensor) and not isinstance(attr_val, nn.Parameter):
            if self._buffer_names is None:  # once per trace: a name for every buffer of the root
                self._buffer_names = {id(t): name for name, t in self.root.named_buffers()}
            name = self._buffer_names.get(id(attr_val))
            if name is not None:
                self._buffers_read.append(name)
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any):
        # fx stores a tensor computed at trace time as a new attribute ``_tensor_constant<N>`` of the
        # root (trace() gives it a copy of the user's root, so the user's model is never touched).
        # Inside a module traced through, that module becomes a leaf instead: its forward computes
        # from its own buffers (a frozen BatchNorm), and as a leaf those stay its tensors, exactly.
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and a not in self.tensor_attrs:
            if self._through and self.auto_leaf:
                raise TraceTimeConstant(f"computes a tensor at trace time (shape {tuple(a.shape)}) from "
                                        f"its buffers or from constants; kept whole so its tensors stay its own")
            node = super().create_arg(a)
            self.constants[node.target] = tuple(dict.fromkeys(self._buffers_read))
            return node
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.auto_leaves or self.policy.is_leaf(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        if not self.auto_leaf or self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        last_node = self.graph._root.prev  # the newest node before this attempt
        stack_keys = list(self.module_stack)
        calls = dict(self.num_calls)
        reads = len(self._buffers_read)
        self._through.append(qualname)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # any failure while tracing through: make it a leaf
            self._roll_back(last_node, stack_keys, calls)
            del self._buffers_read[reads:]
            self.auto_leaves[qualname] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
            return super().call_module(m, forward, args, kwargs)
        finally:
            if self._through and self._through[-1] == qualname:
                self._through.pop()

    def _roll_back(self, last_node: fx.Node, stack_keys: list[str], calls: dict[str, int]) -> None:
        """Undo a failed attempt: erase its nodes, restore the module stack and call counts."""
        created = []
        node = self.graph._root.prev
        while node is not last_node:
            created.append(node)
            node = node.prev
        erased = set(created)
        for node in created:  # newest first, so users go before what they use
            self.graph.erase_node(node)
        if self._param_cache is not None:
            for key in [k for k, p in self._param_cache.items() if p.node in erased]:
                del self._param_cache[key]
        while len(self.module_stack) > len(stack_keys):
            self.module_stack.popitem(last=True)
        self.num_calls.clear()
        self.num_calls.update(calls)


@gc_paused
def trace(
    module: nn.Module,
    *example_inputs: Any,
    leaf_classes: Iterable[str] = (),
    leaf_names: Iterable[str] = (),
    max_depth: int | None = None,
    torch_builtins: bool = True,
    auto_leaf: bool = True,
    concrete_args: dict[str, Any] | None = None,
    shapes_only: bool = False,
    sealed_leaves: bool = False,
) -> fx.GraphModule:
    """Trace ``module`` into a :class:`torch.fx.GraphModule` with provenance on every node.

    Leaves are chosen by ``leaf_classes`` (class-name globs), ``leaf_names``
    (qualified-name globs), ``max_depth`` and ``torch_builtins`` (see
    :class:`LeafPolicy`); with ``auto_leaf`` a submodule that cannot be traced
    becomes a leaf (``gm.meta["fxrewrite.trace"].auto_leaves`` says why).

    With ``example_inputs``, shapes are propagated and every node gets
    ``node.meta["tensor_meta"]`` (shape, dtype); the inputs are kept in
    ``gm.meta`` so that later rewrites can re-check shapes. With ``shapes_only``
    convolutions are not computed while doing so (much less arithmetic; the values are
    zeros, so only shapes that do not depend on values are right: see
    :mod:`fxrewrite.conv_shapes`); rewrites then re-check the same way.

    ``sealed_leaves`` (with ``max_depth`` of 1 or more) is a promise the caller makes: the traced
    code calls the modules at the depth limit and reads their own attributes, but never looks at
    their submodules. fx is then given those modules without their submodules: its bookkeeping
    walks every module of the model it is given, twice (on a detector of ~1,000 modules traced
    to 40 layers, two thirds of the trace). Reaching a sealed module's submodule by attribute
    fails (or makes an automatic leaf), and the model is traced again in full; so does a model
    in which a module, parameter or buffer below the limit is also registered above it (fx
    would name it by another path). *Iterating*, counting or asking for a sealed module's
    submodules (``for block in self.stage``, ``len``, ``hasattr``) is not detected: it would
    see none. (The YOLOv9 plug-in seals only its own layer loop.) When the sealed attempt is
    given up, the forward has run twice.

    The module is traced in its current mode (``train()``/``eval()``); it is not modified: fx
    stores tensors computed at trace time as attributes of the root it traces, so it traces a
    copy of the root object (same submodules and tensors). A submodule whose forward computes
    such a tensor (from its buffers: a frozen BatchNorm) becomes a leaf with ``auto_leaf``; one
    the root's own forward computes is a *computed* tensor of the result
    (``gm.meta["fxrewrite.trace"].constants``: its name -> the buffers read before it).
    """
    policy = LeafPolicy(tuple(leaf_classes), tuple(leaf_names), max_depth, torch_builtins)
    traced = None
    if sealed_leaves and max_depth is not None and max_depth >= 1:
        traced = _trace_sealed(module, policy, auto_leaf, max_depth, concrete_args)
    if traced is None:
        tracer = ProvenanceTracer(policy, auto_leaf=auto_leaf)
        traced = tracer, tracer.trace(_shallow_copy(module), concrete_args=concrete_args)
    tracer, graph = traced
    if concrete_args:
        _drop_concrete_guards(graph)
    # Lazy: its Python code is generated on first use (a call, .code, print), not here: most traces are
    # rewritten before anything runs them, and code generation costs a fifth of a large trace.
    gm = _TracedModule(tracer.root, graph, class_name=type(module).__name__)
    root_class = type(module).__name__
    for node in gm.graph.nodes:
        node.meta[META_KEY] = Provenance(*_owner(node, module, root_class), origins=(node.name,))
    read = {n.target for n in graph.nodes if n.op == "get_attr"}
    gm.meta[TRACE_META] = TraceReport(policy, dict(tracer.auto_leaves),
                                      {name: origins for name, origins in tracer.constants.items() if name in read})
    if example_inputs:
        propagate_shapes(gm, *example_inputs, shapes_only=shapes_only)
    return gm


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new object of ``module``'s class sharing its attributes, submodules and tensors, with its own
    registries: what fx adds to the root while tracing (``setattr(root, "_tensor_constant0", t)``)
    lands on it, never on the user's module."""
    root = type(module).__new__(type(module))
    root.__dict__.update(module.__dict__)
    for key, value in module.__dict__.items():
        if key.startswith("_") and isinstance(value, (dict, set)):
            root.__dict__[key] = type(value)(value)
    return root


def _trace_sealed(module: nn.Module, policy: LeafPolicy, auto_leaf: bool, max_depth: int,
                  concrete_args: dict[str, Any] | None) -> tuple[ProvenanceTracer, fx.Graph] | None:
    """The trace of :func:`_sealed_copy` of ``module`` (its root holding the real submodules again),
    or None where the full trace must be made instead (see :func:`trace`)."""
    sealed = _sealed_copy(module, max_depth)
    if sealed is None:
        return None
    tracer = ProvenanceTracer(policy, auto_leaf=auto_leaf)
    try:
        graph = tracer.trace(sealed, concrete_args=concrete_args)
    except Exception:  # it reached inside a sealed leaf (or fails anyway: the full trace says how)
        return None
    if tracer.auto_leaves:  # a module traced through reached inside one
        return None
    sealed._modules = dict(module._modules)  # the GraphModule takes the real submodules
    return tracer, graph


def _sealed_copy(module: nn.Module, max_depth: int) -> nn.Module | None:
    """Shallow copies (see :func:`_shallow_copy`) of ``module`` and of its submodules down to
    ``max_depth``, where each is sealed: it keeps its attributes, parameters and buffers but
    has no submodules. Breadth first, so that a module reachable at several depths is copied
    once, at the shallowest, and sealed only if that is the depth limit. None when something
    registered below the seal (a module, parameter or buffer) is registered above it too: fx
    names each by its first path, which sealing would hide."""
    root = _shallow_copy(module)
    copies = {id(module): root}
    originals = [module]  # every module copied: what fx will see
    level = [(module, root)]
    for depth in range(1, max_depth + 1):
        below = []
        for original, copy in level:
            children = {}
            for name, child in original._modules.items():
                if child is not None and id(child) not in copies:
                    copies[id(child)] = _shallow_copy(child)
                    originals.append(child)
                    below.append((child, copies[id(child)]))
                children[name] = None if child is None else copies[id(child)]
            copy._modules = children
        level = below
    for _, copy in level:
        copy._modules = {}
    return None if _seen_below(originals, [original for original, _ in level]) else root


def _seen_below(shown: list[nn.Module], sealed: list[nn.Module]) -> bool:
    """Whether a module below the ``sealed`` ones, or a parameter or buffer of one, is one of the
    ``shown`` modules or one of their own parameters or buffers."""
    below = {id(m): m for s in sealed for m in walk_modules(s)[1:]}
    if not below.keys().isdisjoint(map(id, shown)):
        return True
    return not _tensor_ids(below.values()).isdisjoint(_tensor_ids(shown))


def _tensor_ids(modules) -> set[int]:
    """The ids of the modules' own parameters and buffers."""
    ids = {id(t) for m in modules for t in (*m._parameters.values(), *m._buffers.values())}
    ids.discard(id(None))
    return ids


def _drop_concrete_guards(graph: fx.Graph) -> None:
    """Remove the ``x == value`` assertions fx adds for concrete arguments.

    They check, at run time, that a flag fixed while tracing (``augment=False``)
    is passed with that value; they are not part of the model's computation and
    would only clutter rewrites and drawings. The placeholders stay (with their
    defaults), so the signature is unchanged.
    """
    guards = {torch._assert, _assert_is_none}
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target in guards and not node.users:
            checked = node.args[0] if node.args else None
            graph.erase_node(node)
            if isinstance(checked, fx.Node) and checked.op == "call_function" and not checked.users \
                    and all(i.op == "placeholder" for i in checked.all_input_nodes):
                graph.erase_node(checked)


def _owner(node: fx.Node, root: nn.Module, root_class: str) -> tuple[str, str]:
    """(qualified name, class name) of the module a node belongs to (looked up by path: a layer-level
    trace has a few nodes, its model thousands of modules)."""
    if node.op == "call_module":
        return node.target, type(root.get_submodule(node.target)).__name__
    if node.op == "get_attr":
        owner = node.target.rpartition(".")[0]
        return owner, (type(root.get_submodule(owner)).__name__ if owner else root_class)
    stack = node.meta.get("nn_module_stack")
    if stack:
        qualname, cls = list(stack.values())[-1]
        return qualname, cls.__name__ if isinstance(cls, type) else str(cls).rpartition(".")[2]
    return "", root_class


def is_traced(gm: Any) -> bool:
    """True for a GraphModule made by :func:`trace` (it carries provenance)."""
    return isinstance(gm, fx.GraphModule) and TRACE_META in getattr(gm, "meta", {})


__all__ = ["LeafPolicy", "TraceReport", "TraceTimeConstant", "ProvenanceTracer", "trace", "is_traced"]
