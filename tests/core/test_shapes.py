"""Shape propagation records torch.fx's own ``TensorMetadata``, without torch's symbolic-shape machinery."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fxrewrite.shapes import tensor_metadata

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
