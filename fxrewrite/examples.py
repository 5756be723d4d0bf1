"""Small built-in models for demonstrations and tests (no download, seeded weights).

Owns the example models: :func:`aux_branch_model` (the demo) and :class:`StepModel` (graphs
described by data, for property tests and fuzzing).

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

from typing import Any, Callable, Sequence

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


class StepModel(nn.Module):
    """A model described by a list of steps: many different graphs from data, for property tests and
    fuzzing (``tests/core/test_properties.py``, ``tests/helpers/fuzz_strategies.py``).

    Value 0 is the input; step ``i`` is ``(kind, inputs, width)`` and computes value ``i + 1``
    from earlier values: ``linear``, ``relu``, ``identity``, ``dropout``, ``batchnorm`` (a module
    each), ``add``, ``mul``, ``cat`` (of several values), ``method_relu`` (``x.relu()``) or
    ``scale`` (times a parameter). ``aux`` is ``(source value, [(linear | identity, width), ...])``,
    a chain hanging off one value. ``forward`` returns ``(last value, end of the auxiliary chain)``;
    parameters are drawn from ``seed``.

    >>> model = StepModel(2, [("linear", (0,), 3), ("identity", (1,), 3), ("add", (1, 2), 3)], (0, [("linear", 1)]))
    >>> [tuple(y.shape) for y in model(torch.zeros(4, 2))]
    [(4, 3), (4, 1)]
    """

    def __init__(self, in_width: int, steps: list, aux: tuple, seed: int = 0):
        super().__init__()
        self.in_width, self.steps = in_width, steps
        self.aux_source, aux_chain = aux
        widths = [in_width]
        self.layers = nn.ModuleDict()
        for i, (kind, inputs, width) in enumerate(steps):
            w_in = widths[inputs[0]]
            if kind == "linear":
                self.layers[str(i)] = nn.Linear(w_in, width)
            elif kind == "relu":
                self.layers[str(i)] = nn.ReLU()
            elif kind == "identity":
                self.layers[str(i)] = nn.Identity()
            elif kind == "dropout":
                self.layers[str(i)] = nn.Dropout(0.5)
            elif kind == "batchnorm":
                self.layers[str(i)] = nn.BatchNorm1d(w_in)
            widths.append(width)
        self.scale = nn.Parameter(torch.ones(()))
        self.aux = nn.Sequential()
        width = widths[self.aux_source]
        for kind, out in aux_chain:
            self.aux.append(nn.Linear(width, out) if kind == "linear" else nn.Identity())
            width = out if kind == "linear" else width
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    @classmethod
    def random(cls, integer: Callable[[int, int], int], choice: Callable[[Sequence], Any],
               kinds: Sequence[str], max_steps: int = 8) -> "StepModel":
        """A random model of ``kinds`` of steps; ``integer(lo, hi)`` (inclusive) and ``choice(options)``
        are the source of randomness (hypothesis' ``draw``, or ``random.Random``'s ``randint`` and
        ``choice``). Values added or multiplied have the same width.

        >>> import random
        >>> r = random.Random(0)
        >>> model = StepModel.random(r.randint, r.choice, ["linear", "relu", "add", "cat"])
        >>> [tuple(y.shape)[0] for y in model(torch.zeros(5, model.in_width))]
        [5, 5]
        """
        in_width = integer(1, 4)
        widths, steps = [in_width], []
        for _ in range(integer(1, max_steps)):
            kind, first = choice(kinds), integer(0, len(widths) - 1)
            if kind in ("add", "mul"):
                inputs = (first, choice([j for j, w in enumerate(widths) if w == widths[first]]))
                width = widths[first]
            elif kind == "cat":
                inputs = (first, integer(0, len(widths) - 1))
                width = widths[inputs[0]] + widths[inputs[1]]
            else:
                inputs = (first,)
                width = integer(1, 5) if kind == "linear" else widths[first]
            steps.append((kind, inputs, width))
            widths.append(width)
        chain = [(choice(["linear", "identity"]), integer(1, 4)) for _ in range(integer(1, 3))]
        return cls(in_width, steps, (integer(0, len(widths) - 1), chain), integer(0, 2**16))

    def forward(self, x):
        values = [x]
        for i, (kind, inputs, _) in enumerate(self.steps):
            a = values[inputs[0]]
            if kind == "add":
                values.append(a + values[inputs[1]])
            elif kind == "mul":
                values.append(a * values[inputs[1]])
            elif kind == "cat":
                values.append(torch.cat([values[j] for j in inputs], 1))
            elif kind == "method_relu":
                values.append(a.relu())
            elif kind == "scale":
                values.append(a * self.scale)
            else:
                values.append(self.layers[str(i)](a))
        return values[-1], self.aux(values[self.aux_source])


DEMO_RULES = """\
rules:
  - name: keep-main-output
    description: the inference model returns only the main head's prediction
    action: prune_unreachable
    args: {outputs: [0]}
  - name: drop-identity
    description: pass-through layers do nothing at inference
    pattern: {module_class: Identity}
    checks:
      - passthrough
    action: collapse
    mode: fixed_point
"""
