"""Shape propagation records torch.fx's own ``TensorMetadata``, without torch's symbolic-shape machinery."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.fx.passes.shape_prop import _extract_tensor_metadata

import fxrewrite
from fxrewrite import Pattern, Rule
from fxrewrite.shapes import shape_of, tensor_metadata
from helpers.toy_models import Chain, example, seeded

LAYOUTS = {
    "contiguous": lambda: torch.zeros(2, 3, 4, 5),
    "channels_last": lambda: torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last),
    "channels_last_3d": lambda: torch.zeros(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d),
    "ones in the shape": lambda: torch.zeros(1, 3, 1, 1),
    "ones, channels_last": lambda: torch.zeros(1, 1, 5, 1).to(memory_format=torch.channels_last),
    "transposed": lambda: torch.zeros(4, 5).t(),
    "permuted, not a memory format": lambda: torch.zeros(2, 3, 4, 5).permute(0, 2, 1, 3),
    "permuted to NHWC order": lambda: torch.zeros(2, 3, 4, 5).permute(0, 2, 3, 1),
    "sliced": lambda: torch.zeros(3, 4)[:, 1:],
    "strided slice": lambda: torch.zeros(2, 1, 4, 4)[:, :, ::2],
    "expanded": lambda: torch.zeros(8).expand(3, 8),
    "scalar": lambda: torch.zeros(()),
    "empty": lambda: torch.zeros(0, 3),
    "fp16 channels_last slice": lambda: torch.zeros(2, 3, 4, 5, dtype=torch.float16)
    .to(memory_format=torch.channels_last)[:, :, :, :1],
    "integer": lambda: torch.arange(6).view(2, 3),
    "requires_grad": lambda: torch.zeros(2, 2, requires_grad=True),
    "parameter": lambda: torch.nn.Parameter(torch.zeros(2, 2)),
    "sparse (torch's own path)": lambda: torch.zeros(3, 3).to_sparse(),
}


@pytest.mark.parametrize("make", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_tensor_metadata_is_what_torch_fx_records(make):
    tensor = make()
    assert tensor_metadata(tensor) == _extract_tensor_metadata(tensor)


def test_propagating_shapes_does_not_import_sympy():
    """torch's extractor asks its symbolic-shape helpers, whose first use imports sympy (seconds)."""
    code = ("import sys, torch, fxrewrite\n"
            "model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.SiLU())\n"
            "gm = fxrewrite.trace(model, torch.zeros(1, 3, 8, 8).to(memory_format=torch.channels_last))\n"
            "print([fxrewrite.shape_of(n) for n in gm.graph.nodes][-1], 'sympy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(1,", "4,", "6,", "6)", "False"]


def test_propagating_shapes_restores_the_thread_count_even_when_a_node_fails():
    from torch import fx, nn

    from fxrewrite.shapes import ShapePropagationError, propagate_shapes, shape_of

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)))
        propagate_shapes(gm, torch.randn(2, 3, 8, 8))
        assert torch.get_num_threads() == 2
        assert [shape_of(n) for n in gm.graph.nodes if n.op == "call_module"] == [(2, 4, 6, 6), (2, 144), (2, 5)]
        with pytest.raises(ShapePropagationError):
            propagate_shapes(gm, torch.randn(2, 3, 9, 9))  # the Linear gets 196 features, not 144
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# -- re-checking shapes after a rule runs what the rule changed, and nothing else ---------------
def _calls_during(gm, rules, model) -> dict[str, int]:
    calls = {name: 0 for name, _ in model.named_children()}
    hooks = [m.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
             for name, m in model.named_children()]
    try:
        result = fxrewrite.rewrite(gm, rules)
    finally:
        for hook in hooks:
            hook.remove()
    return calls, result


def test_collapsing_a_pass_through_runs_nothing_again():
    model = seeded(Chain())
    gm = fxrewrite.trace(model, example(2, 3, 4, 4))
    calls, result = _calls_during(gm, [Rule("no-identity", "collapse", Pattern(module_name="ident"))], model)
    # c2 now reads c1's output itself: the very value it read through the identity
    assert calls == {"c1": 0, "ident": 0, "c2": 0, "act": 0}
    assert result.node_status["ident"] == "collapsed"
    assert shape_of(next(n for n in result.module.graph.nodes if n.name == "act")) == (2, 8, 4, 4)


def test_a_replaced_layer_runs_again_with_what_is_downstream_of_it():
    model = seeded(Chain())
    gm = fxrewrite.trace(model, example(2, 3, 4, 4))
    rule = Rule("swap", "replace", Pattern(module_name="c1"),
                args={"with": "nn.Conv2d", "init": {"in_channels": 3, "out_channels": 8, "kernel_size": 1}})
    calls, result = _calls_during(gm, [rule], model)
    assert calls == {"c1": 0, "ident": 1, "c2": 1, "act": 1}  # c1's replacement is a new module
    assert result.node_status["c1"] == "replaced"


def test_re_checking_leaves_the_buffers_of_what_runs_again_as_they_were():
    # a BatchNorm in training mode downstream of the change runs again: its statistics must not move
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Identity(), torch.nn.BatchNorm2d(4)).train()
    gm = fxrewrite.trace(model, torch.randn(2, 3, 4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rule = Rule("swap", "replace", Pattern(module_name="0"),
                args={"with": "nn.Conv2d", "init": {"in_channels": 3, "out_channels": 4, "kernel_size": 1}})
    calls, result = _calls_during(gm, [rule], model)
    assert calls["2"] == 1  # it did run again
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _Counting(torch.nn.Module):
    """conv -> (in its forward, traced through) add the mean of its output to a buffer, in place."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.act = torch.nn.SiLU()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        y = self.act(self.conv(x))
        self.count.add_(y.mean())
        return y


def test_re_checking_leaves_a_buffer_changed_in_place_through_the_graph_as_it_was():
    torch.manual_seed(0)
    model = _Counting().eval()
    gm = fxrewrite.trace(model, torch.randn(2, 3, 4, 4))
    assert float(model.count) == 0.0
    rule = Rule("relu", "replace", Pattern(module_class="SiLU"), args={"with": "nn.ReLU"})
    result = fxrewrite.rewrite(gm, [rule])
    assert result.node_status["act"] == "replaced"  # the add_ after it ran again, on the known buffer
    assert float(model.count) == 0.0
