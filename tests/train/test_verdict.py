"""The full-run verdict: evaluation noise, run-to-run spread, and several runs with scipy."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from align.errors import AlignError
from align.train.verdict import (
    DEFAULT_RUN_STD_SOURCE,
    Noise,
    Z,
    eval_std,
    judge_run,
    judge_runs,
    noise_for,
    recorded_spread,
)


def test_binomial_eval_std_of_imagenet_top1():
    # binomial: sqrt(p (1 - p) / n) = 0.19 pp for Top-1 76% on 50,000 images.
    assert eval_std("top1", 76.0, 50_000) == pytest.approx(0.191, abs=1e-3)
    assert eval_std("box_ap", 36.6, 5_000) == 0.0  # not a binomial proportion


def test_z_is_one_sided_one_percent_and_gate_does_not_flake():
    assert Z == pytest.approx(2.326, abs=1e-3)
    e = eval_std("top1", 76.0, 50_000)
    verdict = judge_run("top1", 76.0, 75.5, Noise(e, e, "default"))
    assert verdict.tolerance > 0.4  # twice the binomial std: a tighter gate flakes
    assert verdict.passed


def test_single_run_fails_beyond_the_noise_and_names_the_dominant_one():
    eval_heavy = judge_run("top1", 97.0, 94.0, Noise(eval_std=0.9, run_std=0.2, run_std_source="x"))
    assert not eval_heavy.passed
    assert eval_heavy.tolerance == pytest.approx(Z * math.hypot(0.9, 0.2))
    assert "evaluation noise dominates" in eval_heavy.reason

    run_heavy = judge_run("top1", 76.4, 74.0, Noise(eval_std=0.19, run_std=0.6, run_std_source="x"))
    assert not run_heavy.passed
    assert "run-to-run spread dominates" in run_heavy.reason
    assert "--repeat" in run_heavy.reason


def test_doing_better_than_documented_never_fails():
    assert judge_run("top1", 70.0, 90.0, Noise(0.0, 0.0, "x")).passed


@given(
    documented=st.floats(50, 99),
    shortfall=st.floats(-5, 5),
    e=st.floats(0.01, 2),
    r=st.floats(0.0, 2),
)
def test_single_run_rule(documented, shortfall, e, r):
    verdict = judge_run("top1", documented, documented - shortfall, Noise(e, r, "x"))
    assert verdict.passed == (shortfall <= Z * math.hypot(e, r) + 1e-12)


def test_several_runs_use_students_t():
    noise = Noise(eval_std=0.37, run_std=0.15, run_std_source="x")
    ok = judge_runs("top1", 99.5, [99.44, 99.72, 99.44, 99.17], noise)
    assert ok.passed and ok.runs["n"] == 4
    lo, hi = ok.runs["ci95"]
    assert lo < ok.measured < hi
    low = judge_runs("top1", 99.5, [97.2, 97.5, 97.0, 97.3], noise)
    assert not low.passed and low.runs["p"] < 0.01
    assert "dominates" in low.reason


def test_without_documented_noise_it_is_the_one_sample_t_test():
    from scipy import stats

    values = [79.2, 79.5, 78.9, 79.4, 79.1]
    verdict = judge_runs("top1", 80.0, values, Noise(0.0, 0.0, "x"))
    expected = stats.ttest_1samp(values, 80.0, alternative="less")
    assert verdict.runs["t"] == pytest.approx(expected.statistic)
    assert verdict.runs["p"] == pytest.approx(expected.pvalue)
    assert verdict.runs["df"] == pytest.approx(len(values) - 1)


def test_one_value_is_judged_as_a_single_run():
    noise = Noise(eval_std=0.3, run_std=0.3, run_std_source="x")
    assert judge_runs("top1", 80.0, [79.2], noise) == judge_run("top1", 80.0, 79.2, noise)


def test_run_spread_comes_from_the_golden_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_GOLDEN_DIR", str(tmp_path))
    (tmp_path / "m.toml").write_text(
        'case = "m"\n[full_run]\nmetric = "top1"\nrun_std = 0.25\nsource = "5 seeds"\n'
    )
    assert recorded_spread("m") == ("top1", 0.25, "5 seeds")
    assert noise_for("m", "top1", 76.0, 50_000).run_std == 0.25

    (tmp_path / "d.toml").write_text('case = "d"\n')
    default = noise_for("d", "top1", 76.0, 50_000)
    assert default.run_std == default.eval_std and default.run_std_source == DEFAULT_RUN_STD_SOURCE
    with pytest.raises(AlignError, match="box_ap.*--repeat K"):
        noise_for("d", "box_ap", 36.6, 5_000)
    several = noise_for("d", "box_ap", 36.6, 5_000, runs=3)  # judged on their own spread
    assert (several.eval_std, several.run_std) == (0.0, 0.0) and "3 runs" in several.run_std_source
    alone = judge_run("box_ap", 36.6, 36.5, several)
    assert not alone.passed and "no noise is known" in alone.reason
    assert judge_runs("box_ap", 36.6, [36.9, 36.2, 36.5], several).passed

    (tmp_path / "bad.toml").write_text('case = "bad"\n[full_run]\nmetric = "top1"\n')
    with pytest.raises(AlignError, match="run_std"):
        recorded_spread("bad")
