"""Rules and rule sets: the objects rule files compile to.

A :class:`Rule` has a name, an optional :class:`~fxrewrite.pattern.Pattern`,
optional :class:`Check` s and an action with its arguments. Strings starting
with ``$`` in checks and action arguments refer to captures of the pattern
(``$head``, ``$head.nc`` for an attribute of the captured node's module) or to
values the action provides (``$kept_inputs.channels`` in ``replace``).

>>> from fxrewrite import Rule, RuleSet, Pattern
>>> rules = RuleSet([
...     Rule("drop-identity", action="collapse", pattern=Pattern(module_class="Identity"), mode="fixed_point"),
...     Rule("keep-first-output", action="prune_unreachable", args={"outputs": [0]}),
... ])
>>> [r.name for r in rules]
['drop-identity', 'keep-first-output']
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from . import registry
from .errors import RuleFileError, RuleProblem
from .pattern import Pattern

MODES = ("once", "fixed_point")
DEFAULT_MAX_ITERATIONS = 100
#: Largest ``max_iterations`` accepted: a fixed-point rule that never settles must stop in bounded time.
MAX_ITERATIONS_LIMIT = 10_000
# Names an action argument may refer to besides the pattern's captures.
ACTION_VALUES = {"replace": ("kept_inputs",)}


@dataclass(frozen=True)
class Check:
    """A named check with its arguments: ``Check("same_shape", ("$a", "$b"))``."""

    name: str
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    line: int | None = None


@dataclass(frozen=True)
class Rule:
    """One rewrite rule. ``mode`` is ``"once"`` (one pass over the graph) or ``"fixed_point"``."""

    name: str
    action: str
    pattern: Pattern | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    checks: tuple[Check, ...] = ()
    mode: str = "once"
    description: str = ""
    file: str = "<python>"
    line: int | None = None
    key_lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "checks", tuple(self.checks))
        object.__setattr__(self, "args", dict(self.args))

    def problems(self) -> list[RuleProblem]:
        """Everything wrong with this rule (unknown action, bad arguments, unbound captures...)."""
        found: list[RuleProblem] = []

        def report(message: str, key: str | None = None, line: int | None = None) -> None:
            found.append(RuleProblem(self.file, line or self.key_lines.get(key, self.line), self.name, message))

        if self.mode not in MODES:
            report(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}", "mode")
        spec = registry.action(self.action)
        if spec is None:
            report(f"unknown action {self.action!r}; known actions: {', '.join(registry.action_names())}", "action")
        else:
            for key, message in _argument_problems(spec, self.args):
                at = self.key_lines.get("args", self.key_lines.get("action"))  # a missing argument: there
                report(message, line=self.key_lines.get(f"args.{key}", at))
            if spec.per_match and self.pattern is None:
                report(f"action {self.action!r} rewrites matched nodes and needs a pattern", "action")
        bound = set(self.pattern.captures()) if self.pattern else set()
        bound.add("root")
        for check in self.checks:
            check_spec = registry.check(check.name)
            if check_spec is None:
                report(f"unknown check {check.name!r}; known checks: {', '.join(registry.check_names())}",
                       "checks", check.line)
            else:
                reason = _signature_problem(check_spec.fn, check.args, check.kwargs)
                if reason:
                    report(f"bad arguments for check {check.name!r}: {reason}", "checks", check.line)
            for ref in _references((check.args, dict(check.kwargs))):
                if ref not in bound:
                    report(f"check {check.name!r} uses capture ${ref}, which the pattern never binds"
                           f" (bound: {_listing(bound)})", "checks", check.line)
        extra = set(ACTION_VALUES.get(self.action, ()))
        for ref in _references(self.args):
            if ref not in bound | extra:
                report(f"action {self.action!r} uses capture ${ref}, which the pattern never binds"
                       f" (bound: {_listing(bound)})", "args")
        if spec is not None and spec.name == "replace":
            target = self.args.get("with")
            if isinstance(target, str) and registry.module_class(target) is None:
                report(f"unknown module class {target!r} in replace; register it with "
                       f"fxrewrite.register_module_class (registered: {', '.join(registry.module_class_names()) or 'none'})",
                       "args")
        return found


@dataclass
class RuleSet:
    """Rules applied in order. ``max_iterations`` bounds every fixed-point rule."""

    rules: list[Rule]
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    source: str = "<python>"
    plugins: tuple[str, ...] = ()

    def __post_init__(self):
        self.rules = list(self.rules)
        self.validate()

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet(self.rules + other.rules, max(self.max_iterations, other.max_iterations),
                       f"{self.source} + {other.source}", self.plugins + other.plugins)

    def validate(self) -> None:
        """Raise :class:`RuleFileError` listing every problem; a valid set returns None."""
        problems: list[RuleProblem] = []
        limit = self.max_iterations
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_ITERATIONS_LIMIT:
            problems.append(RuleProblem(self.source, None, None, f"max_iterations must be an integer from 1 to "
                                                                 f"{MAX_ITERATIONS_LIMIT}, not {limit!r}"))
        seen: dict[str, Rule] = {}
        for rule in self.rules:
            if rule.name in seen and seen[rule.name].file == rule.file:
                problems.append(RuleProblem(rule.file, rule.line, rule.name,
                                            f"duplicate rule name (first defined at line {seen[rule.name].line})"))
            seen.setdefault(rule.name, rule)
            problems += rule.problems()
        if problems:
            raise RuleFileError(problems)


def _argument_problems(spec: registry.ActionSpec, args: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(argument name, problem) for every bad argument."""
    if spec.params is None:
        return []
    problems = []
    for key, value in args.items():
        param = spec.params.get(key)
        if param is None:
            problems.append((key, f"unknown argument {key!r} for action {spec.name!r}; "
                                  f"known: {', '.join(sorted(spec.params)) or 'none'}"))
        elif not isinstance(value, param.types) or (isinstance(value, bool) and bool not in param.types):
            expected = " or ".join(_type_name(t) for t in param.types)
            problems.append((key, f"argument {key!r} of action {spec.name!r} must be {expected}, "
                                  f"not {_type_name(type(value))} ({value!r})"))
    for key, param in spec.params.items():
        if param.required and key not in args:
            problems.append((key, f"action {spec.name!r} needs argument {key!r}"))
    return problems


def _signature_problem(fn: Any, args: Sequence[Any], kwargs: Mapping[Any, Any]) -> str | None:
    """Why ``fn(ctx, match, *args, **kwargs)`` cannot be called, or None (also when fn has no signature)."""
    if not all(isinstance(k, str) for k in kwargs):
        return f"argument names must be strings, not {next(k for k in kwargs if not isinstance(k, str))!r}"
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(None, None, *args, **kwargs)
    except TypeError as exc:
        return str(exc)
    return None


def _references(value: Any) -> Iterator[str]:
    """Capture names referred to by ``$name`` / ``$name.attr`` strings anywhere in ``value``."""
    if isinstance(value, str):
        if value.startswith("$") and len(value) > 1:
            yield value[1:].split(".", 1)[0]
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _references(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _references(v)


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean", float: "a number", list: "a list",
            dict: "a mapping", type(None): "null"}.get(t, t.__name__)


def _listing(names: Sequence[str] | set[str]) -> str:
    return ", ".join(f"${n}" for n in sorted(names)) or "none"
