"""What changed since the previous night: new failures and passes, drift, missing cases.

Drift (a figure moved by more than its noise while the verdict may not have changed):

- Checks compare the phase's headline, the worst relative RMSE of the target, against
  its limit L. It drifted when it moved by more than half of its allowance,
  |new - old| > 0.5 L, or by more than a factor 3 once both values are floored at
  1% of L, (max + 0.01 L) / (min + 0.01 L) > 3. The floor keeps round-off-sized errors
  (a one-ulp change is a large factor far below the limit) from counting as drift.
- Full runs compare the final task metric (Top-1, box AP, in percent). It drifted when
  it moved by more than 0.5 points: about 2.5 binomial standard deviations of Top-1
  near 76% on the 50,000 ImageNet validation images (0.19 points), the evaluation noise.
  Values at or below 1 are read as fractions and the bound scales to 0.005.

Values missing or not finite on either night are not judged for drift, and an outcome
whose verdict changed is listed as newly failing or newly passing instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from align.report.history import Outcomes
from align.report.results import Outcome
from align.report.text import fmt

CHECK_BUDGET = 0.5  # share of the limit a check headline may move
CHECK_FACTOR = 3.0
CHECK_FLOOR = 0.01  # share of the limit below which factors are not judged
RUN_POINTS = 0.5  # points of Top-1 / AP a full run may move


@dataclass(frozen=True)
class Drift:
    """A headline that moved beyond its noise between two nights."""

    before: Outcome
    after: Outcome
    why: str


@dataclass
class NightDiff:
    """Tonight against the previous night (empty when there is none)."""

    previous: str | None
    newly_failing: list[Outcome] = field(default_factory=list)
    newly_passing: list[Outcome] = field(default_factory=list)
    still_failing: list[Outcome] = field(default_factory=list)
    new: list[Outcome] = field(default_factory=list)  # not recorded the previous night
    missing: list[Outcome] = field(default_factory=list)  # previous night's, absent tonight
    drifted: list[Drift] = field(default_factory=list)


def compare_nights(previous: str | None, before: Outcomes, tonight: Outcomes) -> NightDiff:
    """Compare tonight's outcomes with the previous night's, key by key, in key order."""
    diff = NightDiff(previous)
    for key in sorted(tonight):
        now, then = tonight[key], before.get(key)
        if then is None:
            diff.new.append(now)
        elif then.passed and not now.passed:
            diff.newly_failing.append(now)
        elif now.passed and not then.passed:
            diff.newly_passing.append(now)
        elif not now.passed:
            diff.still_failing.append(now)
        why = drift(then, now) if then is not None and then.passed == now.passed else None
        if why:
            diff.drifted.append(Drift(then, now, why))
    diff.missing = [before[key] for key in sorted(before.keys() - tonight.keys())]
    return diff


def drift(before: Outcome, after: Outcome) -> str | None:
    """Why `after`'s headline drifted from `before`'s, or None when within noise."""
    old, new = before.value, after.value
    if old is None or new is None or before.metric != after.metric:
        return None
    moved = f"{after.metric} {fmt(old)} → {fmt(new)}"
    if after.kind == "run":
        bound = RUN_POINTS if max(abs(old), abs(new)) > 1 else RUN_POINTS / 100
        return f"{moved} (moved more than {fmt(bound)})" if abs(new - old) > bound else None
    limit = after.limit or before.limit
    if limit and abs(new - old) > CHECK_BUDGET * limit:
        return f"{moved}: moved more than half its limit {fmt(limit)}"
    floor = CHECK_FLOOR * limit if limit else 0.0
    low, high = sorted((abs(old), abs(new)))
    if high + floor > CHECK_FACTOR * (low + floor):
        factor = f"{high / low:.3g}x" if low else "from 0"
        return f"{moved}: changed {factor} (limit {fmt(limit)})"
    return None
