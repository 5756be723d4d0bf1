"""First end-to-end check of the engine on the built-in example model (fuller tests in this folder)."""
import torch

import fxrewrite
from fxrewrite.examples import DEMO_RULES, aux_branch_model


def test_demo_rules_keep_main_output_bitwise():
    model = aux_branch_model()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = fxrewrite.rewrite(fxrewrite.trace(model, x[:1]), fxrewrite.load_rules(DEMO_RULES))
    assert torch.equal(result.module(x), model(x)[0])
    assert sorted(result.nodes_with_status("pruned")) == [
        "aux_0_act", "aux_0_bn", "aux_0_conv", "aux_1_act", "aux_1_bn", "aux_1_conv", "aux_head_fc", "mean_1"]
    assert result.nodes_with_status("collapsed") == ["main_1"]
    assert all(name == origin for name, origin in result.param_map.items())
    assert not any(k.startswith("aux") for k in result.param_map)
