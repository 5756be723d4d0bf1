"""Rewriting small hand-written models: exact node sets, parameter maps, bitwise outputs, untouched inputs."""
from __future__ import annotations

import torch

import fxrewrite
from fxrewrite import Pattern, Rule, RuleSet, register_module_class
from fxrewrite.provenance import Provenance

from helpers.toy_models import HeadNet, NewHead, Snapshot, TwoBranch, WithLeaf, example, seeded

register_module_class(NewHead)

MAIN_ONLY = """\
rules:
  - name: keep-main
    action: prune_unreachable
    args: {outputs: [0]}
  - name: drop-identity
    pattern: {module_class: Identity, capture: x}
    checks: [{passthrough: $x}]
    action: collapse
    mode: fixed_point
"""

HEAD_TO_INFERENCE = """\
rules:
  - name: head-to-inference
    pattern: {module_class: OldHead, capture: head}
    action: replace
    args:
      with: NewHead
      inputs: [0]
      init: {c: $head.aux.in_channels}
      params: {cv4: cv2}
  - name: drop-dead
    action: prune_unreachable
"""


def kept_nodes(result) -> list[str]:
    return [n.name for n in result.module.graph.nodes]


# -- two branches, an auxiliary head, identities ---------------------------------
def test_two_branch_model_keeps_main_output_only():
    model = seeded(TwoBranch())
    x = example(2, 3, 8, 8)
    gm = fxrewrite.trace(model, x)
    snapshot = Snapshot(gm)
    result = fxrewrite.rewrite(gm, fxrewrite.load_rules(MAIN_ONLY))

    assert kept_nodes(result) == ["x", "stem_conv", "stem_act", "main_0_conv", "main_0_act", "main_2_conv",
                                  "main_2_act", "add", "mean", "main_head_fc", "output"]
    assert result.node_status == {
        "x": "kept", "stem_conv": "kept", "stem_act": "kept", "main_0_conv": "kept", "main_0_act": "kept",
        "main_1": "collapsed", "main_2_conv": "kept", "main_2_act": "kept", "skip": "collapsed", "add": "kept",
        "mean": "kept", "main_head_fc": "kept", "aux_0_conv": "pruned", "aux_0_act": "pruned",
        "aux_1": "pruned", "mean_1": "pruned", "aux_head_fc": "pruned", "output": "kept"}
    names = ["stem.conv.weight", "stem.conv.bias", "main.0.conv.weight", "main.0.conv.bias",
             "main.2.conv.weight", "main.2.conv.bias", "main_head.fc.weight", "main_head.fc.bias"]
    assert result.param_map == {n: n for n in names}
    # the skip connection now reads the stem directly
    add = next(n for n in result.module.graph.nodes if n.name == "add")
    assert [a.name for a in add.args] == ["main_2_act", "stem_act"]

    # unused submodules and tensors are gone; the kept tensors are the model's own objects
    assert set(result.module.state_dict()) == set(names)
    assert sorted(name for name, _ in result.module.named_modules()) == sorted([
        "", "stem", "stem.conv", "stem.act", "main", "main.0", "main.0.conv", "main.0.act", "main.2",
        "main.2.conv", "main.2.act", "main_head", "main_head.fc"])
    for name, tensor in result.module.state_dict(keep_vars=True).items():
        assert tensor is model.get_parameter(name)

    # outputs: bitwise equal to the original's main output, on another batch size too
    for inputs in (x, example(5, 3, 8, 8, seed=7)):
        assert torch.equal(result.module(inputs), model(inputs)[0])
    assert fxrewrite.verify(model, result.module, x, select_original=(0,)).equal

    # log and provenance
    assert [(l.rule, l.action, l.matches, l.rewrites, l.iterations) for l in result.log] == [
        ("keep-main", "prune_unreachable", 0, 1, 1), ("drop-identity", "collapse", 2, 2, 2)]
    assert all(not l.rejected for l in result.log)
    prov = {n.name: n.meta["provenance"] for n in result.module.graph.nodes}
    assert prov["main_2_conv"] == Provenance("main.2.conv", "Conv2d", ("main_2_conv",), ("drop-identity",))
    assert prov["add"] == Provenance("", "TwoBranch", ("add",), ("drop-identity",))
    assert prov["stem_act"] == Provenance("stem.act", "ReLU", ("stem_act",))
    assert result.summary() == ("keep-main (prune_unreachable): 0 matched, 1 rewritten, 4 tensors dropped\n"
                                "drop-identity (collapse): 2 matched, 2 rewritten\n"
                                "nodes: 11 kept, 5 pruned, 2 collapsed")

    snapshot.assert_unchanged()
    assert torch.equal(gm(x)[1], model(x)[1])  # the traced module still has its auxiliary output


def test_shapes_are_propagated_on_the_result():
    x = example(2, 3, 8, 8)
    result = fxrewrite.rewrite(fxrewrite.trace(seeded(TwoBranch()), x), fxrewrite.load_rules(MAIN_ONLY))
    shapes = {n.name: fxrewrite.shape_of(n) for n in result.module.graph.nodes}
    assert shapes["main_head_fc"] == (2, 5) and shapes["output"] == (2, 5)
    assert result.module.meta["fxrewrite.example_inputs"][0] is x
    assert "fxrewrite.trace" in result.module.meta


def test_result_module_has_code_and_can_be_traced_and_rewritten_again():
    model = seeded(TwoBranch())
    x = example(2, 3, 8, 8)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), fxrewrite.load_rules(MAIN_ONLY))
    assert "def forward(self, x)" in result.module.code
    assert "main_1" not in result.module.code and "aux" not in result.module.code
    again = fxrewrite.rewrite(result.module, [Rule("nothing", "collapse", Pattern(module_class="Identity"))])
    assert torch.equal(again.module(x), model(x)[0])
    assert set(again.node_status.values()) == {"kept"}
    assert again.param_map == result.param_map


def test_identity_only_model_collapses_to_its_input():
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity())
    result = fxrewrite.rewrite(fxrewrite.trace(model, torch.zeros(1)),
                               [Rule("id", "collapse", Pattern(module_class="Identity"), mode="fixed_point")])
    assert kept_nodes(result) == ["input_1", "output"]
    assert result.param_map == {}
    assert list(result.module.named_modules()) == [("", result.module)]
    x = torch.randn(3)
    assert result.module(x) is x


# -- an untraceable module (an automatic leaf) -----------------------------------
def test_untraceable_leaf_is_kept_and_its_parameter_mapped():
    model = seeded(WithLeaf())
    x = example(2, 3, 4, 4)
    gm = fxrewrite.trace(model, x)
    snapshot = Snapshot(gm)
    result = fxrewrite.rewrite(gm, [Rule("id", "collapse", Pattern(module_class="Identity"))])
    assert kept_nodes(result) == ["x", "conv", "odd", "fc", "output"]
    assert result.param_map == {n: n for n in ["conv.weight", "conv.bias", "odd.scale", "fc.weight", "fc.bias"]}
    assert result.module.get_submodule("odd") is model.odd
    assert torch.equal(result.module(x), model(x))
    snapshot.assert_unchanged()


def test_a_rule_can_match_the_auto_leaf_by_class():
    model = seeded(WithLeaf())
    x = example(2, 3, 4, 4)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x),
                               [Rule("no-odd", "collapse", Pattern(module_class="Scaled"))])
    assert kept_nodes(result) == ["x", "conv", "ident", "fc", "output"]
    assert result.node_status["odd"] == "collapsed"
    assert "odd.scale" not in result.param_map
    assert torch.equal(result.module(x), model.fc(model.conv(x)))


# -- replace with parameter renaming ------------------------------------------------
def test_replace_with_parameter_renaming():
    model = seeded(HeadNet())
    x = example(2, 3, 4, 4)
    gm = fxrewrite.trace(model, x, leaf_classes=["OldHead"])
    snapshot = Snapshot(gm)
    result = fxrewrite.rewrite(gm, fxrewrite.load_rules(HEAD_TO_INFERENCE))

    assert kept_nodes(result) == ["x", "a", "head", "output"]
    assert result.node_status == {"x": "kept", "a": "kept", "b": "pruned", "head": "replaced", "output": "kept"}
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert result.param_map == {
        "a.weight": "a.weight", "a.bias": "a.bias",
        "head.cv2.0.weight": "head.cv4.0.weight", "head.cv2.0.bias": "head.cv4.0.bias",
        **{f"head.cv2.1.{t}": f"head.cv4.1.{t}" for t in bn}}
    head = result.module.get_submodule("head")
    assert type(head) is NewHead and not head.training
    ours, theirs = result.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
    assert set(ours) == set(result.param_map)
    assert all(ours[new] is theirs[old] for new, old in result.param_map.items())  # shared, not copied
    assert sorted(n for n, _ in result.module.named_modules()) == [
        "", "a", "head", "head.cv2", "head.cv2.0", "head.cv2.1"]
    assert result.log[0].dropped == ["head.aux.weight", "head.aux.bias"]
    node = next(n for n in result.module.graph.nodes if n.name == "head")
    assert node.meta["provenance"] == Provenance("head", "NewHead", ("head",), ("head-to-inference",))

    assert torch.equal(result.module(x), model(x)[:, :4])
    assert fxrewrite.verify(model, result.module, x, select_original=lambda out: out[:, :4]).equal

    # the input is untouched and its head is still the OldHead with both convs
    snapshot.assert_unchanged()
    assert type(gm.get_submodule("head")).__name__ == "OldHead"
    assert torch.equal(gm(x), model(x))


class CachingHead(NewHead):
    """NewHead with the plain tensor attributes a detection head keeps: an empty cache and a table."""

    def __init__(self, c: int = 4, table: bool = False):
        super().__init__(c)
        self.cache = torch.empty(0)
        if table:
            self.table = torch.arange(4.0)  # values the constructor computes: no meta stand-in will do

    def forward(self, a):
        out = self.cv2(a)
        return out * self.table.view(1, -1, 1, 1) if hasattr(self, "table") else out


register_module_class(CachingHead)


def test_strict_replace_builds_nothing_real_and_keeps_constructed_values(monkeypatch):
    """With every tensor re-bound, the new module is built on the meta device (no allocation or
    initialisation); an empty cache becomes a real empty tensor; a module whose constructor computes
    tensor values is built for real, so they are kept."""
    initialised = []
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters",
                        lambda self, original=torch.nn.Conv2d.reset_parameters: (initialised.append(
                            self.weight.device.type), original(self))[1])
    model = seeded(HeadNet())
    x = example(2, 3, 4, 4)
    gm = fxrewrite.trace(model, x, leaf_classes=["OldHead"])
    for table, built_on in ((False, "meta"), (True, "cpu")):
        initialised.clear()
        rules = fxrewrite.load_rules(HEAD_TO_INFERENCE.replace("with: NewHead", "with: CachingHead")
                                     .replace("init: {c: $head.aux.in_channels}", f"init: {{c: 4, table: {table}}}"))
        head = fxrewrite.rewrite(gm, rules).module.get_submodule("head")
        assert initialised[-1:] == [built_on]
        assert head.cache.device.type == "cpu" and head.cache.shape == (0,)
        assert head.cv2[0].weight is model.head.cv4[0].weight
        assert not any(t.is_meta for t in [*head.parameters(), *head.buffers()])
        if table:
            assert torch.equal(head.table, torch.arange(4.0))


def test_replace_without_prune_keeps_the_dead_input_node():
    model = seeded(HeadNet())
    x = example(2, 3, 4, 4)
    rules = fxrewrite.load_rules(HEAD_TO_INFERENCE)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x, leaf_classes=["OldHead"]), RuleSet(rules.rules[:1]))
    assert kept_nodes(result) == ["x", "a", "b", "head", "output"]
    assert {"b.weight", "b.bias"} <= set(result.param_map)
    assert torch.equal(result.module(x), model(x)[:, :4])


def test_rules_from_python_objects_equal_rules_from_yaml():
    model = seeded(TwoBranch())
    x = example(2, 3, 8, 8)
    gm = fxrewrite.trace(model, x)
    python_rules = RuleSet([
        Rule("keep-main", "prune_unreachable", args={"outputs": [0]}),
        Rule("drop-identity", "collapse", Pattern(module_class="Identity", capture="x"),
             checks=[fxrewrite.Check("passthrough", ("$x",))], mode="fixed_point"),
    ])
    a, b = fxrewrite.rewrite(gm, python_rules), fxrewrite.rewrite(gm, fxrewrite.load_rules(MAIN_ONLY))
    assert a.node_status == b.node_status and a.param_map == b.param_map
    assert a.module.code == b.module.code
