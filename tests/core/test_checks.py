"""Checks: a rejected match is logged with its reason and the node stays."""
from __future__ import annotations

import torch

import fxrewrite
from fxrewrite import Check, Pattern, Rule, register_check
from fxrewrite.engine import Rejection

from helpers.toy_models import Chain, TwoBranch, example, seeded


def test_passthrough_check_rejects_a_conv_that_changes_the_shape():
    model = seeded(Chain())
    x = example(2, 3, 4, 4)
    rules = fxrewrite.load_rules("""\
rules:
  - name: drop-passthrough-convs
    pattern: {module_class: Conv2d, capture: c}
    checks:
      - passthrough: $c
    action: collapse
    mode: fixed_point
""")
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), rules)
    (log,) = result.log
    assert log.rejected == [Rejection("c1", "passthrough: c1 changes the shape (2, 3, 4, 4) -> (2, 8, 4, 4)")]
    assert (log.matches, log.rewrites, log.iterations) == (3, 1, 2)  # the rejection is logged once
    assert result.node_status == {"x": "kept", "c1": "kept", "ident": "kept", "c2": "collapsed", "act": "kept",
                                  "output": "kept"}
    assert [n.name for n in result.module.graph.nodes] == ["x", "c1", "ident", "act", "output"]
    assert result.module.get_submodule("c1") is model.c1
    assert result.summary() == (
        "drop-passthrough-convs (collapse): 3 matched, 1 rewritten, 1 rejected\n"
        "  rejected c1: passthrough: c1 changes the shape (2, 3, 4, 4) -> (2, 8, 4, 4)\n"
        "nodes: 5 kept, 1 collapsed")


def test_builtin_check_reasons():
    model = seeded(TwoBranch())
    rules = fxrewrite.load_rules("""\
rules:
  - name: same-shape-needs-shapes
    pattern: {module_class: Identity, capture: i, inputs: [{capture: src}]}
    checks:
      - same_shape: [$i, $src]
    action: collapse
  - name: relu-checks
    pattern: {module_class: ReLU, capture: r}
    checks:
      - max_users: {node: $r, count: 1}
      - not_output
      - attr_equals: {node: $r, name: inplace, value: true}
    action: collapse
""")
    result = fxrewrite.rewrite(fxrewrite.trace(model), rules)  # no example inputs: no shapes
    assert [(r.node, r.reason) for r in result.log[0].rejected] == [
        ("main_1", "same_shape: no shape recorded for main_1; trace with example inputs"),
        ("skip", "same_shape: no shape recorded for skip; trace with example inputs"),
        ("aux_1", "same_shape: no shape recorded for aux_1; trace with example inputs"),
    ]
    assert [(r.node, r.reason) for r in result.log[1].rejected] == [
        ("stem_act", "max_users: stem_act is used by 3 nodes (main_0_conv, skip, aux_0_conv), more than 1"),
        ("main_0_act", "attr_equals: main_0_act.inplace is False, not True"),
        ("main_2_act", "attr_equals: main_2_act.inplace is False, not True"),
        ("aux_0_act", "attr_equals: aux_0_act.inplace is False, not True"),
    ]
    assert set(result.node_status.values()) == {"kept"}
    assert [l.rewrites for l in result.log] == [0, 0]


def test_same_shape_and_not_output_with_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Identity(), torch.nn.Flatten(0), torch.nn.Identity())
    x = example(2, 3)
    gm = fxrewrite.trace(model, x)
    rules = [
        Rule("identity-not-output", "collapse", Pattern(module_class="Identity", capture="i"),
             checks=[Check("not_output", ("$i",))]),
        Rule("flatten-same-shape", "collapse", Pattern(module_class="Flatten", capture="f", inputs=[Pattern(capture="src")]),
             checks=[Check("same_shape", ("$f", "$src"))]),
    ]
    result = fxrewrite.rewrite(gm, rules)
    assert [(r.node, r.reason) for r in result.log[0].rejected] == [("_3", "not_output: _3 is an output of the model")]
    assert [(r.node, r.reason) for r in result.log[1].rejected] == [
        ("_2", "same_shape: _2 has shape (6,) but _0 has shape (2, 3)")]
    assert result.node_status == {"input_1": "kept", "_0": "kept", "_1": "collapsed", "_2": "kept", "_3": "kept",
                                  "output": "kept"}
    assert torch.equal(result.module(x), model(x))


@register_check("test_checks_name_is")
def name_is(ctx, match, node, name):
    """Accept only the node called ``name``."""
    return None if node.name == name else f"{node.name} is not {name}"


def test_a_user_check_from_yaml():
    model = seeded(TwoBranch())
    x = example(2, 3, 8, 8)
    rules = fxrewrite.load_rules("""\
rules:
  - name: only-skip
    pattern: {module_class: Identity, capture: i}
    checks:
      - passthrough: $i
      - test_checks_name_is: {node: $i, name: skip}
    action: collapse
""")
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), rules)
    assert [(r.node, r.reason) for r in result.log[0].rejected] == [
        ("main_1", "test_checks_name_is: main_1 is not skip"), ("aux_1", "test_checks_name_is: aux_1 is not skip")]
    assert result.nodes_with_status("collapsed") == ["skip"]
    main, aux = result.module(x)
    ref_main, ref_aux = model(x)
    assert torch.equal(main, ref_main) and torch.equal(aux, ref_aux)


def test_the_first_failing_check_gives_the_reason():
    model = seeded(Chain())
    x = example(2, 3, 4, 4)
    rule = Rule("r", "collapse", Pattern(module_name="c1", capture="c"),
                checks=[Check("max_users", (), {"node": "$c", "count": 0}), Check("passthrough", ("$c",))])
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), [rule])
    assert result.log[0].rejected == [Rejection("c1", "max_users: c1 is used by 1 nodes (ident), more than 0")]
