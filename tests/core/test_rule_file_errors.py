"""Rule files: every error names file, line and rule; all are collected; nothing is applied."""
from __future__ import annotations

import textwrap

import pytest

import fxrewrite
from fxrewrite import Check, Pattern, Rule, RuleFileError, RuleSet, registry

from helpers.toy_models import TwoBranch, example, seeded

PATTERN_KEYS = "attrs, capture, function, inputs, method, module_class, module_name, num_inputs, num_users, op"
RULE_KEYS = "action, args, checks, description, mode, name, pattern, table"


def known_actions() -> str:
    return ", ".join(registry.action_names())  # other tests and plug-ins register actions too


def known_checks() -> str:
    return ", ".join(registry.check_names())


CASES = {
    "unknown top-level key": ("""\
        rules:
          - name: a
            action: collapse
            pattern: {module_class: Identity}
        extra: 1
        """, "{file}:5: unknown key 'extra' at the top level; expected description, max_iterations, plugins, rules"),
    "unknown rule key that is an action argument": ("""\
        rules:
          - name: a
            action: collapse
            pattern: {module_class: Identity}
            input: 0
        """, f"{{file}}:5: rule 'a': unknown key 'input'; expected {RULE_KEYS} (action arguments go under 'args')"),
    "unknown rule key": ("""\
        rules:
          - name: a
            action: collapse
            pattern: {module_class: Identity}
            colour: red
        """, f"{{file}}:5: rule 'a': unknown key 'colour'; expected {RULE_KEYS}"),
    "unknown pattern key": ("""\
        rules:
          - name: a
            action: collapse
            pattern:
              module_class: Identity
              users: 1
        """, f"{{file}}:6: rule 'a': unknown pattern key 'users'; expected {PATTERN_KEYS}"),
    "unknown key in an input pattern": ("""\
        rules:
          - name: a
            action: collapse
            pattern:
              module_class: BatchNorm2d
              inputs:
                - {module_class: Conv2d}
                - {module: Conv2d}
        """, f"{{file}}:8: rule 'a': unknown pattern key 'module'; expected {PATTERN_KEYS}"),
    "unknown action argument": ("""\
        rules:
          - name: a
            action: collapse
            pattern: {module_class: Identity}
            args:
              node: $root
              inptu: 0
        """, "{file}:7: rule 'a': unknown argument 'inptu' for action 'collapse'; known: input, node"),
    "wrong type: num_users": ("""\
        rules:
          - name: a
            action: collapse
            pattern:
              module_class: Identity
              num_users: two
        """, "{file}:6: rule 'a': 'num_users' must be a non-negative integer or a mapping {{min, max}}, "
             "not a string ('two')"),
    "wrong type: action argument": ("""\
        rules:
          - name: a
            action: collapse
            pattern: {module_class: Identity}
            args:
              input: first
        """, "{file}:6: rule 'a': argument 'input' of action 'collapse' must be an integer, not a string ('first')"),
    "wrong type: boolean for an integer": ("""\
        rules:
          - name: a
            action: collapse
            pattern: {module_class: Identity}
            args: {input: true}
        """, "{file}:5: rule 'a': argument 'input' of action 'collapse' must be an integer, not a boolean (True)"),
    "wrong type: mode": ("""\
        rules:
          - name: a
            action: collapse
            pattern: {module_class: Identity}
            mode: sometimes
        """, "{file}:5: rule 'a': 'mode' must be one of once, fixed_point, not 'sometimes'"),
    "wrong type: op": ("""\
        rules:
          - name: a
            action: collapse
            pattern: {op: call}
        """, "{file}:4: rule 'a': 'op' must be one of placeholder, get_attr, call_function, call_method, "
             "call_module, output, not 'call'"),
    "wrong type: pattern": ("""\
        rules:
          - name: a
            action: collapse
            pattern: Identity
        """, "{file}:4: rule 'a': a pattern must be a mapping, not a string"),
    "missing name": ("""\
        rules:
          - action: collapse
            pattern: {module_class: Identity}
        """, "{file}:2: a rule needs a 'name' (a non-empty string)"),
    "missing action": ("""\
        rules:
          - name: a
            pattern: {module_class: Identity}
        """, "{file}:2: rule 'a': a rule needs an 'action' (a string)"),
    "missing required argument": ("""\
        rules:
          - name: a
            pattern: {module_class: Conv2d}
            action: replace
        """, "{file}:4: rule 'a': action 'replace' needs argument 'with'"),
    "per-match action without a pattern": ("""\
        rules:
          - name: a
            action: collapse
        """, "{file}:3: rule 'a': action 'collapse' rewrites matched nodes and needs a pattern"),
    "check with a bad argument form": ("""\
        rules:
          - name: a
            pattern: {module_class: Identity}
            checks:
              - {passthrough: $root, max_users: 1}
            action: collapse
        """, "{file}:5: rule 'a': each check must be a check name or a one-key mapping {{check: arguments}}"),
    "rules is not a list": ("""\
        rules: {name: a}
        """, "{file}:1: 'rules' must be a list of rules"),
    "bad max_iterations": ("""\
        max_iterations: 0
        rules:
          - name: a
            action: prune_unreachable
        """, "{file}:1: 'max_iterations' must be a positive integer"),
    "unknown check": ("""\
        rules:
          - name: a
            pattern: {module_class: Identity, capture: x}
            checks:
              - passthru: $x
            action: collapse
        """, "{file}:5: rule 'a': unknown check 'passthru'; known checks: " + known_checks()),
    "capture used in a check but never bound": ("""\
        rules:
          - name: a
            pattern: {module_class: Identity, capture: x}
            checks:
              - max_users: {node: $x, count: 1}
              - passthrough: $y
            action: collapse
        """, "{file}:6: rule 'a': check 'passthrough' uses capture $y, which the pattern never binds "
             "(bound: $root, $x)"),
    "capture used in an argument but never bound": ("""\
        rules:
          - name: a
            pattern:
              module_class: BatchNorm2d
              inputs: [{module_class: Conv2d, capture: conv}]
            action: collapse
            args: {node: $identity}
        """, "{file}:7: rule 'a': action 'collapse' uses capture $identity, which the pattern never binds "
             "(bound: $conv, $root)"),
    "duplicate rule name": ("""\
        rules:
          - name: a
            pattern: {module_class: Identity}
            action: collapse
          - name: a
            action: prune_unreachable
        """, "{file}:5: rule 'a': duplicate rule name (first defined at line 2)"),
    "duplicate key": ("""\
        rules:
          - name: a
            action: collapse
            action: remove
        """, "{file}:4: not valid YAML: duplicate key 'action'"),
    "invalid YAML": ("""\
        rules:
          - name: a
            pattern: {module_class: Identity
            action: collapse
        """, "{file}:4: not valid YAML: expected ',' or '}}', but got ':'"),
    "empty file": ("", "{file}:1: a rule file is a mapping with a 'rules' list (or just that list)"),
}


@pytest.mark.parametrize("text, expected", list(CASES.values()), ids=list(CASES))
def test_each_error_names_file_line_and_rule(tmp_path, text, expected):
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(RuleFileError) as info:
        fxrewrite.load_rules(path)
    assert str(info.value) == expected.format(file=path)
    assert len(info.value.problems) == 1
    problem = info.value.problems[0]
    assert str(problem) == str(info.value)
    assert problem.file == str(path)


def test_unknown_action_lists_the_known_ones(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - name: a\n    action: colapse\n    pattern: {module_class: Identity}\n")
    with pytest.raises(RuleFileError) as info:
        fxrewrite.load_rules(path)
    assert str(info.value) == f"{path}:3: rule 'a': unknown action 'colapse'; known actions: {known_actions()}"
    assert {"collapse", "prune_unreachable", "remove", "replace"} <= set(registry.action_names())
    assert {"attr_equals", "max_users", "not_output", "passthrough", "same_shape"} <= set(registry.check_names())
    assert (info.value.problems[0].line, info.value.problems[0].rule) == (3, "a")


def test_unknown_module_class_in_replace(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - name: a\n    pattern: {module_class: Conv2d}\n    action: replace\n"
                    "    args:\n      with: FancyConv\n")
    with pytest.raises(RuleFileError) as info:
        fxrewrite.load_rules(path)
    registered = ", ".join(registry.module_class_names()) or "none"
    assert str(info.value) == (f"{path}:6: rule 'a': unknown module class 'FancyConv' in replace; register it "
                               f"with fxrewrite.register_module_class (registered: {registered})")


def test_torch_classes_need_no_registration(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - name: a\n    pattern: {module_class: ReLU}\n    action: replace\n"
                    "    args: {with: nn.GELU}\n")
    assert [r.name for r in fxrewrite.load_rules(path)] == ["a"]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(RuleFileError) as info:
        fxrewrite.load_rules(path)
    assert str(info.value) == f"{path}: no such rule file"
    assert (info.value.problems[0].line, info.value.problems[0].rule) == (None, None)


def test_a_folder_is_not_a_rule_file(tmp_path):
    with pytest.raises(RuleFileError) as info:
        fxrewrite.load_rules(tmp_path)
    assert str(info.value) == f"{tmp_path}: not a file"


def test_text_is_labelled_string_or_by_name():
    text = "rules:\n  - name: a\n    action: colapse\n"
    with pytest.raises(RuleFileError, match=r"^<string>:3: rule 'a': unknown action 'colapse'"):
        fxrewrite.load_rules(text)
    with pytest.raises(RuleFileError, match=r"^my rules:3: rule 'a': unknown action 'colapse'"):
        fxrewrite.load_rules(text, name="my rules")


def test_all_errors_are_collected_in_file_order(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text(textwrap.dedent("""\
        rules:
          - name: a
            pattern: {module_class: Identity, num_users: two}
            action: collapse
          - name: b
            action: prune_unreachable
            args: {outputs: 0}
          - name: c
            pattern: {module_class: Identity, capture: x}
            checks:
              - passthru: $x
            action: colapse
          - name: b
            action: prune_unreachable
        colour: blue
        """))
    with pytest.raises(RuleFileError) as info:
        fxrewrite.load_rules(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:3: rule 'a': 'num_users' must be a non-negative integer or a mapping {{min, max}}, "
        f"not a string ('two')",
        f"{path}:7: rule 'b': argument 'outputs' of action 'prune_unreachable' must be a list, not an integer (0)",
        f"{path}:11: rule 'c': unknown check 'passthru'; known checks: {known_checks()}",
        f"{path}:12: rule 'c': unknown action 'colapse'; known actions: {known_actions()}",
        f"{path}:13: rule 'b': duplicate rule name (first defined at line 5)",
        f"{path}:15: unknown key 'colour' at the top level; expected description, max_iterations, plugins, rules",
    ]
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    assert isinstance(info.value, ValueError) and isinstance(info.value, fxrewrite.FxRewriteError)


def test_rules_built_in_python_are_validated_and_nothing_is_applied():
    model = seeded(TwoBranch())
    x = example(2, 3, 8, 8)
    gm = fxrewrite.trace(model, x)
    code = gm.code
    good = Rule("keep-main", "prune_unreachable", args={"outputs": [0]})
    bad = Rule("bad", "collapse", Pattern(module_class="Identity", capture="x"),
               checks=[Check("passthrough", ("$y",))], args={"input": "0"})
    with pytest.raises(RuleFileError) as info:
        fxrewrite.rewrite(gm, [good, bad])
    assert [str(p) for p in info.value.problems] == [
        "<python>: rule 'bad': argument 'input' of action 'collapse' must be an integer, not a string ('0')",
        "<python>: rule 'bad': check 'passthrough' uses capture $y, which the pattern never binds "
        "(bound: $root, $x)",
    ]
    assert gm.code == code and len(gm(x)) == 2
    with pytest.raises(RuleFileError):
        RuleSet([good, bad])


def test_valid_file_compiles_with_lines(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(textwrap.dedent("""\
        max_iterations: 7
        description: fine
        rules:
          - name: keep-main
            action: prune_unreachable
            args: {outputs: [0]}
          - name: drop-identity
            description: pass-through layers
            pattern:
              module_class: Identity
              capture: x
              num_users: {min: 1}
            checks:
              - passthrough: $x
              - not_output
            action: collapse
            mode: fixed_point
        """))
    rules = fxrewrite.load_rules(path)
    assert rules.max_iterations == 7 and rules.source == str(path)
    keep, drop = rules.rules
    assert (keep.name, keep.line, keep.file, keep.args, keep.mode) == (
        "keep-main", 4, str(path), {"outputs": [0]}, "once")
    assert drop.pattern == Pattern(module_class="Identity", capture="x", num_users=fxrewrite.Count(1, None))
    assert drop.checks == (Check("passthrough", ("$x",), {}, 14), Check("not_output", (), {}, 15))
    assert (drop.line, drop.mode, drop.description) == (7, "fixed_point", "pass-through layers")
    result = fxrewrite.rewrite(fxrewrite.trace(seeded(TwoBranch()), example(1, 3, 8, 8)), rules)
    assert result.nodes_with_status("collapsed") == ["main_1", "skip"]


def test_a_bare_list_is_a_rule_file():
    rules = fxrewrite.load_rules("- {name: a, action: prune_unreachable}\n")
    assert [r.name for r in rules] == ["a"]
