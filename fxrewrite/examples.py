"""Small built-in models for demonstrations and tests (no download, seeded weights).

:func:`aux_branch_model` mimics, in miniature, a network trained with an
auxiliary branch: a main path and an auxiliary path share a stem, a pass-through
``Identity`` sits in the main path, and the model returns ``(main, aux)``. The
inference model keeps only ``main``.

>>> import torch
>>> model = aux_branch_model()
>>> main, aux = model(torch.zeros(1, 3, 16, 16))
>>> tuple(main.shape), tuple(aux.shape)
((1, 10), (1, 10))
"""
from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Module):
    """Conv + BatchNorm + SiLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Head(nn.Module):
    """Global pooling and a linear classifier."""

    def __init__(self, c_in: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class AuxBranchNet(nn.Module):
    def __init__(self, classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = ConvBlock(3, width, 2)
        self.main = nn.Sequential(ConvBlock(width, width * 2, 2), nn.Identity(), ConvBlock(width * 2, width * 2))
        self.main_head = Head(width * 2, classes)
        self.aux = nn.Sequential(ConvBlock(width, width, 2), ConvBlock(width, width))
        self.aux_head = Head(width, classes)

    def forward(self, x):
        x = self.stem(x)
        return self.main_head(self.main(x)), self.aux_head(self.aux(x))


def aux_branch_model(seed: int = 0, classes: int = 10, width: int = 16) -> AuxBranchNet:
    """An :class:`AuxBranchNet` with seeded weights and non-trivial BatchNorm statistics, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    model = AuxBranchNet(classes, width)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
    return model.eval()


DEMO_RULES = """\
rules:
  - name: keep-main-output
    description: the inference model returns only the main head's prediction
    action: prune_unreachable
    args: {outputs: [0]}
  - name: drop-identity
    description: pass-through layers do nothing at inference
    pattern: {module_class: Identity, capture: x}
    checks:
      - passthrough: $x
    action: collapse
    mode: fixed_point
"""
