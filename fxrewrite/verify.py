"""Verification: run the original and the rewritten model and compare outputs.

>>> import torch, fxrewrite
>>> from fxrewrite import Rule, Pattern
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Identity())
>>> result = fxrewrite.rewrite(fxrewrite.trace(model), [Rule("x", "collapse", Pattern(module_class="Identity"))])
>>> report = fxrewrite.verify(model, result.module, torch.randn(3, 2))
>>> report.equal, report.max_abs_diff
(True, 0.0)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten

from .errors import VerifyError

Selector = Callable[[Any], Any] | Sequence[Any] | None


@dataclass
class OutputDiff:
    index: int
    shape: tuple[int, ...]
    max_abs_diff: float
    equal: bool


@dataclass
class VerifyReport:
    outputs: list[OutputDiff]

    @property
    def equal(self) -> bool:
        """Every compared output tensor is bitwise equal."""
        return all(o.equal for o in self.outputs)

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    def __str__(self) -> str:
        state = "bitwise equal" if self.equal else f"max abs diff {self.max_abs_diff:.3g}"
        return f"{len(self.outputs)} output tensor(s): {state}"


def select(value: Any, selector: Selector) -> Any:
    """Pick part of an output: ``None`` = all, a path like ``(0, 1)``, or a function."""
    if selector is None:
        return value
    if callable(selector):
        return selector(value)
    for step in selector:
        value = value[step]
    return value


def verify(original: torch.nn.Module, rewritten: torch.nn.Module, inputs: Any, *,
           select_original: Selector = None, select_rewritten: Selector = None) -> VerifyReport:
    """Run both models on ``inputs`` (a tensor or a tuple of positional inputs) without autograd
    and compare the selected outputs tensor by tensor (flattened in order)."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad():
        expected = tree_flatten(select(original(*args), select_original))[0]
        actual = tree_flatten(select(rewritten(*args), select_rewritten))[0]
    expected = [t for t in expected if isinstance(t, torch.Tensor)]
    actual = [t for t in actual if isinstance(t, torch.Tensor)]
    if len(expected) != len(actual):
        raise VerifyError(f"the original gives {len(expected)} output tensor(s), the rewritten model {len(actual)}")
    diffs = []
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e.shape != a.shape:
            raise VerifyError(f"output {i}: shape {tuple(e.shape)} in the original, {tuple(a.shape)} after rewriting")
        diff = (e.double() - a.double()).abs().max().item() if e.numel() else 0.0
        diffs.append(OutputDiff(i, tuple(e.shape), float(diff), bool(torch.equal(e, a))))
    return VerifyReport(diffs)
