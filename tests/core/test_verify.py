"""verify: bitwise comparison of the original and the rewritten model, with output selection."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import VerifyError
from fxrewrite.verify import OutputDiff, select

from helpers.toy_models import TwoBranch, example, seeded


class Pair(nn.Module):
    """Returns ``(x + 1, {"a": [x * 2, x - 3]})``: a nested output."""

    def forward(self, x):
        return x + 1, {"a": [x * 2, x - 3]}


class Off(nn.Module):
    """Like Pair, but one value is off by ``delta``."""

    def __init__(self, delta: float):
        super().__init__()
        self.delta = delta

    def forward(self, x):
        return x + 1, {"a": [x * 2, x - 3 + self.delta]}


def test_equal_models():
    x = example(2, 3)
    report = fxrewrite.verify(Pair(), Pair(), x)
    assert report.equal and report.max_abs_diff == 0.0
    assert report.outputs == [OutputDiff(0, (2, 3), 0.0, True), OutputDiff(1, (2, 3), 0.0, True),
                              OutputDiff(2, (2, 3), 0.0, True)]
    assert str(report) == "3 output tensor(s): bitwise equal"


def test_unequal_models():
    x = example(2, 3)
    report = fxrewrite.verify(Pair(), Off(0.25), x)
    assert not report.equal
    assert [o.equal for o in report.outputs] == [True, True, False]
    assert report.max_abs_diff == pytest.approx(0.25, abs=1e-6)
    assert str(report) == "3 output tensor(s): max abs diff 0.25"


def test_a_tiny_difference_is_not_equal():
    x = torch.ones(4)
    report = fxrewrite.verify(Pair(), Off(1e-6), x)
    assert not report.equal and 0 < report.max_abs_diff < 1e-5


def test_select_paths_and_functions():
    x = example(2, 3)
    single = lambda x: x * 2  # noqa: E731
    assert fxrewrite.verify(Pair(), single, x, select_original=(1, "a", 0)).equal
    assert not fxrewrite.verify(Pair(), single, x, select_original=(1, "a", 1)).equal
    assert fxrewrite.verify(Pair(), Off(5.0), x, select_original=(0,), select_rewritten=(0,)).equal
    assert fxrewrite.verify(Pair(), Off(5.0), x, select_original=lambda o: o[1]["a"][0],
                            select_rewritten=lambda o: o[1]["a"][:1]).equal
    assert select((1, {"k": [2, 3]}), (1, "k", -1)) == 3
    assert select("whole", None) == "whole"


def test_several_positional_inputs():
    add = lambda a, b: a + b  # noqa: E731
    assert fxrewrite.verify(add, lambda a, b: b + a, (torch.ones(2), torch.arange(2.0))).equal


def test_structure_mismatch_raises():
    x = example(2, 3)
    with pytest.raises(VerifyError) as info:
        fxrewrite.verify(Pair(), lambda x: x + 1, x)
    assert str(info.value) == "the original gives 3 output tensor(s), the rewritten model 1"
    with pytest.raises(VerifyError) as info:
        fxrewrite.verify(Pair(), lambda x: x[:1] + 1, x, select_original=(0,))
    assert str(info.value) == "output 0: shape (2, 3) in the original, (1, 3) after rewriting"


def test_verify_a_rewrite_against_the_main_output():
    model = seeded(TwoBranch())
    x = example(2, 3, 8, 8)
    result = fxrewrite.rewrite(fxrewrite.trace(model, x), fxrewrite.load_rules(
        "rules:\n  - {name: main, action: prune_unreachable, args: {outputs: [0]}}\n"))
    assert fxrewrite.verify(model, result.module, x, select_original=(0,)).equal
    assert not fxrewrite.verify(model, result.module, x, select_original=(1,)).equal
    with pytest.raises(VerifyError):
        fxrewrite.verify(model, result.module, x)


def test_verify_runs_without_autograd():
    lin = nn.Linear(2, 2)
    seen = []
    report = fxrewrite.verify(lin, lambda x: seen.append(torch.is_grad_enabled()) or lin(x), torch.ones(1, 2))
    assert report.equal and seen == [False]
