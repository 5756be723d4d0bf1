"""The core on models it was not written for (tests/helpers/any_models.py): what a new user tries from
the README and docs/rules.md, on residual, mobile, compound-scaled, RegNet and FPN architectures.

Oracles: the eager model itself, ``torch.fx.experimental.optimization.fuse`` (Conv+BN folding),
and snapshots of the user's model taken before fxrewrite touches it.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import Pattern, RewriteError, Rule, RuleFileError

from helpers.any_models import IMAGE_MODELS, FrozenBatchNorm2d, FrozenFPN, ResNet, build, deep_chain, image, randomised


def snapshot(model: nn.Module) -> dict:
    """Everything a rewrite could change on the user's model: its state (values and tensor objects),
    its module tree, and every module's attribute dictionary (keys and value objects)."""
    return {
        "state": {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()},
        "modules": [(name, id(m)) for name, m in model.named_modules()],
        "dicts": {name: {k: (id(v), dict(v) if isinstance(v, dict) else None) for k, v in vars(m).items()}
                  for name, m in model.named_modules()},
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["dicts"] == before["dicts"]
    assert after["training"] == before["training"]
    assert after["state"].keys() == before["state"].keys()
    for key, (tensor, values) in before["state"].items():
        assert after["state"][key][0] is tensor, key
        assert torch.equal(after["state"][key][1], values), key


# -- 2: tracing and rewriting never modify the user's model -------------------------------------

REWRITES = [
    Rule("no-identity", "collapse", Pattern(module_class="Identity"), mode="fixed_point"),
    Rule("no-dropout", "collapse", Pattern(module_class="Dropout")),
    Rule("gelu", "replace", Pattern(module_class="ReLU"), args={"with": "nn.GELU"}, mode="fixed_point"),
    Rule("fold", "fold_batchnorm", Pattern(module_class="BatchNorm2d", capture="bn", inputs=[
        Pattern(module_class="Conv2d", num_users=1, capture="conv")]), args={"conv": "$conv", "bn": "$bn"}),
    Rule("keep", "prune_unreachable"),
]


@pytest.mark.parametrize("name", sorted(IMAGE_MODELS))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_trace_and_rewrite_leave_the_model_as_it_was(name, mode):
    model = build(IMAGE_MODELS[name]).train(mode == "train")
    before = snapshot(model)
    x = image()
    gm = fxrewrite.trace(model, x)
    rules = REWRITES if mode == "eval" else [r for r in REWRITES if r.action != "fold_batchnorm"]
    result = fxrewrite.rewrite(gm, rules)
    fxrewrite.rebind(result)
    assert_unchanged(model, before)
    if mode == "eval":
        result.module(x)
        assert_unchanged(model, before)


def test_a_frozen_batchnorm_becomes_a_leaf_with_its_own_tensors():
    model = build(FrozenFPN)
    before = snapshot(model)
    x = image()
    gm = fxrewrite.trace(model, x)
    report = gm.meta["fxrewrite.trace"]
    assert sorted(report.auto_leaves) == ["c3.bn", "c4.bn", "c5.bn", "stem.bn"]
    assert report.auto_leaves["stem.bn"].startswith("TraceTimeConstant: computes a tensor at trace time")
    assert report.constants == {}
    result = fxrewrite.rewrite(gm, [])
    assert result.param_map == {name: name for name in model.state_dict()}  # originals only, none made up
    expected, got = model(x), result.module(x)
    assert list(got) == ["p3", "p4", "p5"] and all(torch.equal(got[k], expected[k]) for k in expected)
    assert_unchanged(model, before)


def test_constants_of_the_root_forward_are_computed_tensors_of_the_result():
    bn = randomised(FrozenBatchNorm2d(4))
    before = snapshot(bn)
    x = torch.randn(2, 4, 3, 3)
    gm = fxrewrite.trace(bn, x)
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["_tensor_constant0", "_tensor_constant1"]
    result = fxrewrite.rewrite(gm, [])
    # Computed at trace time from the buffers the forward had read: not original tensors.
    read = ("weight", "running_var", "bias", "running_mean")
    assert result.param_map == {"_tensor_constant0": read, "_tensor_constant1": read}
    assert torch.equal(result.module(x), bn(x))
    assert_unchanged(bn, before)
    assert not any(k.startswith("_tensor_constant") for k in vars(bn))


# -- 4: folding a BatchNorm in training mode is refused ------------------------------------------

def test_folding_a_training_batchnorm_is_refused_naming_it():
    model = build(ResNet).train()
    rule = [r for r in REWRITES if r.action == "fold_batchnorm"]
    with pytest.raises(RewriteError) as err:
        fxrewrite.rewrite(fxrewrite.trace(model, image()), rule)
    assert str(err.value) == ("rule 'fold': conv1 -> bn1: the BatchNorm is in training mode: it normalises with "
                              "each batch's statistics, so folding its running statistics would change the "
                              "outputs; put the model in eval mode (model.eval()) before tracing")
    # A block holding both (fuse_conv_bn) is refused the same way, naming the block.
    model = nn.Sequential()
    model.add_module("block", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    gm = fxrewrite.trace(model, image(), leaf_names=["block"])
    fuse = Rule("f", "fuse_conv_bn", Pattern(module_name="block"), args={"conv": "0", "bn": "1"})
    with pytest.raises(RewriteError, match=r"^rule 'f': block \(Sequential\): the BatchNorm is in training mode"):
        fxrewrite.rewrite(gm, [fuse])
    assert len(fxrewrite.rewrite(fxrewrite.trace(model.eval(), image(), leaf_names=["block"]), [fuse]).log) == 1


# -- 5: every problem of a rule file is reported ---------------------------------------------------

def test_a_bad_mode_and_a_duplicate_name_are_both_reported():
    text = """\
rules:
  - name: swap
    pattern: {module_class: ReLU}
    action: replace
    args: {with: nn.GELU}
    mode: sometimes
  - name: swap
    pattern: {module_class: Identity}
    action: collapse
"""
    with pytest.raises(RuleFileError) as err:
        fxrewrite.load_rules(text, name="rules.yaml")
    assert [str(p) for p in err.value.problems] == [
        "rules.yaml:6: rule 'swap': 'mode' must be one of once, fixed_point, not 'sometimes'",
        "rules.yaml:7: rule 'swap': duplicate rule name (first defined at line 2)",
    ]


# -- 3: a module called at several sites -----------------------------------------------------------

def _relu_sites(result) -> list[tuple[str, str, str]]:
    return [(n.name, n.target, type(result.module.get_submodule(n.target)).__name__)
            for n in result.module.graph.nodes if n.op == "call_module" and n.target.startswith("layer1.0.relu")]


def test_a_shared_activation_matched_at_every_site_is_replaced_once():
    model = build(ResNet)
    x = image()
    result = fxrewrite.rewrite(fxrewrite.trace(model, x),
                               [Rule("gelu", "replace", Pattern(module_class="ReLU"), args={"with": "nn.GELU"})])
    assert _relu_sites(result) == [("layer1_0_relu", "layer1.0.relu", "GELU"),
                                   ("layer1_0_relu_1", "layer1.0.relu", "GELU")]
    names = {name for name, _ in result.module.named_modules()}
    assert not any(name.startswith("layer1.0.relu_") for name in names)  # no per-site copies left
    assert result.param_map == {name: name for name in model.state_dict()}
    expected = build(ResNet)
    for block in (expected.layer1[0], expected.layer1[1], expected.layer2[0], expected.layer2[1], expected):
        block.relu = nn.GELU()
    assert torch.equal(result.module(x), expected(x))


def test_a_shared_activation_matched_at_some_sites_gets_a_copy_there():
    model = build(ResNet)
    x = image()
    after_add = Pattern(module_class="ReLU", inputs=[Pattern(function="add")])  # the block's second call only
    result = fxrewrite.rewrite(fxrewrite.trace(model, x),
                               [Rule("gelu", "replace", after_add, args={"with": "nn.GELU"})])
    assert _relu_sites(result) == [("layer1_0_relu", "layer1.0.relu", "ReLU"),
                                   ("layer1_0_relu_1", "layer1.0.relu_1", "GELU")]
    assert result.module.get_submodule("layer1.0.relu") is model.layer1[0].relu
    assert result.node_status["layer1_0_relu"] == "kept" and result.node_status["layer1_0_relu_1"] == "replaced"
    assert result.param_map == {name: name for name in model.state_dict()}

    class GeluAfterAdd(nn.Module):  # the eager model the rule describes
        def __init__(self, block):
            super().__init__()
            self.block, self.gelu = block, nn.GELU()

        def forward(self, x):
            b = self.block
            out = b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))
            return self.gelu(out + (x if b.downsample is None else b.downsample(x)))

    expected = build(ResNet)
    expected.layer1 = nn.Sequential(*(GeluAfterAdd(b) for b in expected.layer1))
    expected.layer2 = nn.Sequential(*(GeluAfterAdd(b) for b in expected.layer2))
    assert torch.equal(result.module(x), expected(x))


# -- 7: outputs by key or position, the container kept ---------------------------------------------

@pytest.mark.parametrize("outputs, keys, dropped", [
    (["p3", "p5"], ["p3", "p5"], ["smooth.p4"]),
    ([0], ["p3"], ["smooth.p4", "smooth.p5"]),
    ([-1, "p4"], ["p5", "p4"], ["lateral.p3", "smooth.p3"]),
    ([2, "p5"], ["p5"], ["lateral.p4", "lateral.p3", "smooth.p3", "smooth.p4"]),
])
def test_a_dict_output_pruned_by_key_or_position_stays_a_dict(outputs, keys, dropped):
    model = build(FrozenFPN)
    x = image()
    rule = Rule("keep", "prune_unreachable", args={"outputs": outputs})
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), [rule])
    got, expected = result.module(x), model(x)
    assert isinstance(got, dict) and list(got) == keys
    assert all(torch.equal(got[k], expected[k]) for k in keys)
    assert result.log[0].dropped == [f"{m}.{t}" for m in dropped for t in ("weight", "bias")]


def test_positions_of_a_list_output_stay_a_list():
    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return [self.a(x), self.b(x), self.c(x)]

    gm = fxrewrite.trace(Three(), torch.zeros(1, 2))
    result = fxrewrite.rewrite(gm, [Rule("keep", "prune_unreachable", args={"outputs": [2, 0]})])
    assert fx_output(result) == ["c", "a"] and isinstance(result.module(torch.zeros(1, 2)), list)
    result = fxrewrite.rewrite(gm, [Rule("keep", "prune_unreachable", args={"outputs": [1]})])
    assert fx_output(result) == "b"  # one position: that value itself
    with pytest.raises(RewriteError, match=r"^rule 'keep': output position p3 does not exist in the output "
                                           r"structure \['a', 'b', 'c'\]$"):
        fxrewrite.rewrite(gm, [Rule("keep", "prune_unreachable", args={"outputs": ["p3"]})])


def fx_output(result):
    node = next(n for n in result.module.graph.nodes if n.op == "output")
    return torch.fx.node.map_arg(node.args[0], lambda n: n.name)


# -- 6: the shipped generic Conv+BN folding, against torch.fx's own fuse ----------------------------

class AllFoldable(nn.Module):
    """Every pair rules/fuse-conv-bn.yaml folds: Conv1d/2d/3d, a grouped ConvTranspose2d, Linear + BatchNorm1d,
    and a convolution read twice (left alone)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)
        self.c3, self.b3 = nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4)
        self.c2, self.b2 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.up, self.bu = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2, bias=False), nn.BatchNorm2d(4)
        self.shared, self.bs = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.fc, self.bf = nn.Linear(4, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        seq = self.b1(self.c1(x.mean(3)))
        vol = self.b3(self.c3(x.unsqueeze(2).expand(-1, -1, 3, -1, -1)))
        up = self.bu(self.up(self.b2(self.c2(x))))
        s = self.shared(x)
        return seq, vol, up, self.bs(s) + s, self.bf(self.fc(up.mean((2, 3))))


@pytest.mark.parametrize("name", ["resnet", "mobilenetv3", "efficientnet", "regnet"])
def test_fuse_conv_bn_rules_match_torch_fx_fuse(name):
    from torch.fx.experimental.optimization import fuse as fx_fuse

    model = build(IMAGE_MODELS[name])
    x = image()
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), fxrewrite.load_rules("fuse-conv-bn"))
    reference = fx_fuse(model)
    ours, theirs = result.module.state_dict(), reference.state_dict()
    assert sum(t.numel() for t in ours.values()) == sum(t.numel() for t in theirs.values())
    assert set(ours) == set(theirs)  # the same names: folded layers keep theirs, BatchNorms are gone
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    expected = model(x)
    torch.testing.assert_close(result.module(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.module.modules())
    folded = [k for k, v in result.param_map.items() if isinstance(v, tuple)]
    assert folded and all(k.endswith((".weight", ".bias")) for k in folded)


def test_fuse_conv_bn_rules_on_every_layer_kind():
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    torch.manual_seed(0)
    model = randomised(AllFoldable()).eval()
    x = torch.randn(2, 3, 8, 8)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), fxrewrite.load_rules("fuse-conv-bn"))
    assert [e.rewrites for e in result.log] == [1, 1, 1, 0, 1, 0, 1]  # rule per row of the table
    assert sorted(result.nodes_with_status("collapsed")) == ["b1", "b2", "b3", "bf", "bu"]
    assert result.node_status["bs"] == "kept"  # its convolution is read twice
    for layer, bn, oracle in (("c1", "b1", fuse_conv_bn_eval), ("c3", "b3", fuse_conv_bn_eval),
                              ("c2", "b2", fuse_conv_bn_eval), ("fc", "bf", fuse_linear_bn_eval)):
        reference = oracle(model.get_submodule(layer), model.get_submodule(bn))
        torch.testing.assert_close(result.module.get_submodule(layer).weight, reference.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.module.get_submodule(layer).bias, reference.bias, rtol=1e-5, atol=1e-6)
    assert result.param_map["up.weight"] == ("up.weight", "bu.weight", "bu.running_var")
    assert result.param_map["up.bias"] == ("bu.weight", "bu.bias", "bu.running_mean", "bu.running_var")
    for got, expected in zip(result.module(x), model(x)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_linear_on_sequences_is_not_folded_into_the_batchnorm_after_it():
    # (N, L, C) -> Linear -> BatchNorm1d normalises L, not the Linear's features: refused, not folded wrong.
    model = randomised(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))).eval()  # 3 features, 3 positions
    with pytest.raises(RewriteError, match=r"^rule 'fold-Linear-BatchNorm1d': 0 -> 1: the Linear's output has "
                                           r"shape \(2, 3, 3\); its features are the BatchNorm's channels only "
                                           r"when it is \(N, C\)$"):
        fxrewrite.rewrite(fxrewrite.trace(model, torch.randn(2, 3, 4)), fxrewrite.load_rules("fuse-conv-bn"))
