"""Refused rewrites: dangling uses, shape mismatches, non-converging rules; the input stays untouched."""
from __future__ import annotations

import pytest
import torch
from torch import fx

import fxrewrite
from fxrewrite import Pattern, RewriteError, Rule, RuleSet, register_action

from helpers.toy_models import Chain, Snapshot, TwoBranch, example, seeded


@pytest.fixture(params=[False, True], ids=["computed", "shapes-only"])
def chain(request):
    """(model, example input, traced module with shapes, snapshot of it); shapes propagated by computing
    every convolution or by shape alone: a rewrite must be refused the same way, with the same message."""
    model = seeded(Chain())
    x = example(2, 3, 4, 4)
    gm = fxrewrite.trace(model, x, shapes_only=request.param)
    return model, x, gm, Snapshot(gm)


def refused(gm, rules, message: str) -> RewriteError:
    with pytest.raises(RewriteError) as info:
        fxrewrite.rewrite(gm, rules)
    assert str(info.value) == message
    return info.value


# -- user actions used by these tests --------------------------------------------------
@register_action("test_refused_erase_used")
def erase_used(ctx, match):
    """Erase the matched node although it is still used."""
    ctx.erase(match.root, "removed")


@register_action("test_refused_fx_erase_used")
def fx_erase_used(ctx, match):
    """The same, straight through fx (which raises a RuntimeError)."""
    ctx.graph.erase_node(match.root)


@register_action("test_refused_use_before_def")
def use_before_def(ctx, match):
    """Make the matched node read the graph's last value: a use before its definition. Counts no change."""
    last = ctx.output_node().args[0]
    match.root.args = (last,)


@register_action("test_refused_foreign_node")
def foreign_node(ctx, match):
    other = fx.Graph()
    match.root.args = (other.placeholder("z"),)
    ctx.changes += 1


@register_action("test_refused_retarget")
def retarget(ctx, match):
    match.root.target = "nowhere"
    ctx.changes += 1


@register_action("test_refused_grow")
def grow(ctx, match):
    """Insert, after the matched module call, another call of the same module: it matches again."""
    with ctx.graph.inserting_after(match.root):
        new = ctx.graph.call_module(match.root.target, (match.root,))
    ctx.replace_uses(match.root, new)
    new.args = (match.root,)
    ctx.note_new(new, like=match.root)


@register_action("test_refused_crash")
def crash(ctx, match, key="oops"):
    raise KeyError(key)


# -- dangling uses ----------------------------------------------------------------------
def test_remove_without_cascade_is_refused(chain):
    model, x, gm, snapshot = chain
    refused(gm, [Rule("rm", "remove", Pattern(module_name="c1"))],
            "rule 'rm': cannot remove c1: still used by ident (use cascade: true, or collapse)")
    snapshot.assert_unchanged()


def test_remove_with_cascade_of_every_output_is_refused(chain):
    model, x, gm, snapshot = chain
    refused(gm, [Rule("rm", "remove", Pattern(module_name="c2"), args={"cascade": True})],
            "rule 'rm': cannot remove c2: every output of the model depends on it")
    snapshot.assert_unchanged()


def test_remove_with_cascade_drops_dependent_outputs():
    model = seeded(TwoBranch())
    x = example(2, 3, 8, 8)
    gm = fxrewrite.trace(model, x)
    result = fxrewrite.rewrite(gm, [Rule("rm", "remove", Pattern(module_name="aux.0.conv"),
                                         args={"cascade": True})])
    assert result.nodes_with_status("removed") == ["aux_0_conv", "aux_0_act", "aux_1", "mean_1", "aux_head_fc"]
    out = result.module(x)
    assert isinstance(out, tuple) and len(out) == 1 and torch.equal(out[0], model(x)[0])


def test_user_action_erasing_a_used_node_is_refused(chain):
    model, x, gm, snapshot = chain
    refused(gm, [Rule("erase", "test_refused_erase_used", Pattern(module_name="ident"))],
            "rule 'erase': cannot erase ident: it is still used by c2")
    error = refused(gm, [Rule("erase", "test_refused_fx_erase_used", Pattern(module_name="ident"))],
                    "rule 'erase': action 'test_refused_fx_erase_used' failed on ident: RuntimeError: "
                    "Tried to erase Node ident but it still had 1 users in the graph: {c2: None}!")
    assert isinstance(error.__cause__, RuntimeError)
    snapshot.assert_unchanged()


def test_use_before_definition_is_found_even_when_the_action_counts_no_change(chain):
    model, x, gm, snapshot = chain
    refused(gm, [Rule("loop", "test_refused_use_before_def", Pattern(module_name="c2"))],
            "rule 'loop': the rewritten graph would be invalid: Argument 'act' of Node 'c2' was used before "
            "it has been defined! Please check that Nodes in the graph are topologically ordered")
    snapshot.assert_unchanged()


def test_node_from_another_graph_is_refused(chain):
    model, x, gm, snapshot = chain
    error = refused(gm, [Rule("foreign", "test_refused_foreign_node", Pattern(module_name="c2"))],
                    "rule 'foreign': the rewritten graph would be invalid: Argument 'z' of Node 'c2' does not "
                    "belong to this Graph, but was used as an argument! If you are copying nodes from another "
                    "graph, make sure to use ``arg_transform`` on node_copy() to remap values")
    assert "\n" not in str(error)
    snapshot.assert_unchanged()


def test_call_of_a_missing_module_is_refused(chain):
    model, x, gm, snapshot = chain
    refused(gm, [Rule("retarget", "test_refused_retarget", Pattern(module_name="c2"))],
            "rule 'retarget': node c2 refers to nowhere, which does not exist")
    snapshot.assert_unchanged()


def test_a_crashing_action_becomes_a_rewrite_error(chain):
    model, x, gm, snapshot = chain
    error = refused(gm, [Rule("crash", "test_refused_crash", Pattern(module_name="c1"), args={"key": "k"})],
                    "rule 'crash': action 'test_refused_crash' failed on c1: KeyError: 'k'")
    assert isinstance(error.__cause__, KeyError)
    snapshot.assert_unchanged()


def test_a_later_rule_failing_applies_nothing(chain):
    model, x, gm, snapshot = chain
    rules = [Rule("drop-identity", "collapse", Pattern(module_class="Identity")),
             Rule("rm", "remove", Pattern(module_name="c1"))]
    refused(gm, rules, "rule 'rm': cannot remove c1: still used by c2 (use cascade: true, or collapse)")
    snapshot.assert_unchanged()
    assert torch.equal(gm(x), model(x))


# -- shape mismatches --------------------------------------------------------------------
def test_collapsing_a_non_pass_through_conv_is_refused_when_shapes_are_known(chain):
    model, x, gm, snapshot = chain
    refused(gm, [Rule("col", "collapse", Pattern(module_name="c1"))],
            "rule 'col': cannot collapse c1: it is not a pass-through (input shape (2, 3, 4, 4), "
            "output shape (2, 8, 4, 4))")
    snapshot.assert_unchanged()


def test_without_shapes_the_same_collapse_is_not_detected():
    gm = fxrewrite.trace(seeded(Chain()))  # no example inputs: nothing to check against
    result = fxrewrite.rewrite(gm, [Rule("col", "collapse", Pattern(module_name="c1"))])
    assert [n.name for n in result.module.graph.nodes] == ["x", "ident", "c2", "act", "output"]
    with pytest.raises(RuntimeError, match="expected input.* to have 8 channels, but got 3"):
        result.module(example(2, 3, 4, 4))


def test_check_shapes_false_skips_propagation(chain):
    model, x, gm, snapshot = chain
    rule = Rule("up", "replace", Pattern(module_name="ident"), args={"with": "nn.Upsample", "init": {"scale_factor": 2}})
    result = fxrewrite.rewrite(gm, [rule], check_shapes=False)
    assert result.node_status["ident"] == "replaced"


def test_replace_by_a_conv_with_other_channels_is_refused(chain):
    model, x, gm, snapshot = chain
    init = {"in_channels": 3, "out_channels": 6, "kernel_size": 1}
    # same tensor names, other shapes: refused while re-binding
    refused(gm, [Rule("swap", "replace", Pattern(module_name="c1"),
                      args={"with": "nn.Conv2d", "init": init, "strict": False})],
            "rule 'swap': shape mismatch re-binding Conv2d.weight (6, 3, 1, 1) <- Conv2d.weight (8, 3, 1, 1)")
    # nothing re-bound (strict: false): the next conv fails in shape propagation
    refused(gm, [Rule("swap", "replace", Pattern(module_name="c1"),
                      args={"with": "nn.Conv2d", "init": init, "strict": False, "params": {"w": "weight", "b": "bias"}})],
            "rule 'swap': shape propagation failed on the rewritten graph: node c2 failed: RuntimeError: Given "
            "groups=1, weight of size [8, 8, 1, 1], expected input[2, 6, 4, 4] to have 8 channels, but got 6 "
            "channels instead")
    snapshot.assert_unchanged()


def test_strict_replace_without_a_source_is_refused(chain):
    model, x, gm, snapshot = chain
    refused(gm, [Rule("swap", "replace", Pattern(module_name="c1"),
                      args={"with": "nn.Conv2d", "init": {"in_channels": 3, "out_channels": 8, "kernel_size": 1},
                            "params": {"w": "weight"}})],
            "rule 'swap': Conv2d.weight has no source: Conv2d has no tensor w (map it with rename:, or set "
            "strict: false)")
    snapshot.assert_unchanged()


def test_a_shape_change_downstream_is_refused(chain):
    model, x, gm, snapshot = chain
    refused(gm, [Rule("up", "replace", Pattern(module_name="ident"),
                      args={"with": "nn.Upsample", "init": {"scale_factor": 2}})],
            "rule 'up': shape mismatch at node c2: it produced (2, 8, 4, 4) before this rule and (2, 8, 8, 8) "
            "after it")
    snapshot.assert_unchanged()


def test_shape_propagation_errors_are_clean_and_silent(capfd):
    gm = fxrewrite.trace(seeded(Chain()))
    with pytest.raises(fxrewrite.shapes.ShapePropagationError) as info:
        fxrewrite.propagate_shapes(gm, example(2, 5, 4, 4))
    assert str(info.value) == ("node c1 failed: RuntimeError: Given groups=1, weight of size [8, 3, 1, 1], "
                               "expected input[2, 5, 4, 4] to have 3 channels, but got 5 channels instead")
    assert info.value.node == "c1" and isinstance(info.value.__cause__, RuntimeError)
    assert capfd.readouterr().err == ""  # no traceback printed


# -- fixed points -------------------------------------------------------------------------
def test_fixed_point_that_never_converges_is_stopped(chain):
    model, x, gm, snapshot = chain
    rules = RuleSet([Rule("grow", "test_refused_grow", Pattern(module_class="ReLU"), mode="fixed_point")],
                    max_iterations=5)
    refused(gm, rules, "rule 'grow': did not reach a fixed point after 5 iterations (each pass still rewrote; "
                       "raise max_iterations or fix the rule)")
    snapshot.assert_unchanged()


def test_max_iterations_from_a_rule_file(chain):
    model, x, gm, snapshot = chain
    rules = fxrewrite.load_rules("max_iterations: 3\nrules:\n  - name: grow\n    pattern: {module_class: ReLU}\n"
                                 "    action: test_refused_grow\n    mode: fixed_point\n")
    error = refused(gm, rules, "rule 'grow': did not reach a fixed point after 3 iterations (each pass still "
                               "rewrote; raise max_iterations or fix the rule)")
    assert error.rule == "grow"


def test_the_same_rule_once_applies_one_pass(chain):
    model, x, gm, snapshot = chain
    result = fxrewrite.rewrite(gm, [Rule("grow", "test_refused_grow", Pattern(module_class="ReLU"))])
    assert [(n.name, n.target) for n in result.module.graph.nodes if n.op == "call_module"] == [
        ("c1", "c1"), ("ident", "ident"), ("c2", "c2"), ("act", "act"), ("act_1", "act")]
    assert result.node_status["act_1"] == "new"
    assert result.nodes_with_status("new") == ["act_1"]
    assert result.module.graph.find_nodes(op="call_module", target="act")[1].meta["provenance"].rules == ("grow",)
    assert torch.equal(result.module(x), model(x))  # relu(relu(y)) == relu(y)


def test_replace_refuses_a_huge_module_before_allocating_it(chain):
    """A rule file's init cannot make the engine allocate a huge layer: it is sized on meta first."""
    import resource

    model, x, gm, snapshot = chain
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rule = Rule("huge", "replace", Pattern(module_name="ident"),
                args={"with": "nn.Linear", "init": {"in_features": 200_000, "out_features": 100_000}, "strict": False})
    refused(gm, [rule], "rule 'huge': refused to build Linear(in_features=200000, out_features=100000): it would "
                        "hold 20,000,100,000 tensor elements, more than the limit of 2,147,483,648")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing near 80 GB
    snapshot.assert_unchanged()
