"""Rules and rule sets: the objects rule files compile to, checked against a registry.

A :class:`Rule` has a name, an optional :class:`~fxrewrite.pattern.Pattern`,
optional :class:`Check` s and an action with its arguments. Strings starting
with ``$`` in checks and action arguments refer to captures of the pattern
(``$head``, ``$head.nc`` for an attribute of the captured node's module) or to
values the action provides (``$kept_inputs.channels`` in ``replace``).

A :class:`RuleSet` checks its rules against one :class:`~fxrewrite.registry.Registry`
(``registry=``; default: the current one) and keeps what it found: each rule bound to
its action and checks, its arguments under their current names, parsed, with the
declared defaults (:class:`BoundRule`). The engine runs exactly that; nothing here
knows any particular action.

>>> from fxrewrite import Rule, RuleSet, Pattern
>>> rules = RuleSet([
...     Rule("drop-identity", action="collapse", pattern=Pattern(module_class="Identity"), mode="fixed_point"),
...     Rule("keep-first-output", action="prune_unreachable", args={"outputs": [0]}),
... ])
>>> [r.name for r in rules], rules.bound[0].args
(['drop-identity', 'keep-first-output'], {'node': '$root', 'input': 0})
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from . import registry as registries
from .errors import RuleFileError, RuleProblem
from .pattern import Pattern
from .registry import ActionSpec, CheckSpec, Registry

MODES = ("once", "fixed_point")
DEFAULT_MAX_ITERATIONS = 100
#: Largest ``max_iterations`` accepted: a fixed-point rule that never settles must stop in bounded time.
MAX_ITERATIONS_LIMIT = 10_000


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

    def problems(self, registry: Registry | None = None) -> list[RuleProblem]:
        """Everything wrong with this rule (unknown action, bad arguments, unbound captures...)."""
        return bind(self, registry or registries.current())[1]


@dataclass(frozen=True)
class BoundRule:
    """A checked rule with what it runs: its action, its checks, and the arguments the action gets
    (canonical names, parsed values, declared defaults; ``$references`` still unresolved).
    ``late`` names the arguments that refer to values the action provides, ``refs`` those that hold
    any reference."""

    rule: Rule
    action: ActionSpec
    checks: tuple[CheckSpec, ...]
    args: Mapping[str, Any]
    late: frozenset[str] = frozenset()
    refs: frozenset[str] = frozenset()  # the arguments holding a ``$reference`` (the others need no resolving)


@dataclass
class RuleSet:
    """Rules applied in order. ``max_iterations`` bounds every fixed-point rule; ``registry`` is what
    the rules are checked against (default: :func:`fxrewrite.registry.current` when built)."""

    rules: list[Rule]
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    source: str = "<python>"
    plugins: tuple[str, ...] = ()
    registry: Registry | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        self.rules = list(self.rules)
        if self.registry is None:
            self.registry = registries.current()
        self.bound: list[BoundRule] = []
        self.validate()

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __add__(self, other: "RuleSet") -> "RuleSet":
        """The rules of both, in order; each keeps what it was checked with."""
        combined = RuleSet([], max(self.max_iterations, other.max_iterations), f"{self.source} + {other.source}",
                           self.plugins + other.plugins, self.registry)
        combined.rules = self.rules + other.rules
        problems = [problem for _, problem in duplicate_names(combined.rules)]
        if problems:
            raise RuleFileError(problems)
        combined.bound = self.bound + other.bound
        return combined

    def validate(self) -> None:
        """Raise :class:`RuleFileError` listing every problem; a valid set returns None (and is bound)."""
        problems: list[RuleProblem] = []
        limit = self.max_iterations
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_ITERATIONS_LIMIT:
            problems.append(RuleProblem(self.source, None, None, f"max_iterations must be an integer from 1 to "
                                                                 f"{MAX_ITERATIONS_LIMIT}, not {limit!r}"))
        duplicates = dict(duplicate_names(self.rules))
        bound = []
        for i, rule in enumerate(self.rules):
            if i in duplicates:
                problems.append(duplicates[i])
            found, rule_problems = bind(rule, self.registry)
            problems += rule_problems
            bound.append(found)
        if problems:
            raise RuleFileError(problems)
        self.bound = bound


def bind(rule: Rule, registry: Registry) -> tuple[BoundRule | None, list[RuleProblem]]:
    """Check ``rule`` against ``registry``: the bound rule (None if it has problems) and every problem."""
    found: list[RuleProblem] = []

    def report(message: str, key: str | None = None, line: int | None = None) -> None:
        found.append(RuleProblem(rule.file, line or rule.key_lines.get(key, rule.line), rule.name, message))

    if rule.mode not in MODES:
        report(f"mode must be one of {', '.join(MODES)}, not {rule.mode!r}", "mode")
    spec = registry.action(rule.action)
    args: dict[str, Any] = dict(rule.args)
    if spec is None:
        report(f"unknown action {rule.action!r}; known actions: {', '.join(registry.action_names())}", "action")
    else:
        at = rule.key_lines.get("args", rule.key_lines.get("action"))  # a missing argument: there
        args, argument_problems = _arguments(spec, rule.args, registry)
        for key, message in argument_problems:
            report(message, line=rule.key_lines.get(f"args.{key}", at))
        if spec.per_match and rule.pattern is None:
            report(f"action {rule.action!r} rewrites matched nodes and needs a pattern", "action")
    bound = set(rule.pattern.captures()) if rule.pattern else set()
    bound.add("root")
    checks = []
    for check in rule.checks:
        check_spec = registry.check(check.name)
        if check_spec is None:
            report(f"unknown check {check.name!r}; known checks: {', '.join(registry.check_names())}",
                   "checks", check.line)
        else:
            checks.append(check_spec)
            reason = _signature_problem(check_spec.fn, check.args, check.kwargs)
            if reason:
                report(f"bad arguments for check {check.name!r}: {reason}", "checks", check.line)
        for ref in references((check.args, dict(check.kwargs))):
            if ref not in bound:
                report(f"check {check.name!r} uses capture ${ref}, which the pattern never binds"
                       f" (bound: {_listing(bound)})", "checks", check.line)
    provided = set(spec.provides) if spec is not None else set()
    for ref in references(rule.args):
        if ref not in bound | provided:
            report(f"action {rule.action!r} uses capture ${ref}, which the pattern never binds"
                   f" (bound: {_listing(bound)})", "args")
    if found:
        return None, found
    refs = frozenset(key for key, value in args.items() if any(True for _ in references(value)))
    late = frozenset(key for key in refs if provided & set(references(args[key])))
    return BoundRule(rule, spec, tuple(checks), args, late, refs), []


def _arguments(spec: ActionSpec, given: Mapping[str, Any], registry: Registry) -> tuple[dict, list[tuple[str, str]]]:
    """The arguments ``spec.fn`` receives, and (argument name, problem) for every bad one."""
    if spec.params is None:
        return dict(given), []
    problems = []
    args: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # canonical name -> the spelling the rule used
    for key, value in given.items():
        param = spec.params.get(key)
        if param is None:
            problems.append((key, f"unknown argument {key!r} for action {spec.name!r}; "
                                  f"known: {', '.join(sorted(spec.params)) or 'none'}"))
            continue
        if not isinstance(value, param.types) or (isinstance(value, bool) and bool not in param.types):
            expected = " or ".join(_type_name(t) for t in param.types)
            problems.append((key, f"argument {key!r} of action {spec.name!r} must be {expected}, "
                                  f"not {_type_name(type(value))} ({value!r})"))
            continue
        name = param.alias_of or key
        if name in spelled:
            problems.append((key, f"arguments {spelled[name]!r} and {key!r} of action {spec.name!r} are the same "
                                  f"parameter ({key!r} is the old spelling of {name!r}); give one"))
            continue
        spelled[name] = key
        if param.parse is not None:
            try:
                value = param.parse(value, registry)
            except ValueError as exc:
                problems.append((key, str(exc)))
                continue
        args[name] = value
    for key, param in spec.params.items():
        if param.alias_of is not None or key in spelled:
            continue
        if param.required:
            problems.append((key, f"action {spec.name!r} needs argument {key!r}"))
        elif param.default is not None:
            args[key] = param.default
    return args, problems


def duplicate_names(rules: Sequence[Rule]) -> list[tuple[int, RuleProblem]]:
    """(position, problem) for each rule named like an earlier rule of the same file."""
    first: dict[tuple[str, str], Rule] = {}
    problems = []
    for i, rule in enumerate(rules):
        key = (rule.file, rule.name)
        if key in first:
            problems.append((i, RuleProblem(rule.file, rule.line, rule.name,
                                            f"duplicate rule name (first defined at line {first[key].line})")))
        else:
            first[key] = rule
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


def references(value: Any) -> Iterator[str]:
    """Names referred to by ``$name`` / ``$name.attr`` strings anywhere in ``value``."""
    if isinstance(value, str):
        if value.startswith("$") and len(value) > 1:
            yield value[1:].split(".", 1)[0]
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from references(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from references(v)


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean", float: "a number", list: "a list",
            dict: "a mapping", type(None): "null"}.get(t, t.__name__)


def _listing(names: Sequence[str] | set[str]) -> str:
    return ", ".join(f"${n}" for n in sorted(names)) or "none"


__all__ = ["Rule", "Check", "RuleSet", "BoundRule", "bind", "references", "MODES", "DEFAULT_MAX_ITERATIONS",
           "MAX_ITERATIONS_LIMIT"]
