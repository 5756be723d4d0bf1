"""``fxrewrite.tensors.named_tensors`` and ``walk_modules`` find exactly what torch's own walks find, in torch's order."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fxrewrite.tensors import buffers_of, named_tensors, parameter_count, walk_modules
from helpers.any_models import IMAGE_MODELS, build


def torchs_own(module: nn.Module, prefix: str = ""):
    dot = f"{prefix}." if prefix else ""
    yield from ((dot + n, p) for n, p in module.named_parameters(remove_duplicate=False))
    yield from ((dot + n, b) for n, b in module.named_buffers(remove_duplicate=False))


def odd_module() -> nn.Module:
    """A module shared twice, a None child, a None parameter, a non-persistent buffer, a parameter
    directly on the root after its children."""
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared, nn.BatchNorm1d(2)))
    model.add_module("missing", None)
    model.register_buffer("scratch", torch.zeros(3), persistent=False)
    model.register_parameter("unused", None)
    model.scale = nn.Parameter(torch.ones(1))
    model[1].register_buffer("empty", None)
    return model


MODELS = {"odd": odd_module, **{name: (lambda cls=cls: build(cls)) for name, cls in IMAGE_MODELS.items()}}


@pytest.mark.parametrize("prefix", ["", "net"])
@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_names_tensors_and_order_are_torchs(make, prefix):
    model = make()
    ours = [(name, id(t)) for name, t in named_tensors(model, prefix)]
    assert ours == [(name, id(t)) for name, t in torchs_own(model, prefix)]
    assert len(ours) > 4


def test_a_yolo_model():
    from fxrewrite.yolov9 import DetectionModel

    model = DetectionModel("yolov9-t")
    assert [(n, id(t)) for n, t in named_tensors(model)] == [(n, id(t)) for n, t in torchs_own(model)]


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_walk_modules_is_torchs_walk_counting_a_shared_module_once(make):
    model = make()
    assert [id(m) for m in walk_modules(model)] == [id(m) for m in model.modules()]
    assert [id(b) for b in buffers_of(model)] == [id(b) for b in model.buffers()]


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_parameter_count_is_torchs_counting_a_shared_parameter_once(make):
    model = make()
    assert parameter_count(model) == sum(p.numel() for p in model.parameters()) > 0


def test_walks_stay_linear_when_modules_are_shared_in_a_chain():
    # each level holds the next twice: 2**20 paths, 21 modules (torch's own walks visit each once)
    chain = nn.Linear(2, 2)
    for _ in range(20):
        chain = nn.Sequential(chain, chain)

    assert len(walk_modules(chain)) == len(list(chain.modules())) == 21
    assert parameter_count(chain) == 6 and buffers_of(chain) == []
