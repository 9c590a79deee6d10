"""The verdict of full runs: is the documented Top-1 / AP confirmed, given the noise?

A documented figure is one training run evaluated on one val set, so it carries two
noises: evaluation noise (the val set is a sample; binomial, sqrt(p(1-p)/n) for Top-1)
and run-to-run spread (seeds, data order, non-deterministic kernels). One run passes when

    documented - measured <= Z * sqrt(eval_std**2 + run_std**2)

(one-sided: doing better than documented never fails). Several runs are judged on their
mean with scipy's Student t, the spread of the runs measured rather than assumed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from scipy import stats

from align.errors import AlignError
from align.zoo.golden import load_golden

# One-sided 1%: a correct port fails a single run about once in a hundred. Z = 2.33 with
# Top-1 76% on ImageNet's 50,000 val images (eval_std 0.19 pp, run_std defaulting to the
# same) gives a 0.63 pp gate, above ~0.4 pp (twice the binomial std), under which a
# single-run gate fails a correct port about once in twenty runs.
ALPHA = 0.01
Z = float(stats.norm.isf(ALPHA))
BINOMIAL_METRICS = ("top1", "top5")
# Default run-to-run std of a classification figure when the golden file records none:
# the binomial evaluation std itself. Jordan, "On the Variance of Neural Network Training
# with respect to Test Sets and Distributions" (ICLR 2024, arXiv:2304.01910) shows runs
# make approximately independent errors on the test set, so their spread is at most
# sqrt(p(1-p)/n) (it is (1/n) sqrt(sum_i p_i(1-p_i)) over per-image error rates p_i).
DEFAULT_RUN_STD_SOURCE = (
    "default: the binomial evaluation std, an upper bound on run-to-run spread when runs "
    "make independent errors (Jordan, ICLR 2024, arXiv:2304.01910)"
)


@dataclass(frozen=True)
class Noise:
    """The two noises of a figure, in its units (percentage points), with their sources."""

    eval_std: float
    run_std: float
    run_std_source: str


@dataclass(frozen=True)
class Verdict:
    """Whether the documented figure is confirmed, why, and the numbers behind it."""

    passed: bool
    reason: str
    metric: str
    documented: float
    measured: float  # the single run's figure, or the mean of several
    tolerance: float  # the largest shortfall that still passes
    eval_std: float
    run_std: float
    run_std_source: str
    runs: dict[str, Any] = field(default_factory=dict)  # several runs: n, std, ci95, t, df, p

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as result.json stores it."""
        return asdict(self)


def eval_std(metric: str, percent: float, n_val: int) -> float:
    """Binomial std (pp) of an accuracy of `percent` on `n_val` images; 0 for other metrics."""
    if metric not in BINOMIAL_METRICS or n_val <= 0:
        return 0.0
    p = min(max(percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n_val)


def recorded_spread(case: str) -> tuple[str, float, str] | None:
    """(metric, run_std, source) from `[full_run]` of the case's golden file, if it has one."""
    return load_golden(case).full_run


def noise_for(case: str, metric: str, documented: float, n_val: int, runs: int = 1) -> Noise:
    """The evaluation and run-to-run noise of `case`'s documented `metric`.

    A metric with no recorded spread and no default (box AP) can only be judged on
    several runs (`runs` > 1): their own spread stands in for it (judge_runs with a zero
    run_std is the one-sample t test), and each run alone is judged with no tolerance.
    """
    e = eval_std(metric, documented, n_val)
    recorded = recorded_spread(case)
    if recorded is not None and recorded[0] == metric:
        return Noise(e, recorded[1], recorded[2])
    if metric in BINOMIAL_METRICS:
        return Noise(e, e, DEFAULT_RUN_STD_SOURCE)
    missing = (
        f"align/zoo/golden_files/{case}.toml records no run-to-run spread for {metric} "
        "([full_run] metric, "
        "run_std, source)"
    )
    if runs > 1:
        return Noise(e, 0.0, f"none: {missing}; the {runs} runs are judged on their own spread")
    raise AlignError(
        f"{missing} and there is no default for it: measure it with --repeat K (K >= 2, "
        "judged on the runs' own spread) and record it there"
    )


def judge_run(metric: str, documented: float, measured: float, noise: Noise) -> Verdict:
    """One run against the documented figure (see the module docstring)."""
    tolerance = Z * math.hypot(noise.eval_std, noise.run_std)
    shortfall = documented - measured
    passed = shortfall <= tolerance
    head = f"{metric} {measured:.2f} vs documented {documented:.2f}"
    if passed:
        reason = f"confirmed: {head} (shortfall {shortfall:+.2f} pp <= tolerance {tolerance:.2f})"
    else:
        reason = (
            f"not confirmed: {head} is {shortfall:.2f} pp short, tolerance {tolerance:.2f} pp = "
            f"{Z:.2f} x sqrt(eval {noise.eval_std:.2f}^2 + run {noise.run_std:.2f}^2); "
            + _dominant(noise.eval_std, noise.run_std)
        )
    return Verdict(passed, reason, metric, documented, measured, tolerance, **_noise(noise))


def judge_runs(metric: str, documented: float, values: list[float], noise: Noise) -> Verdict:
    """Several runs: their mean against the documented figure, with Student's t (scipy).

    The shortfall of the mean is compared with its standard error, which combines the
    documented run's own noise (eval and run std, taken as known) and the mean's
    (sample std / sqrt(K), estimated: Welch-Satterthwaite degrees of freedom). It fails
    when a shortfall this large has probability below ALPHA for a correct port.
    """
    if len(values) < 2:
        return judge_run(metric, documented, values[0], noise)
    k = len(values)
    mean = sum(values) / k
    sd = statistics.stdev(values)
    mean_var, doc_var = sd**2 / k, noise.eval_std**2 + noise.run_std**2
    se = math.sqrt(mean_var + doc_var)
    df = (mean_var + doc_var) ** 2 / (mean_var**2 / (k - 1)) if mean_var > 0 else math.inf
    t = (mean - documented) / se if se > 0 else (0.0 if mean >= documented else -math.inf)
    p = float(stats.t.cdf(t, df))
    passed = p >= ALPHA
    ci = (
        stats.t.interval(0.95, k - 1, loc=mean, scale=sd / math.sqrt(k)) if sd > 0 else (mean, mean)
    )
    tolerance = float(stats.t.isf(ALPHA, df)) * se
    head = (
        f"mean {metric} of {k} runs {mean:.2f} (95% CI {ci[0]:.2f}..{ci[1]:.2f}) "
        f"vs documented {documented:.2f}"
    )
    if passed:
        reason = f"confirmed: {head} (t = {t:.2f}, p = {p:.3f} >= {ALPHA})"
    else:
        reason = f"not confirmed: {head}: t = {t:.2f}, p = {p:.4f} < {ALPHA}; " + _dominant(
            noise.eval_std, noise.run_std, sd / math.sqrt(k)
        )
    runs = {"n": k, "values": list(values), "std": sd, "ci95": list(ci), "t": t, "df": df, "p": p}
    return Verdict(passed, reason, metric, documented, mean, tolerance, **_noise(noise), runs=runs)


def _noise(noise: Noise) -> dict[str, Any]:
    return {
        "eval_std": noise.eval_std,
        "run_std": noise.run_std,
        "run_std_source": noise.run_std_source,
    }


def _dominant(eval_sd: float, run_sd: float, mean_sd: float | None = None) -> str:
    """Which noise sets the tolerance, and what would tighten it."""
    parts = {"evaluation noise": eval_sd, "the documented run's run-to-run spread": run_sd}
    if mean_sd is not None:
        parts["the spread of these runs' mean"] = mean_sd
    name = max(parts, key=parts.get)
    if parts[name] == 0.0:
        return "no noise is known, so any shortfall fails"
    advice = {
        "evaluation noise": "a larger val set, not more runs, would tighten it",
        "the documented run's run-to-run spread": "repeat the run (--repeat K) and judge the mean",
        "the spread of these runs' mean": "more repeats would tighten it",
    }[name]
    return f"{name} dominates ({parts[name]:.2f} pp): {advice}; the shortfall is beyond the noise"
