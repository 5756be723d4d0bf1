"""Patterns: declarative descriptions of a node and (optionally) its inputs.

A :class:`Pattern` matches one :class:`torch.fx.Node`. Every field is optional;
an unset field matches anything. ``inputs`` holds sub-patterns matched against
the node's inputs in order, so a pattern can describe a small DAG (a conv feeding
a batch norm); ``capture`` names the matched node so that checks and actions can
refer to it as ``$name``. A capture bound twice must bind the same node.

Owns the pattern language: each field is declared once, with how rule files write
it, and :mod:`fxrewrite.rule_file` derives the YAML keys and their parsers from the
dataclass; the matching is :meth:`Pattern._match_self`. Globs and attribute
equality are those of :mod:`fxrewrite.naming`.

>>> import torch, fxrewrite
>>> from fxrewrite import Pattern
>>> gm = fxrewrite.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)))
>>> p = Pattern(module_class="BatchNorm2d", capture="bn",
...             inputs=[Pattern(module_class="Conv*", num_users=1, capture="conv")])
>>> [(m["conv"].target, m["bn"].target) for m in p.find(gm)]
[('0', '1')]
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Mapping

from torch import fx, nn
from torch.fx.node import map_arg

from .naming import class_matches, function_matches, glob_matches, same_value
from .naming import class_names, function_names  # noqa: F401  (imported from here before naming.py)

OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


@dataclass(frozen=True)
class Count:
    """A count constraint: ``Count(min=1)``, ``Count(max=1)``, ``Count(2, 2)``."""

    min: int | None = None
    max: int | None = None

    def accepts(self, n: int) -> bool:
        return (self.min is None or n >= self.min) and (self.max is None or n <= self.max)

    @classmethod
    def of(cls, value: "int | Count | Mapping | None") -> "Count | None":
        if value is None or isinstance(value, Count):
            return value
        if isinstance(value, int):
            return cls(value, value)
        return cls(value.get("min"), value.get("max"))


@dataclass(frozen=True)
class Match:
    """A successful match: the node the pattern's root matched and every capture."""

    root: fx.Node
    captures: Mapping[str, fx.Node]

    def __getitem__(self, name: str) -> fx.Node:
        return self.captures[name]

    def nodes(self) -> set[fx.Node]:
        return {self.root, *self.captures.values()}


def pattern_keys() -> dict[str, dict]:
    """Every :class:`Pattern` field, in order, with how rule files write it (see ``_key``)."""
    return {f.name: dict(f.metadata) for f in fields(Pattern)}


def input_nodes(node: fx.Node) -> list[fx.Node]:
    """The node's inputs in argument order (args, then kwargs), flattening lists and tuples.

    A node consuming the same value twice lists it twice; this is the order
    ``Pattern.inputs`` and the actions' input selectors refer to.
    """
    found: list[fx.Node] = []
    map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


_MISSING = object()


_CANONICAL = {"patterns": tuple, "attrs": dict}  # what the other kinds store their value as


def _key(kind: str, *, default: Any = None, default_factory: Any = None, choices: tuple = ()) -> Any:
    """A :class:`Pattern` field and how rule files write it (``kind``: ``string``, ``choice`` of
    ``choices``, ``attrs``, ``count`` or ``patterns``): :mod:`fxrewrite.rule_file` derives its pattern
    keys and their parsers from these, so a new field is written once, here."""
    metadata = {"kind": kind, "choices": choices}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Pattern:
    """A node pattern. See the module docstring; every field narrows the match.

    * ``op``: one of ``placeholder, get_attr, call_function, call_method, call_module, output``;
    * ``function``: glob over a ``call_function`` target's name (``torch.cat``, ``operator.add``, ``add``);
    * ``method``: glob over a ``call_method`` name (``view``, ``chunk``);
    * ``module_class``: glob over the called module's class name (or fully qualified name);
    * ``module_name``: glob over the called module's qualified name (``model.2*``);
    * ``attrs``: the called module's attributes must equal these values;
    * ``num_inputs`` / ``num_users``: an exact count or a :class:`Count` range;
    * ``inputs``: sub-patterns for the first inputs, in order (``None`` = any);
    * ``capture``: name under which the matched node is captured.
    """

    op: str | None = _key("choice", choices=OPS)
    function: str | None = _key("string")
    method: str | None = _key("string")
    module_class: str | None = _key("string")
    module_name: str | None = _key("string")
    attrs: Mapping[str, Any] = _key("attrs", default_factory=dict)
    num_inputs: Count | int | None = _key("count")
    num_users: Count | int | None = _key("count")
    inputs: tuple["Pattern | None", ...] = _key("patterns", default=())
    capture: str | None = _key("string")

    def __post_init__(self):
        # Accept friendly values, store canonical ones (by the kind each field declares).
        for f in fields(self):
            value, kind = getattr(self, f.name), f.metadata["kind"]
            if kind == "count":
                object.__setattr__(self, f.name, Count.of(value))
            elif kind in _CANONICAL:
                object.__setattr__(self, f.name, _CANONICAL[kind](value))
            elif kind == "choice" and value is not None and value not in f.metadata["choices"]:
                raise ValueError(f"unknown {f.name} {value!r}; expected one of {', '.join(f.metadata['choices'])}")

    # -- matching ---------------------------------------------------------
    def match(self, node: fx.Node, modules: Mapping[str, nn.Module]) -> Match | None:
        """Match ``node`` (``modules``: qualified name -> module of the graph's owner)."""
        captures: dict[str, fx.Node] = {}
        return Match(node, captures) if self._match(node, modules, captures) else None

    def find(self, gm: fx.GraphModule) -> list[Match]:
        """All matches in ``gm``, in graph order."""
        modules = dict(gm.named_modules())
        return [m for m in (self.match(n, modules) for n in gm.graph.nodes) if m is not None]

    def _match(self, node: fx.Node, modules: Mapping[str, nn.Module], captures: dict[str, fx.Node]) -> bool:
        if not self._match_self(node, modules):
            return False
        if self.inputs:
            inputs = input_nodes(node)
            if len(inputs) < len(self.inputs):
                return False
            for sub, inp in zip(self.inputs, inputs):
                if sub is not None and not sub._match(inp, modules, captures):
                    return False
        if self.capture is not None:
            bound = captures.setdefault(self.capture, node)
            if bound is not node:
                return False
        return True

    def _match_self(self, node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
        if self.op is not None and node.op != self.op:
            return False
        if self.function is not None:
            if node.op != "call_function" or not function_matches(self.function, node.target):
                return False
        if self.method is not None:
            if node.op != "call_method" or not glob_matches(node.target, self.method):
                return False
        if self.module_class is not None or self.module_name is not None or self.attrs:
            if node.op != "call_module":
                return False
            module = modules.get(node.target)
            if module is None:
                return False
            if self.module_name is not None and not glob_matches(node.target, self.module_name):
                return False
            if self.module_class is not None and not class_matches(module, self.module_class):
                return False
            for name, expected in self.attrs.items():
                if not same_value(getattr(module, name, _MISSING), expected):
                    return False
        if self.num_users is not None and not self.num_users.accepts(len(node.users)):
            return False
        if self.num_inputs is not None and not self.num_inputs.accepts(len(input_nodes(node))):
            return False
        return True

    # -- introspection ------------------------------------------------------
    def captures(self) -> list[str]:
        """Every capture name bound by this pattern or its input patterns."""
        names = [self.capture] if self.capture else []
        for sub in self.inputs:
            if sub is not None:
                names += [n for n in sub.captures() if n not in names]
        return names

    def iter_patterns(self) -> Iterator["Pattern"]:
        yield self
        for sub in self.inputs:
            if sub is not None:
                yield from sub.iter_patterns()
