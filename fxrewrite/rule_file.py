"""Rule files: YAML compiled to :class:`~fxrewrite.rules.RuleSet` objects, with line numbers.

.. code-block:: yaml

    plugins: [yolov9]          # optional: plug-ins whose classes and actions the rules use
    max_iterations: 100        # optional: bound for fixed-point rules
    rules:
      - name: drop-identity
        pattern: {module_class: Identity, capture: x}
        checks:
          - passthrough: $x
        action: collapse
        mode: fixed_point

Every error (unknown key, wrong type, unknown action, unknown module class, a
capture used but never bound...) is reported as ``file:line: rule 'name': problem``;
all of them are collected and raised together as one
:class:`~fxrewrite.errors.RuleFileError`, and nothing is applied.

>>> from fxrewrite import load_rules
>>> rules = load_rules('''
... rules:
...   - name: drop-identity
...     pattern: {module_class: Identity}
...     action: collapse
... ''')
>>> rules.rules[0].name, rules.rules[0].line
('drop-identity', 3)
"""
from __future__ import annotations

import importlib.resources
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from . import registry
from .errors import RuleFileError, RuleProblem
from .safe_yaml import MAX_TEXT_CHARS, GuardedLoader, YamlTooLarge, guarded_load
from .pattern import OPS, Count, Pattern
from .rules import DEFAULT_MAX_ITERATIONS, MAX_ITERATIONS_LIMIT, MODES, Check, Rule, RuleSet

FILE_KEYS = {"rules", "plugins", "max_iterations", "description"}
RULE_KEYS = {"name", "description", "pattern", "checks", "action", "args", "mode"}
PATTERN_KEYS = {"op", "function", "method", "module_class", "module_name", "attrs", "num_inputs",
                "num_users", "inputs", "capture"}


class _Map(dict):
    """A YAML mapping that remembers its line and the line of each key."""

    line: int = 0
    key_lines: dict


class _Seq(list):
    line: int = 0
    item_lines: list


class _Loader(GuardedLoader):
    """A safe loader (no arbitrary objects, bounded nesting) whose mappings and lists carry line numbers."""


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    result = _Map()
    result.line, result.key_lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(None, None, f"{_kind(key)} cannot be a mapping key",
                                                    key_node.start_mark)
        if key in result:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    result = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    result.line, result.item_lines = node.start_mark.line + 1, [c.start_mark.line + 1 for c in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def shipped_rules_dir() -> Path:
    """The folder of rule files installed with fxrewrite as ``fxrewrite.rulesets`` (``rules/`` in the repository)."""
    return Path(str(importlib.resources.files("fxrewrite.rulesets")))


def load_rules(source: str | Path, *, name: str | None = None) -> RuleSet:
    """Compile a rule file to a :class:`RuleSet`.

    ``source`` is a path, the name of a shipped rule set (``"yolov9"``), or YAML
    text (anything containing a newline). ``name`` labels text in error messages.
    """
    text, label = _read(source, name)
    if len(text) > MAX_TEXT_CHARS:
        raise RuleFileError([RuleProblem(label, None, None, f"too large for a rule file ({len(text):,} characters; "
                                                            f"the limit is {MAX_TEXT_CHARS:,})")])
    try:
        data = guarded_load(text, _Loader)
    except YamlTooLarge as exc:
        raise RuleFileError([RuleProblem(label, exc.line, None,
                                         f"refused: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RuleFileError([RuleProblem(label, mark.line + 1 if mark else None, None,
                                         f"not valid YAML: {problem}")]) from None
    except (ValueError, OverflowError) as exc:
        # Scalars PyYAML resolves but cannot build: 2001-02-30 (a date), an integer of 5000 digits...
        first = str(exc).strip().splitlines()
        raise RuleFileError([RuleProblem(label, None, None, "not valid YAML: a value cannot be read"
                                         + (f" ({first[0]})" if first else ""))]) from None
    return _compile(data, label)


def _read(source: str | Path, name: str | None) -> tuple[str, str]:
    if isinstance(source, str) and "\n" in source:
        return source, name or "<string>"
    label = name or str(source)
    try:
        path = Path(source)
        if not path.exists() and isinstance(source, str) and path.suffix == "":
            shipped = shipped_rules_dir() / f"{source}.yaml"
            if shipped.exists():
                path = shipped
        if not path.is_file():
            raise RuleFileError([RuleProblem(label, None, None, "no such rule file" if not path.exists()
                                             else "not a file")])
        return path.read_text(encoding="utf-8"), label
    except RuleFileError:
        raise
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, not UTF-8, unreadable...
        raise RuleFileError([RuleProblem(label, None, None, f"cannot read: {exc}")]) from None


class _Compiler:
    def __init__(self, file: str):
        self.file = file
        self.problems: list[RuleProblem] = []

    def error(self, line: int | None, rule: str | None, message: str) -> None:
        self.problems.append(RuleProblem(self.file, line, rule, message))

    # -- file -----------------------------------------------------------------
    def file_(self, data: Any) -> RuleSet | None:
        if isinstance(data, list):
            data = _Map(rules=data)
            data.line, data.key_lines = 1, {"rules": 1}
        if not isinstance(data, dict):
            self.error(1, None, "a rule file is a mapping with a 'rules' list (or just that list)")
            return None
        for key in data:
            if key not in FILE_KEYS:
                self.error(data.key_lines.get(key), None, f"unknown key {key!r} at the top level; "
                                                          f"expected {', '.join(sorted(FILE_KEYS))}")
        plugins = data.get("plugins", [])
        if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
            self.error(data.key_lines.get("plugins"), None, "'plugins' must be a list of plug-in names")
            plugins = []
        for plugin in plugins:
            try:
                registry.load_plugin(plugin)
            except Exception as exc:
                self.error(data.key_lines.get("plugins"), None, f"cannot load plug-in {plugin!r}: {exc}")
        max_iterations = data.get("max_iterations", DEFAULT_MAX_ITERATIONS)
        if not isinstance(max_iterations, int) or isinstance(max_iterations, bool) or max_iterations < 1:
            self.error(data.key_lines.get("max_iterations"), None, "'max_iterations' must be a positive integer")
            max_iterations = DEFAULT_MAX_ITERATIONS
        elif max_iterations > MAX_ITERATIONS_LIMIT:
            self.error(data.key_lines.get("max_iterations"), None, f"'max_iterations' must be at most "
                                                                   f"{MAX_ITERATIONS_LIMIT}, not {max_iterations}")
            max_iterations = DEFAULT_MAX_ITERATIONS
        rules_data = data.get("rules")
        if not isinstance(rules_data, list):
            self.error(data.key_lines.get("rules", data.line), None, "'rules' must be a list of rules")
            return None
        rules = [r for r in (self.rule(item, rules_data.item_lines[i] if isinstance(rules_data, _Seq) else None)
                             for i, item in enumerate(rules_data)) if r is not None]
        try:  # also when other rules had problems: every error is reported, not only the first rule's
            ruleset = RuleSet(rules, max_iterations=max_iterations, source=self.file, plugins=tuple(plugins))
        except RuleFileError as exc:
            self.problems += exc.problems
            return None
        return None if self.problems else ruleset

    # -- rule -----------------------------------------------------------------
    def rule(self, data: Any, line: int | None) -> Rule | None:
        if not isinstance(data, dict):
            self.error(line, None, "each rule must be a mapping with at least 'name' and 'action'")
            return None
        name = data.get("name")
        if not isinstance(name, str) or not name:
            self.error(data.line, None, "a rule needs a 'name' (a non-empty string)")
            name = None
        before = len(self.problems)
        lines = data.key_lines
        action_name = data.get("action")
        spec = registry.action(action_name) if isinstance(action_name, str) else None
        for key in data:
            if key not in RULE_KEYS:
                is_argument = spec is not None and (spec.params is None or key in spec.params)
                hint = " (action arguments go under 'args')" if is_argument else ""
                self.error(lines.get(key), name, f"unknown key {key!r}; expected {', '.join(sorted(RULE_KEYS))}{hint}")
        action = data.get("action")
        if not isinstance(action, str):
            self.error(lines.get("action", data.line), name, "a rule needs an 'action' (a string)"
                       if action is None else f"'action' must be a string, not {_kind(action)}")
        pattern = self.pattern(data["pattern"], name, lines.get("pattern")) if "pattern" in data else None
        args = data.get("args", {})
        if not isinstance(args, dict):
            self.error(lines.get("args"), name, f"'args' must be a mapping, not {_kind(args)}")
            args = {}
        checks = self.checks(data.get("checks", []), name, lines.get("checks"))
        mode = data.get("mode", "once")
        if mode not in MODES:
            self.error(lines.get("mode"), name, f"'mode' must be one of {', '.join(MODES)}, not {mode!r}")
        description = data.get("description", "")
        if not isinstance(description, str):
            self.error(lines.get("description"), name, "'description' must be a string")
        if len(self.problems) > before or name is None:
            return None
        key_lines = dict(lines)
        key_lines.update((f"args.{k}", n) for k, n in getattr(args, "key_lines", {}).items())
        return Rule(name=name, action=action, pattern=pattern, args=_plain(args), checks=tuple(checks),
                    mode=mode, description=description, file=self.file, line=data.line, key_lines=key_lines)

    def pattern(self, data: Any, rule: str | None, line: int | None) -> Pattern | None:
        if not isinstance(data, dict):
            self.error(line, rule, f"a pattern must be a mapping, not {_kind(data)}")
            return None
        lines = data.key_lines
        fields: dict[str, Any] = {}
        for key, value in data.items():
            at = lines.get(key)
            if key not in PATTERN_KEYS:
                self.error(at, rule, f"unknown pattern key {key!r}; expected {', '.join(sorted(PATTERN_KEYS))}")
            elif key == "op" and value not in OPS:
                self.error(at, rule, f"'op' must be one of {', '.join(OPS)}, not {value!r}")
            elif key in ("op", "function", "method", "module_class", "module_name", "capture"):
                if not isinstance(value, str):
                    self.error(at, rule, f"pattern key {key!r} must be a string, not {_kind(value)}")
                else:
                    fields[key] = value
            elif key == "attrs":
                if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                    self.error(at, rule, "'attrs' must be a mapping of attribute names (strings) to values, not "
                                         + (_kind(value) if not isinstance(value, dict) else
                                            f"one with the key {next(k for k in value if not isinstance(k, str))!r}"))
                else:
                    fields[key] = _plain(value)
            elif key in ("num_inputs", "num_users"):
                count = self.count(value, key, rule, at)
                if count is not None:
                    fields[key] = count
            elif key == "inputs":
                if not isinstance(value, list):
                    self.error(at, rule, f"'inputs' must be a list of patterns (or null for any), not {_kind(value)}")
                else:
                    item_lines = getattr(value, "item_lines", [at] * len(value))
                    subs = [None if v is None else self.pattern(v, rule, item_lines[i]) for i, v in enumerate(value)]
                    fields[key] = tuple(subs)
        return Pattern(**fields)

    def count(self, value: Any, key: str, rule: str | None, line: int | None) -> Count | None:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return Count(value, value)
        if isinstance(value, dict) and set(value) <= {"min", "max"} and value and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value.values()):
            return Count(value.get("min"), value.get("max"))
        self.error(line, rule, f"{key!r} must be a non-negative integer or a mapping {{min, max}}, "
                               f"not {_kind(value)} ({value!r})")
        return None

    def checks(self, data: Any, rule: str | None, line: int | None) -> list[Check]:
        if not isinstance(data, list):
            self.error(line, rule, f"'checks' must be a list of one-key mappings {{check: arguments}}, not {_kind(data)}")
            return []
        found = []
        for i, item in enumerate(data):
            at = data.item_lines[i] if isinstance(data, _Seq) else line
            if isinstance(item, str):
                item = {item: None}
            if not isinstance(item, dict) or len(item) != 1:
                self.error(at, rule, "each check must be a check name or a one-key mapping {check: arguments}")
                continue
            ((name, value),) = item.items()
            if isinstance(value, list):
                found.append(Check(name, tuple(_plain(value)), {}, at))
            elif isinstance(value, dict):
                found.append(Check(name, (), _plain(value), at))
            elif value is None:
                found.append(Check(name, (), {}, at))
            else:
                found.append(Check(name, (value,), {}, at))
        return found


def _compile(data: Any, label: str) -> RuleSet:
    compiler = _Compiler(label)
    rules = compiler.file_(data)
    if compiler.problems or rules is None:
        problems = sorted(compiler.problems, key=lambda p: p.line or 0)  # in file order
        raise RuleFileError(problems or [RuleProblem(label, None, None, "no rules")])
    return rules


def _plain(value: Any) -> Any:
    """Strip the line-number wrappers: rules hold plain dicts and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _kind(value: Any) -> str:
    return {dict: "a mapping", _Map: "a mapping", list: "a list", _Seq: "a list", str: "a string",
            int: "an integer", float: "a number", bool: "a boolean", type(None): "null"}.get(type(value),
                                                                                            type(value).__name__)
