"""fxrewrite.verify: tolerances, the NaN/Inf rule, PASS/FAIL, and the report every --verify prints."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite import VerifyError
from fxrewrite.verify import BITWISE, OutputDiff, Tolerance, VerifyReport, compare

NAN, INF = float("nan"), float("inf")


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_bitwise_is_the_default_and_any_difference_fails():
    report = compare(t(1, 2, 3), t(1, 2, 3 + 2.4e-7))
    assert report.tolerance == BITWISE and not report.passed and not report.equal
    assert report.verdict == "FAIL"
    assert report.max_abs_diff == pytest.approx(2.384185791015625e-07)
    assert report.summary() == ("FAIL: 1 output tensor(s), max abs diff 2.38e-07, max rel diff 7.95e-08 "
                                "(required: bitwise equal)")
    assert compare(t(1, 2, 3), t(1, 2, 3)).summary() == ("PASS: 1 output tensor(s), max abs diff 0, "
                                                         "max rel diff 0 (required: bitwise equal)")


def test_absolute_and_relative_tolerance_combine_like_isclose():
    tol = Tolerance(atol=0.125, rtol=0.01)  # values exact in float32
    assert compare(t(0.0, 100.0), t(0.125, 101.0), tol).passed  # 0.125 <= 0.125; 1.0 <= 0.125 + 1.0
    report = compare(t(0.0, 100.0), t(0.125, 101.25), tol)  # 1.25 > 1.125
    assert not report.passed and not report.outputs[0].within
    assert report.max_abs_diff == 1.25 and report.max_rel_diff == math.inf  # 0.125 against an expected 0
    assert "(required: |diff| <= 0.125 + 0.01 * |expected|)" in report.summary()
    # relative to the expected value, whichever way the difference goes
    assert compare(t(100.0), t(98.75), tol).passed is False and compare(t(100.0), t(99.0), tol).passed


def test_relative_difference_to_zero_is_infinite():
    report = compare(t(0.0, 1.0), t(1e-3, 1.0), Tolerance(atol=1e-2))
    assert report.passed and report.max_rel_diff == math.inf
    assert "max rel diff inf" in report.summary()


def test_nan_at_the_same_positions_in_both_passes():
    report = compare(t(NAN, 1.0), t(NAN, 1.0))
    assert report.passed and report.equal and report.nonfinite == 0
    assert report.max_abs_diff == 0.0 and report.max_rel_diff == 0.0


@pytest.mark.parametrize("expected, actual, bad", [
    ((NAN, 1.0), (1.0, 1.0), 1),  # NaN in the original only
    ((1.0, 1.0), (1.0, NAN), 1),  # NaN after rewriting only
    ((NAN, 1.0), (1.0, NAN), 2),  # NaN in both, at other positions
    ((INF, 1.0), (INF, 1.0), 1),  # Inf in both at the same position: it hides any difference
    ((1.0, -INF), (1.0, 2.0), 1),
    ((NAN, INF), (NAN, INF), 1),
])
def test_nan_or_inf_fails_unless_nan_in_both_at_the_same_positions(expected, actual, bad):
    for tol in (BITWISE, Tolerance(atol=1e9, rtol=1e9)):  # no tolerance excuses it
        report = compare(t(*expected), t(*actual), tol)
        assert not report.passed and report.nonfinite == bad and report.verdict == "FAIL"
        assert report.summary().endswith(f"; {bad:,} NaN/Inf value(s) (only NaN in both outputs at the same "
                                         f"positions is accepted)")


def test_a_nan_difference_is_not_hidden_by_the_max():
    # nan > 0 is False: a check written as max_abs_diff > tol would pass this
    report = compare(t(1.0, 2.0), t(1.0, NAN), Tolerance(atol=1.0))
    assert not report.passed and report.max_abs_diff == 0.0  # over the values finite in both


def test_several_outputs_and_structure():
    expected = (t(1, 2), {"a": [t(3), t(4, 5)]})
    actual = (t(1, 2), {"a": [t(3), t(4, 5.5)]})
    report = compare(expected, actual, Tolerance(atol=0.25))
    assert [o.passed for o in report.outputs] == [True, True, False] and not report.passed
    assert report.outputs[2] == OutputDiff(2, (2,), 0.5, False, 0.1, 0, False)
    with pytest.raises(VerifyError, match="the original gives 3 output tensor"):
        compare(expected, (t(1, 2),))
    with pytest.raises(VerifyError, match=r"output 0: shape \(2,\) in the original, \(3,\)"):
        compare(t(1, 2), t(1, 2, 3))


def test_float16_and_integer_outputs():
    half = compare(torch.tensor([1.0, 2.0], dtype=torch.float16), torch.tensor([1.0, 2.001953125], dtype=torch.float16),
                   Tolerance(rtol=1e-3))
    assert half.passed and half.max_abs_diff == 0.001953125
    assert compare(torch.tensor([2**60 + 1]), torch.tensor([2**60 + 1])).equal
    assert not compare(torch.tensor([2**60 + 1]), torch.tensor([2**60])).equal


def test_tolerance_values_are_checked():
    for bad in (-1.0, NAN, INF, True, "0.1"):
        with pytest.raises(ValueError, match="tolerance atol must be a finite number >= 0"):
            Tolerance(atol=bad)
    assert str(Tolerance()) == "bitwise equal" and Tolerance().bitwise and not Tolerance(rtol=1e-6).bitwise


def test_verify_takes_a_tolerance():
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    slightly_off = lambda x: lin(x) + 1e-6  # noqa: E731
    assert not fxrewrite.verify(lin, slightly_off, x).passed
    report = fxrewrite.verify(lin, slightly_off, x, tolerance=Tolerance(atol=1e-5))
    assert report.passed and not report.equal and report.tolerance == Tolerance(atol=1e-5)
    # the string of a report stays what it was (demo, notebooks); summary() adds the verdict
    assert str(report).startswith("1 output tensor(s): max abs diff")


def test_an_empty_report_passes():
    assert VerifyReport([]).passed and VerifyReport([]).summary().startswith("PASS: 0 output tensor(s)")
