"""align.report.diff: night-to-night changes and the drift rule."""

from __future__ import annotations

import pytest

from align.report.diff import compare_nights, drift
from align.report.results import Outcome


def _check(
    case: str = "c", value: float | None = 1e-7, passed: bool = True, limit: float = 2e-6
) -> Outcome:
    return Outcome(case, "forward", "fp32", "check", passed, "rel_rmse", value, limit)


def _run(value: float) -> Outcome:
    return Outcome("r", "full-run", "fp32", "run", True, "top1", value, 76.1)


def test_newly_failing_passing_missing_and_new():
    before = {
        o.key: o
        for o in [_check("a"), _check("b", passed=False), _check("gone"), _check("d", passed=False)]
    }
    tonight = {
        o.key: o
        for o in [_check("a", passed=False), _check("b"), _check("new"), _check("d", passed=False)]
    }
    diff = compare_nights("n1", before, tonight)
    assert [o.case for o in diff.newly_failing] == ["a"]
    assert [o.case for o in diff.newly_passing] == ["b"]
    assert [o.case for o in diff.missing] == ["gone"]
    assert [o.case for o in diff.new] == ["new"]
    assert [o.case for o in diff.still_failing] == ["d"]
    assert diff.drifted == []


@pytest.mark.parametrize(
    ("old", "new", "drifted"),
    [
        (1e-7, 1.1e-7, False),  # noise
        (1e-7, 2.5e-7, False),  # 2.5x: under the factor
        (1e-7, 4e-7, True),  # 4x and above 1% of the limit
        (1e-9, 9e-9, False),  # 9x, but both far below the limit: round-off
        (2e-7, 1.3e-6, True),  # moved by more than half the limit
        (8e-7, 1.7e-6, False),  # 2.1x and 0.45 of the limit: within noise
        (4e-7, 1e-7, True),  # improvements drift too
        (None, 1e-7, False),  # nothing to compare
    ],
)
def test_check_drift_rule(old, new, drifted):
    assert bool(drift(_check(value=old), _check(value=new))) is drifted


@pytest.mark.parametrize(
    ("old", "new", "drifted"), [(76.1, 75.8, False), (76.1, 75.5, True), (0.761, 0.755, True)]
)
def test_full_run_drift_rule(old, new, drifted):
    assert bool(drift(_run(old), _run(new))) is drifted


def test_drift_reason_says_what_moved():
    diff = compare_nights("n1", {_check().key: _check()}, {_check().key: _check(value=1.5e-6)})
    (item,) = diff.drifted
    assert "rel_rmse 1e-07 → 1.5e-06" in item.why and "more than half its limit" in item.why
