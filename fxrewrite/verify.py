"""Verification: run the original and the rewritten model and compare outputs against a tolerance.

Every comparison fxrewrite makes (``fxrewrite.verify``, the ``--verify`` of every
command) goes through :func:`compare`, so one rule decides PASS or FAIL everywhere:

* each value must satisfy ``|actual - expected| <= atol + rtol * |expected|``
  (:class:`Tolerance`; the default, :data:`BITWISE`, is ``atol = rtol = 0``);
* NaN or Inf anywhere in either output is a failure, except NaN in both outputs at
  exactly the same positions (a model that computes NaN there computes it both ways);
  an Inf is a failure even where both outputs have it: it hides every difference.

The report gives the largest absolute and relative difference over the values that
are finite in both outputs (relative to ``|expected|``; ``inf`` where the expected
value is 0 and the actual one is not).

>>> import torch, fxrewrite
>>> from fxrewrite import Rule, Pattern
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Identity())
>>> result = fxrewrite.rewrite(fxrewrite.trace(model), [Rule("x", "collapse", Pattern(module_class="Identity"))])
>>> report = fxrewrite.verify(model, result.module, torch.randn(3, 2))
>>> report.equal, report.max_abs_diff, report.passed
(True, 0.0, True)
>>> report.summary()
'PASS: 1 output tensor(s), max abs diff 0, max rel diff 0 (required: bitwise equal)'
>>> compare(torch.tensor([1.0, float("nan")]), torch.tensor([1.5, float("nan")]), Tolerance(atol=0.1)).summary()
'FAIL: 1 output tensor(s), max abs diff 0.5, max rel diff 0.5 (required: |diff| <= 0.1 + 0 * |expected|)'
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten

from .errors import VerifyError

__all__ = ["Tolerance", "BITWISE", "OutputDiff", "VerifyReport", "compare", "verify", "select"]

Selector = Callable[[Any], Any] | Sequence[Any] | None


@dataclass(frozen=True)
class Tolerance:
    """How far a value may be from the expected one: ``|diff| <= atol + rtol * |expected|``."""

    atol: float = 0.0
    rtol: float = 0.0

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"tolerance {name} must be a finite number >= 0, got {value!r}")

    @property
    def bitwise(self) -> bool:
        return self.atol == 0 and self.rtol == 0

    def __str__(self) -> str:
        return "bitwise equal" if self.bitwise else f"|diff| <= {self.atol:g} + {self.rtol:g} * |expected|"


#: Exact equality (the default): what a rewrite that only removes and renames must give.
BITWISE = Tolerance()


@dataclass
class OutputDiff:
    """One compared output tensor."""

    index: int
    shape: tuple[int, ...]
    max_abs_diff: float  # over the values finite in both outputs
    equal: bool  # bitwise equal (NaN at the same positions counts as equal)
    max_rel_diff: float = 0.0  # relative to |expected|, over the values finite in both outputs
    nonfinite: int = 0  # values that are NaN or Inf in either output, except NaN in both
    within: bool = True  # every value finite in both is within the tolerance

    @property
    def passed(self) -> bool:
        return self.within and self.nonfinite == 0


@dataclass
class VerifyReport:
    outputs: list[OutputDiff]
    tolerance: Tolerance = field(default=BITWISE)

    @property
    def equal(self) -> bool:
        """Every compared output tensor is bitwise equal."""
        return all(o.equal for o in self.outputs)

    @property
    def passed(self) -> bool:
        """Every value within the tolerance, and no NaN/Inf (but NaN in both at the same positions)."""
        return all(o.passed for o in self.outputs)

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((o.max_rel_diff for o in self.outputs), default=0.0)

    @property
    def nonfinite(self) -> int:
        return sum(o.nonfinite for o in self.outputs)

    def summary(self) -> str:
        """One line: PASS or FAIL, the largest differences and what was required."""
        text = (f"{self.verdict}: {len(self.outputs)} output tensor(s), max abs diff {_number(self.max_abs_diff)}, "
                f"max rel diff {_number(self.max_rel_diff)} (required: {self.tolerance})")
        if self.nonfinite:
            text += (f"; {self.nonfinite:,} NaN/Inf value(s) (only NaN in both outputs at the same positions "
                     f"is accepted)")
        return text

    def __str__(self) -> str:
        state = "bitwise equal" if self.equal else f"max abs diff {self.max_abs_diff:.3g}"
        return f"{len(self.outputs)} output tensor(s): {state}"


def _number(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


def select(value: Any, selector: Selector) -> Any:
    """Pick part of an output: ``None`` = all, a path like ``(0, 1)``, or a function."""
    if selector is None:
        return value
    if callable(selector):
        return selector(value)
    for step in selector:
        value = value[step]
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def compare(expected: Any, actual: Any, tolerance: Tolerance = BITWISE) -> VerifyReport:
    """Compare two outputs (tensors, or nested tuples/lists/dicts of them, flattened in order)
    value by value against ``tolerance``; raise :class:`VerifyError` when their structure differs."""
    expected, actual = _tensors(expected), _tensors(actual)
    if len(expected) != len(actual):
        raise VerifyError(f"the original gives {len(expected)} output tensor(s), the rewritten model {len(actual)}")
    diffs = []
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e.shape != a.shape:
            raise VerifyError(f"output {i}: shape {tuple(e.shape)} in the original, {tuple(a.shape)} after rewriting")
        diffs.append(_diff(i, e, a, tolerance))
    return VerifyReport(diffs, tolerance)


def _diff(index: int, expected: torch.Tensor, actual: torch.Tensor, tolerance: Tolerance) -> OutputDiff:
    shape = tuple(expected.shape)
    if not expected.numel():
        return OutputDiff(index, shape, 0.0, True)
    # fp64 holds every float32/float16/bfloat16 value and every difference of two of them exactly enough.
    e, a = expected.detach().cpu().double(), actual.detach().cpu().double()
    both_nan = e.isnan() & a.isnan()
    finite = e.isfinite() & a.isfinite()
    nonfinite = int((~finite & ~both_nan).sum())
    if both_nan.any():
        equal = bool(torch.equal(e.isnan(), a.isnan())) and \
            bool(torch.equal(e.masked_fill(both_nan, 0), a.masked_fill(both_nan, 0)))
    else:
        equal = bool(torch.equal(expected, actual))
    e, a = e[finite], a[finite]
    diff = (a - e).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = e.abs()
    rel = torch.where(diff == 0, torch.zeros_like(diff), diff / scale)  # x / 0 = inf for x > 0
    max_rel = float(rel.max()) if rel.numel() else 0.0
    within = bool((diff <= tolerance.atol + tolerance.rtol * scale).all())
    return OutputDiff(index, shape, max_abs, equal, max_rel, nonfinite, within)


def verify(original: torch.nn.Module, rewritten: torch.nn.Module, inputs: Any, *,
           select_original: Selector = None, select_rewritten: Selector = None,
           tolerance: Tolerance = BITWISE) -> VerifyReport:
    """Run both models on ``inputs`` (a tensor or a tuple of positional inputs) without autograd
    and compare the selected outputs tensor by tensor (flattened in order) with :func:`compare`."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad():
        expected = select(original(*args), select_original)
        actual = select(rewritten(*args), select_rewritten)
    return compare(expected, actual, tolerance)
