"""Rule files: YAML compiled to :class:`~fxrewrite.rules.RuleSet` objects, with line numbers.

.. code-block:: yaml

    plugins: [yolov9]          # optional: plug-ins whose classes and actions the rules use
    max_iterations: 100        # optional: bound for fixed-point rules
    rules:
      - name: drop-identity
        pattern: {module_class: Identity}
        checks: [passthrough]  # checks and actions apply to the pattern's root by default
        action: collapse
        mode: fixed_point

Owns the YAML side of the rule language: reading (safely, with line numbers), the
file and rule keys, the pattern keys (derived from the :class:`~fxrewrite.pattern.Pattern`
dataclass, with their parsers) and rules over a table (``table:``: one rule per row,
``{column}`` in the rule replaced by the row's value). Checking a rule against the
registry is :mod:`fxrewrite.rules`' job.

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
from pathlib import Path
from typing import Any

import yaml

from . import registry as registries
from .errors import RuleFileError, RuleProblem
from .rule_tables import substitute
from .safe_yaml import MAX_TEXT_CHARS, YamlTooLarge, guarded_load
from .yaml_lines import LineList, LineLoader, LineMap, kind_of, plain
from .pattern import Count, Pattern, pattern_keys
from .rules import DEFAULT_MAX_ITERATIONS, MAX_ITERATIONS_LIMIT, MODES, Check, Rule, RuleSet, duplicate_names

FILE_KEYS = {"rules", "plugins", "max_iterations", "description"}
RULE_KEYS = {"name", "description", "pattern", "checks", "action", "args", "mode", "table"}
PATTERN_FIELDS = pattern_keys()  # key -> {"kind": ..., "choices": ...}, from the Pattern dataclass
PATTERN_KEYS = set(PATTERN_FIELDS)


def shipped_rules_dir() -> Path:
    """The folder of rule files installed with fxrewrite as ``fxrewrite.rulesets`` (``rules/`` in the repository)."""
    return Path(str(importlib.resources.files("fxrewrite.rulesets")))


def load_rules(source: str | Path, *, name: str | None = None,
               registry: registries.Registry | None = None) -> RuleSet:
    """Compile a rule file to a :class:`RuleSet`.

    ``source`` is a path, the name of a shipped rule set (``"yolov9"``), or YAML
    text (anything containing a newline). ``name`` labels text in error messages.
    ``registry``: what the rules are checked against and bound to (default: the current
    registry, see :func:`fxrewrite.registry.current`); the plug-ins the file names are
    loaded into :data:`fxrewrite.registry.DEFAULT`, so give a registry whose parents
    include it when the file names plug-ins.
    """
    text, label = _read(source, name)
    if len(text) > MAX_TEXT_CHARS:
        raise RuleFileError([RuleProblem(label, None, None, f"too large for a rule file ({len(text):,} characters; "
                                                            f"the limit is {MAX_TEXT_CHARS:,})")])
    try:
        data = guarded_load(text, LineLoader)
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
    return _compile(data, label, registry)


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
    def __init__(self, file: str, registry: registries.Registry | None = None):
        self.file = file
        self.registry = registry
        self.problems: list[RuleProblem] = []
        self.named: list[Rule] = []  # every rule with a name, also those with problems (duplicate names)

    def error(self, line: int | None, rule: str | None, message: str) -> None:
        self.problems.append(RuleProblem(self.file, line, rule, message))

    # -- file -----------------------------------------------------------------
    def file_(self, data: Any) -> RuleSet | None:
        if isinstance(data, list):
            data = LineMap(rules=data)
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
                registries.load_plugin(plugin)
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
        rules = [r for i, item in enumerate(rules_data)
                 for r in self.rules(item, rules_data.item_lines[i] if isinstance(rules_data, LineList) else None)]
        # A rule with problems is left out of the set, yet its name still counts: a duplicate of it is
        # reported too (the set reports the duplicates among the others again; _compile keeps one of each).
        self.problems += [problem for _, problem in duplicate_names(self.named)]
        try:  # also when other rules had problems: every error is reported, not only the first rule's
            ruleset = RuleSet(rules, max_iterations=max_iterations, source=self.file, plugins=tuple(plugins),
                              registry=self.registry)
        except RuleFileError as exc:
            self.problems += exc.problems
            return None
        return None if self.problems else ruleset

    # -- rule -----------------------------------------------------------------
    def rules(self, data: Any, line: int | None) -> list[Rule]:
        """The rule ``data`` describes, or one per row of its ``table``."""
        if not isinstance(data, dict) or "table" not in data:
            rule = self.rule(data, line)
            return [] if rule is None else [rule]
        template = LineMap((k, v) for k, v in data.items() if k != "table")
        template.line, template.key_lines = data.line, data.key_lines
        rows = self.table(data["table"], data)
        found = []
        for row, row_line in rows:
            used: set[str] = set()
            unknown: set[str] = set()
            expanded = substitute(template, row, used, unknown)
            expanded.line = row_line  # the generated rule is where its row is
            name = expanded.get("name") if isinstance(expanded.get("name"), str) else data.get("name")
            for column in sorted(unknown):
                self.error(data.line, name, f"{{{column}}} is not a column of the table "
                                            f"(columns: {', '.join(sorted(row))})")
            for column in sorted(set(row) - used):
                self.error(row_line, name, f"table column {column!r} is used nowhere in the rule")
            rule = self.rule(expanded, row_line)
            if rule is not None:
                found.append(rule)
        return found

    def table(self, data: Any, rule: dict) -> list[tuple[dict, int]]:
        """The rows of a rule's ``table`` with their lines (problems reported)."""
        at, name = rule.key_lines.get("table"), rule.get("name")
        if not isinstance(data, list) or not data:
            self.error(at, name, "'table' must be a non-empty list of mappings {column: value}")
            return []
        rows = []
        for i, row in enumerate(data):
            row_line = data.item_lines[i] if isinstance(data, LineList) else at
            if not isinstance(row, dict) or not row or not all(isinstance(k, str) for k in row):
                self.error(row_line, name, "each row of 'table' must be a mapping {column: value} with column names")
                continue
            rows.append((row, row_line))
        return rows

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
        spec = (self.registry or registries.current()).action(action_name) if isinstance(action_name, str) else None
        for key in data:
            if key not in RULE_KEYS:
                is_argument = spec is not None and (spec.params is None or key in spec.params)
                hint = " (action arguments go under 'args')" if is_argument else ""
                self.error(lines.get(key), name, f"unknown key {key!r}; expected {', '.join(sorted(RULE_KEYS))}{hint}")
        action = data.get("action")
        if not isinstance(action, str):
            self.error(lines.get("action", data.line), name, "a rule needs an 'action' (a string)"
                       if action is None else f"'action' must be a string, not {kind_of(action)}")
        pattern = self.pattern(data["pattern"], name, lines.get("pattern")) if "pattern" in data else None
        args = data.get("args", {})
        if not isinstance(args, dict):
            self.error(lines.get("args"), name, f"'args' must be a mapping, not {kind_of(args)}")
            args = {}
        checks = self.checks(data.get("checks", []), name, lines.get("checks"))
        mode = data.get("mode", "once")
        if mode not in MODES:
            self.error(lines.get("mode"), name, f"'mode' must be one of {', '.join(MODES)}, not {mode!r}")
        description = data.get("description", "")
        if not isinstance(description, str):
            self.error(lines.get("description"), name, "'description' must be a string")
        if name is not None:
            self.named.append(Rule(name=name, action="", file=self.file, line=data.line))
        if len(self.problems) > before or name is None:
            return None
        key_lines = dict(lines)
        key_lines.update((f"args.{k}", n) for k, n in getattr(args, "key_lines", {}).items())
        return Rule(name=name, action=action, pattern=pattern, args=plain(args), checks=tuple(checks),
                    mode=mode, description=description, file=self.file, line=data.line, key_lines=key_lines)

    def pattern(self, data: Any, rule: str | None, line: int | None) -> Pattern | None:
        if not isinstance(data, dict):
            self.error(line, rule, f"a pattern must be a mapping, not {kind_of(data)}")
            return None
        lines = data.key_lines
        fields: dict[str, Any] = {}
        for key, value in data.items():
            at = lines.get(key)
            spec = PATTERN_FIELDS.get(key)
            if spec is None:
                self.error(at, rule, f"unknown pattern key {key!r}; expected {', '.join(sorted(PATTERN_KEYS))}")
                continue
            parsed = getattr(self, f"_pattern_{spec['kind']}")(key, value, spec, rule, at)
            if parsed is not _INVALID:
                fields[key] = parsed
        return Pattern(**fields)

    # One parser per kind of pattern key (see fxrewrite.pattern._key); each returns the field's
    # value, or _INVALID after reporting the problem.
    def _pattern_choice(self, key: str, value: Any, spec: dict, rule: str | None, at: int | None) -> Any:
        if value not in spec["choices"]:
            self.error(at, rule, f"{key!r} must be one of {', '.join(spec['choices'])}, not {value!r}")
            return _INVALID
        return value

    def _pattern_string(self, key: str, value: Any, spec: dict, rule: str | None, at: int | None) -> Any:
        if not isinstance(value, str):
            self.error(at, rule, f"pattern key {key!r} must be a string, not {kind_of(value)}")
            return _INVALID
        return value

    def _pattern_attrs(self, key: str, value: Any, spec: dict, rule: str | None, at: int | None) -> Any:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            self.error(at, rule, f"{key!r} must be a mapping of attribute names (strings) to values, not "
                                 + (kind_of(value) if not isinstance(value, dict) else
                                    f"one with the key {next(k for k in value if not isinstance(k, str))!r}"))
            return _INVALID
        return plain(value)

    def _pattern_count(self, key: str, value: Any, spec: dict, rule: str | None, at: int | None) -> Any:
        count = self.count(value, key, rule, at)
        return _INVALID if count is None else count

    def _pattern_patterns(self, key: str, value: Any, spec: dict, rule: str | None, at: int | None) -> Any:
        if not isinstance(value, list):
            self.error(at, rule, f"{key!r} must be a list of patterns (or null for any), not {kind_of(value)}")
            return _INVALID
        item_lines = getattr(value, "item_lines", [at] * len(value))
        return tuple(None if v is None else self.pattern(v, rule, item_lines[i]) for i, v in enumerate(value))

    def count(self, value: Any, key: str, rule: str | None, line: int | None) -> Count | None:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return Count(value, value)
        if isinstance(value, dict) and set(value) <= {"min", "max"} and value and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value.values()):
            return Count(value.get("min"), value.get("max"))
        self.error(line, rule, f"{key!r} must be a non-negative integer or a mapping {{min, max}}, "
                               f"not {kind_of(value)} ({value!r})")
        return None

    def checks(self, data: Any, rule: str | None, line: int | None) -> list[Check]:
        if not isinstance(data, list):
            self.error(line, rule, f"'checks' must be a list of one-key mappings {{check: arguments}}, not {kind_of(data)}")
            return []
        found = []
        for i, item in enumerate(data):
            at = data.item_lines[i] if isinstance(data, LineList) else line
            if isinstance(item, str):
                item = {item: None}
            if not isinstance(item, dict) or len(item) != 1:
                self.error(at, rule, "each check must be a check name or a one-key mapping {check: arguments}")
                continue
            ((name, value),) = item.items()
            if isinstance(value, list):
                found.append(Check(name, tuple(plain(value)), {}, at))
            elif isinstance(value, dict):
                found.append(Check(name, (), plain(value), at))
            elif value is None:
                found.append(Check(name, (), {}, at))
            else:
                found.append(Check(name, (value,), {}, at))
        return found


_INVALID = object()


def _compile(data: Any, label: str, registry: registries.Registry | None = None) -> RuleSet:
    compiler = _Compiler(label, registry)
    rules = compiler.file_(data)
    if compiler.problems or rules is None:
        unique = list({str(p): p for p in compiler.problems}.values())  # a duplicate name is found twice
        problems = sorted(unique, key=lambda p: p.line or 0)  # in file order
        raise RuleFileError(problems or [RuleProblem(label, None, None, "no rules")])
    return rules
