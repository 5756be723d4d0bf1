"""Patterns (fxrewrite.pattern): every key, alone and combined, in Python and in rule files.

Each key is asserted by what it matches (exact node lists) and, for the rule-file forms, by
what a rule using it rewrites.
"""
from __future__ import annotations

import operator
from dataclasses import fields

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import Count, Pattern, RuleFileError
from fxrewrite.pattern import OPS, pattern_keys
from fxrewrite.rule_file import PATTERN_KEYS

from helpers.toy_models import TwoBranch, example, seeded


class Mixed(nn.Module):
    """Modules, functions, methods and a parameter: one node of each kind, some read twice."""

    def __init__(self):
        super().__init__()
        self.up = nn.Upsample(scale_factor=1.0)
        self.up2 = nn.Upsample(scale_factor=2.0)
        self.pool = nn.MaxPool2d(kernel_size=(2, 2), stride=(2, 2))
        self.pool3 = nn.MaxPool2d(kernel_size=[3, 3], stride=1, padding=1)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        a = self.up(x)                      # read by b, c
        b = self.pool3(a)
        c = torch.cat([a, b, a], 1)         # 3 inputs (a twice)
        d = self.up2(self.pool(c))
        e = d.relu() * self.scale           # mul: relu, scale
        return e + d, torch.add(a, b)


@pytest.fixture(scope="module")
def gm():
    return fxrewrite.trace(Mixed().eval(), torch.zeros(1, 2, 4, 4))


def names(pattern: Pattern, gm) -> list[str]:
    return [m.root.name for m in pattern.find(gm)]


def test_the_traced_model_has_the_nodes_the_tests_expect(gm):
    assert [n.name for n in gm.graph.nodes] == ["x", "up", "pool3", "cat", "pool", "up2", "relu", "scale", "mul",
                                                "add", "add_1", "output"]


def test_op(gm):
    assert names(Pattern(op="placeholder"), gm) == ["x"]
    assert names(Pattern(op="get_attr"), gm) == ["scale"]
    assert names(Pattern(op="call_method"), gm) == ["relu"]
    assert names(Pattern(op="output"), gm) == ["output"]
    with pytest.raises(ValueError, match="unknown op 'call'"):
        Pattern(op="call")


def test_function_by_qualified_or_short_name_or_glob(gm):
    assert names(Pattern(function="torch.cat"), gm) == ["cat"]
    assert names(Pattern(function="cat"), gm) == ["cat"]
    assert names(Pattern(function="operator.add"), gm) == ["add"]  # e + d
    assert names(Pattern(function="add"), gm) == ["add", "add_1"]  # operator.add and torch.add
    assert names(Pattern(function="torch.add"), gm) == ["add_1"]
    assert names(Pattern(function="operator.*"), gm) == ["mul", "add"]


def test_method(gm):
    assert names(Pattern(method="relu"), gm) == ["relu"]
    assert names(Pattern(method="r*"), gm) == ["relu"]
    assert names(Pattern(method="view"), gm) == []


def test_module_class_by_name_qualified_name_or_glob(gm):
    assert names(Pattern(module_class="Upsample"), gm) == ["up", "up2"]
    assert names(Pattern(module_class="torch.nn.modules.pooling.MaxPool2d"), gm) == ["pool3", "pool"]
    assert names(Pattern(module_class="*Pool*"), gm) == ["pool3", "pool"]
    assert names(Pattern(module_class="Up"), gm) == []  # the whole name


def test_module_name(gm):
    assert names(Pattern(module_name="pool*"), gm) == ["pool3", "pool"]
    assert names(Pattern(module_name="up"), gm) == ["up"]


def test_attrs_compare_lists_tuples_and_numbers(gm):
    assert names(Pattern(attrs={"scale_factor": 2.0}), gm) == ["up2"]
    assert names(Pattern(attrs={"scale_factor": 2}), gm) == ["up2"]  # 2 == 2.0
    # kernel_size is a tuple on one pool and a list on the other: a YAML list matches both
    assert names(Pattern(attrs={"kernel_size": [3, 3]}), gm) == ["pool3"]
    assert names(Pattern(attrs={"kernel_size": (2, 2), "stride": [2, 2]}), gm) == ["pool"]
    assert names(Pattern(attrs={"kernel_size": [2, 2, 2]}), gm) == []  # the length counts
    assert names(Pattern(attrs={"no_such_attribute": None}), gm) == []  # missing is never equal
    assert names(Pattern(attrs={"stride": 1}), gm) == ["pool3"]


def test_num_inputs_exact_and_ranges(gm):
    assert names(Pattern(num_inputs=3), gm) == ["cat"]
    assert names(Pattern(num_inputs=Count(min=2), op="call_function"), gm) == ["cat", "mul", "add", "add_1"]
    assert names(Pattern(num_inputs={"max": 0}), gm) == ["x", "scale"]
    assert names(Pattern(num_inputs={"min": 1, "max": 1}, op="call_module"), gm) == ["up", "pool3", "pool", "up2"]


def test_num_users_exact_and_ranges(gm):
    assert names(Pattern(num_users={"min": 2}), gm) == ["up", "pool3", "up2"]  # a: b, cat (x2), add_1
    assert names(Pattern(num_users=0), gm) == ["output"]
    assert names(Pattern(num_users=Count(max=1), op="call_module"), gm) == ["pool"]


def test_inputs_match_in_argument_order_with_null_for_any(gm):
    assert names(Pattern(function="cat", inputs=[None, Pattern(module_name="pool3")]), gm) == ["cat"]
    assert names(Pattern(function="cat", inputs=[Pattern(module_name="pool3")]), gm) == []
    assert names(Pattern(inputs=[None, None, Pattern(module_name="up")]), gm) == ["cat"]  # a, b, a
    # more sub-patterns than inputs: no match
    assert names(Pattern(module_class="Upsample", inputs=[None, None]), gm) == []


def test_a_capture_bound_twice_binds_the_same_node(gm):
    twice = Pattern(function="cat", inputs=[Pattern(capture="a"), None, Pattern(capture="a")])
    assert names(twice, gm) == ["cat"]
    (m,) = twice.find(gm)
    assert m["a"].name == "up" and m.nodes() == {m.root, m["a"]}
    assert names(Pattern(function="cat", inputs=[Pattern(capture="a"), Pattern(capture="a")]), gm) == []


def test_captures_and_sub_patterns():
    p = Pattern(capture="y", inputs=[Pattern(capture="x"), None, Pattern(capture="y", inputs=[Pattern(capture="z")])])
    assert p.captures() == ["y", "x", "z"]
    assert len(list(p.iter_patterns())) == 4


def test_rule_file_keys_are_the_pattern_fields():
    assert PATTERN_KEYS == {f.name for f in fields(Pattern)} == set(pattern_keys())
    kinds = {key: spec["kind"] for key, spec in pattern_keys().items()}
    assert kinds == {"op": "choice", "function": "string", "method": "string", "module_class": "string",
                     "module_name": "string", "attrs": "attrs", "num_inputs": "count", "num_users": "count",
                     "inputs": "patterns", "capture": "string"}
    assert pattern_keys()["op"]["choices"] == OPS


def test_rule_file_patterns_compile_to_the_same_pattern():
    rules = fxrewrite.load_rules("""
rules:
  - name: r
    pattern:
      function: cat
      num_users: {min: 1, max: 2}
      num_inputs: 3
      inputs: [null, {module_class: MaxPool2d, attrs: {kernel_size: [3, 3]}, capture: b}]
    action: prune_unreachable
""")
    assert rules.rules[0].pattern == Pattern(
        function="cat", num_users=Count(1, 2), num_inputs=Count(3, 3),
        inputs=(None, Pattern(module_class="MaxPool2d", attrs={"kernel_size": [3, 3]}, capture="b")))


@pytest.mark.parametrize("key, value, message", [
    ("op", "call", "'op' must be one of placeholder, get_attr, call_function, call_method, call_module, output, "
                   "not 'call'"),
    ("function", 3, "pattern key 'function' must be a string, not an integer"),
    ("attrs", [1], "'attrs' must be a mapping of attribute names (strings) to values, not a list"),
    ("attrs", {1: 2}, "'attrs' must be a mapping of attribute names (strings) to values, not one with the key 1"),
    ("num_users", {"least": 1}, "'num_users' must be a non-negative integer or a mapping {min, max}, not a mapping "
                                "({'least': 1})"),
    ("num_inputs", -1, "'num_inputs' must be a non-negative integer or a mapping {min, max}, not an integer (-1)"),
    ("inputs", {"a": 1}, "'inputs' must be a list of patterns (or null for any), not a mapping"),
])
def test_each_kind_of_key_reports_its_problem(key, value, message):
    import yaml

    text = yaml.safe_dump({"rules": [{"name": "r", "action": "collapse", "pattern": {key: value}}]})
    with pytest.raises(RuleFileError) as info:
        fxrewrite.load_rules(text, name="f")
    assert [p.message for p in info.value.problems] == [message]


# -- the effect of each rule-file form in a rewrite -------------------------------------------------
def test_num_users_range_in_a_rule_collapses_exactly_the_matching_identities():
    model, x = seeded(TwoBranch()), example(2, 3, 8, 8)
    gm = fxrewrite.trace(model, x)
    result = fxrewrite.rewrite(gm, fxrewrite.load_rules("""
rules:
  - name: identities-read-once
    pattern: {module_class: Identity, num_users: {min: 1, max: 1}, num_inputs: {max: 1}}
    action: collapse
"""))
    # main_1 and skip are read once; aux_1 too (by mean_1): all three; none is read twice
    assert result.nodes_with_status("collapsed") == ["main_1", "skip", "aux_1"]
    none = fxrewrite.rewrite(gm, fxrewrite.load_rules("""
rules:
  - {name: r, pattern: {module_class: Identity, num_users: {min: 2}}, action: collapse}
"""))
    assert none.nodes_with_status("collapsed") == [] and none.log[0].matches == 0
    assert all(torch.equal(a, b) for a, b in zip(result.module(x), model(x)))


def test_inputs_null_and_attrs_list_in_a_rule_select_one_upsample():
    model = Mixed().eval()
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    gm = fxrewrite.trace(model, x)
    rules = fxrewrite.load_rules("""
rules:
  - name: keep-the-cat-path
    pattern:
      function: cat
      inputs: [null, {module_class: MaxPool2d, attrs: {kernel_size: [3, 3], padding: 1}}]
    action: prune_unreachable
""")
    kept = fxrewrite.rewrite(gm, rules)
    assert [n.name for n in kept.module.graph.nodes] == ["x", "up", "pool3", "cat", "output"]
    assert torch.equal(kept.module(x), torch.cat([model.up(x), model.pool3(model.up(x)), model.up(x)], 1))


def test_a_pattern_matching_nothing_refuses_to_prune():
    """pool3's padding is the int 1: [1, 1] is not equal to it, so nothing matches."""
    gm = fxrewrite.trace(Mixed().eval(), torch.zeros(1, 2, 4, 4))
    rules = fxrewrite.load_rules("""
rules:
  - name: r
    pattern: {function: cat, inputs: [null, {module_class: MaxPool2d, attrs: {padding: [1, 1]}}]}
    action: prune_unreachable
""")
    with pytest.raises(fxrewrite.RewriteError, match="no node matched the output pattern"):
        fxrewrite.rewrite(gm, rules)


def test_operator_functions_are_named_as_users_write_them():
    from fxrewrite.naming import function_names

    assert function_names(operator.add) == ("_operator.add", "add", "operator.add")
    assert function_names(torch.cat)[:2] == ("torch.cat", "cat")
