"""User actions registered from Python with ``register_action`` and used from YAML, end to end.

These actions are written the way actions were before RewriteContext had its verbs (they call
``ctx.resolve`` on arguments the engine has already resolved, create nodes with ``ctx.graph`` and
``ctx.note_new``, append to ``ctx.log``): that code keeps working. New actions use the verbs
(tests/core/test_context.py, docs/rules.md).
"""
from __future__ import annotations

import operator

import pytest
import torch

import fxrewrite
from fxrewrite import Param, RewriteError, RuleFileError, register_action, registry
from fxrewrite.engine import NEW, REPLACED
from fxrewrite.provenance import Provenance

from helpers.toy_models import Chain, TwoBranch, example, seeded


@register_action("test_ua_relu_to_function", params={
    "node": Param((str,), doc="capture of the ReLU call"),
    "negative": Param((bool,), doc="use -relu(-x) (a different function) to see the rule matter"),
}, doc="Replace a ReLU module call by a torch.relu call.")
def relu_to_function(ctx, match, node="$root", negative=False):
    old = ctx.resolve(node, match)
    (source,) = old.args
    with ctx.graph.inserting_after(old):
        new = ctx.graph.call_function(torch.relu, (source,))
        if negative:
            raise RewriteError(ctx.rule.name, "negative is not implemented")
    ctx.note_new(new, like=old)
    ctx.replace_uses(old, new)
    ctx.erase(old, REPLACED)


@register_action("test_ua_record", per_match=False)
def record(ctx, matches, **anything):
    """A whole-graph action without declared parameters: it accepts any."""
    ctx.log.notes.append(f"{len(matches)} matches: {', '.join(m.root.name for m in matches)}; args {anything}")


@register_action("test_ua_resolve")
def resolve(ctx, match, values=None):
    """Resolve $-references and note the results."""
    ctx.log.notes.append(repr(ctx.resolve(values, match)))


RELU_RULES = """\
rules:
  - name: relu-as-function
    pattern: {module_class: ReLU, capture: r}
    action: test_ua_relu_to_function
    args: {node: $r}
"""


def test_user_action_from_yaml_end_to_end():
    model = seeded(TwoBranch())
    x = example(2, 3, 8, 8)
    gm = fxrewrite.trace(model, x)
    result = fxrewrite.rewrite(gm, fxrewrite.load_rules(RELU_RULES))
    relus = ["stem_act", "main_0_act", "main_2_act", "aux_0_act"]
    assert result.nodes_with_status(REPLACED) == relus
    assert result.nodes_with_status(NEW) == ["relu", "relu_1", "relu_2", "relu_3"]
    assert [n.target for n in result.module.graph.nodes if n.op == "call_function"] == [
        torch.relu, torch.relu, torch.relu, operator.add, torch.relu]
    assert not any(isinstance(m, torch.nn.ReLU) for m in result.module.modules())
    assert result.module.graph.find_nodes(op="call_function", target=torch.relu)[0].meta["provenance"] == \
        Provenance("stem.act", "ReLU", ("stem_act",), ("relu-as-function",))
    assert result.param_map == {n: n for n, _ in model.named_parameters()}
    main, aux = result.module(x)
    ref_main, ref_aux = model(x)
    assert torch.equal(main, ref_main) and torch.equal(aux, ref_aux)
    assert [(l.rule, l.action, l.matches, l.rewrites) for l in result.log] == [
        ("relu-as-function", "test_ua_relu_to_function", 4, 4)]


def test_user_action_declared_parameters_are_checked(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(RELU_RULES.replace("args: {node: $r}", "args: {node: $r, inplace: true, negative: 1}"))
    with pytest.raises(RuleFileError) as info:
        fxrewrite.load_rules(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:5: rule 'relu-as-function': unknown argument 'inplace' for action 'test_ua_relu_to_function'; "
        f"known: negative, node",
        f"{path}:5: rule 'relu-as-function': argument 'negative' of action 'test_ua_relu_to_function' must be a "
        f"boolean, not an integer (1)",
    ]


def test_user_action_raising_a_rewrite_error():
    gm = fxrewrite.trace(seeded(Chain()), example(1, 3, 4, 4))
    rules = fxrewrite.load_rules(RELU_RULES.replace("args: {node: $r}", "args: {node: $r, negative: true}"))
    with pytest.raises(RewriteError, match=r"^rule 'relu-as-function': negative is not implemented$"):
        fxrewrite.rewrite(gm, rules)


def test_whole_graph_user_action_receives_the_accepted_matches():
    gm = fxrewrite.trace(seeded(TwoBranch()))
    rules = fxrewrite.load_rules("""\
rules:
  - name: record
    pattern: {module_class: Identity, capture: i}
    checks: [{not_output: $i}, {max_users: {node: $i, count: 1}}]
    action: test_ua_record
    args: {anything: [1, two], at: all}
""")
    result = fxrewrite.rewrite(gm, rules)
    (log,) = result.log
    assert log.notes == ["3 matches: main_1, skip, aux_1; args {'anything': [1, 'two'], 'at': 'all'}"]
    assert (log.matches, log.rewrites, log.rejected) == (3, 0, [])
    assert set(result.node_status.values()) == {"kept"}
    assert registry.action("test_ua_record").params is None and not registry.action("test_ua_record").per_match


def test_references_resolve_to_nodes_module_attributes_and_shapes():
    gm = fxrewrite.trace(seeded(Chain()), example(2, 3, 4, 4))
    rules = fxrewrite.load_rules("""\
rules:
  - name: resolve
    pattern:
      module_name: c2
      capture: conv
      inputs: [{capture: before}]
    action: test_ua_resolve
    args:
      values: [$conv.out_channels, $conv.kernel_size, $conv.shape, $before.shape, $root.in_channels, 7, text]
""")
    result = fxrewrite.rewrite(gm, rules)
    assert result.log[0].notes == ["[8, (1, 1), (2, 8, 4, 4), (2, 8, 4, 4), 8, 7, 'text']"]


def test_unresolvable_reference_is_a_rewrite_error():
    gm = fxrewrite.trace(seeded(Chain()), example(2, 3, 4, 4))
    rules = fxrewrite.load_rules("rules:\n  - name: resolve\n    pattern: {module_name: c2, capture: conv}\n"
                                 "    action: test_ua_resolve\n    args: {values: [$conv.no_such]}\n")
    with pytest.raises(RewriteError) as info:
        fxrewrite.rewrite(gm, rules)
    assert str(info.value) == "rule 'resolve': $conv.no_such: Conv2d has no attribute 'no_such'"


def test_registered_actions_are_listed_by_the_cli(capsys):
    from fxrewrite.cli import main

    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    assert "test_ua_relu_to_function" in out.splitlines()[0]
