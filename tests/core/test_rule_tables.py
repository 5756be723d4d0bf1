"""Rules over a table (``table:`` in a rule file): one rule per row, ``{column}`` replaced by its value."""
from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import RuleFileError


def load(text: str, tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text))
    return path, fxrewrite.load_rules(path)


def test_one_rule_per_row_with_typed_values(tmp_path):
    path, rules = load("""\
        rules:
          - name: "{name}"
            description: keep {what}
            table:
              - {name: drop-identity, cls: Identity, what: nothing, input: 0}
              - name: drop-dropout
                cls: Dropout
                what: the first input
                input: -1
            pattern: {module_class: "{cls}"}
            action: collapse
            args: {input: "{input}"}
        """, tmp_path)
    assert [(r.name, r.line, r.pattern.module_class, r.args, r.description) for r in rules] == [
        ("drop-identity", 5, "Identity", {"input": 0}, "keep nothing"),
        ("drop-dropout", 6, "Dropout", {"input": -1}, "keep the first input"),
    ]
    model = nn.Sequential(nn.Linear(2, 2), nn.Identity(), nn.Dropout(), nn.ReLU()).eval()
    x = torch.randn(3, 2)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), rules)
    assert [str(entry) for entry in result.log] == ["drop-identity (collapse): 1 matched, 1 rewritten",
                                                    "drop-dropout (collapse): 1 matched, 1 rewritten"]
    assert torch.equal(result.module(x), model(x))


def test_mappings_and_unquoted_placeholders(tmp_path):
    path, rules = load("""\
        plugins: [yolov9]
        rules:
          - name: "{name}"
            table:
              - {name: a, with: DDetect, rename: {cv4: cv2}}
            pattern: {module_class: DualDDetect}
            action: replace
            args: {with: {with}, rename: "{rename}"}
        """, tmp_path)
    assert rules.rules[0].args == {"with": "DDetect", "rename": {"cv4": "cv2"}}


@pytest.mark.parametrize("text, problems", [
    ("""\
        rules:
          - name: "{name}"
            table: [{name: a, cls: Identity, extra: 1}]
            pattern: {module_class: "{cls}"}
            action: collapse
        """, ["{file}:3: rule 'a': table column 'extra' is used nowhere in the rule"]),
    ("""\
        rules:
          - name: "{name}"
            table: [{name: a}]
            pattern: {module_class: "{clss}"}
            action: collapse
        """, ["{file}:2: rule 'a': {{clss}} is not a column of the table (columns: name)"]),
    ("""\
        rules:
          - name: same
            table: [{cls: Identity}, {cls: ReLU}]
            pattern: {module_class: "{cls}"}
            action: collapse
        """, ["{file}:3: rule 'same': duplicate rule name (first defined at line 3)"]),
    ("""\
        rules:
          - name: a
            table: []
            action: prune_unreachable
        """, ["{file}:3: rule 'a': 'table' must be a non-empty list of mappings {{column: value}}"]),
    ("""\
        rules:
          - name: a
            table: [1]
            action: prune_unreachable
        """, ["{file}:3: rule 'a': each row of 'table' must be a mapping {{column: value}} with column names"]),
    ("""\
        rules:
          - name: "{name}"
            table: [{name: a, input: one}]
            pattern: {module_class: Identity}
            action: collapse
            args: {input: "{input}"}
        """, ["{file}:6: rule 'a': argument 'input' of action 'collapse' must be an integer, not a string ('one')"]),
])
def test_problems_name_the_row_or_the_rule(tmp_path, text, problems):
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(RuleFileError) as info:
        fxrewrite.load_rules(path)
    assert [str(p) for p in info.value.problems] == [p.format(file=path) for p in problems]


def test_the_shipped_head_rules_are_one_table():
    rules = fxrewrite.load_rules("yolov9")
    heads = [r for r in rules if r.action == "replace"]
    assert [(r.name, r.pattern.module_class, r.args["with"], r.args["inputs"], r.args["rename"]) for r in heads] == [
        ("dual-ddetect-to-ddetect", "DualDDetect", "DDetect", {"split": 2, "keep": "last"},
         {"cv4": "cv2", "cv5": "cv3", "dfl2": "dfl"}),
        ("dual-detect-to-detect", "DualDetect", "Detect", {"split": 2, "keep": "last"},
         {"cv4": "cv2", "cv5": "cv3", "dfl2": "dfl"}),
        ("triple-ddetect-to-ddetect", "TripleDDetect", "DDetect", {"split": 3, "keep": "last"},
         {"cv6": "cv2", "cv7": "cv3", "dfl3": "dfl"}),
        ("dual-dsegment-to-dsegment", "DualDSegment", "DSegment", [3, 4, 5, 7],
         {"cv4": "cv2", "cv5": "cv3", "dfl2": "dfl", "cv7": "cv4", "proto2": "proto"}),
    ]
