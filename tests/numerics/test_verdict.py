"""Unit tests of align.numerics.verdict.judge with synthetic tensors.

A golden g (float64), a reference r (g with the reference device's error) and a target t:
the target passes when its error against g is no worse than k times the reference's plus
the dtype floor, for every metric, and fails with the metric that shows its error.
"""

from __future__ import annotations

import math

import pytest
import torch

from align.numerics.precision import error_floor, held_dtype, unit_roundoff
from align.numerics.verdict import (
    HEAVY_TAIL_SPREAD,
    NO_SIGNAL_MESSAGE,
    SPREAD_MESSAGE,
    UNIT_FP32,
    Divergence,
    Row,
    Tolerance,
    _k,
    _limit,
    judge,
    judge_on_replays,
    judge_robustly,
    sampling_spread,
    spread,
)

N = 4096


def golden(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def noisy(g: torch.Tensor, rel: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    """g plus independent Gaussian noise of relative RMS `rel`, in `dtype`."""
    gen = torch.Generator().manual_seed(1000 + seed)
    rms = float(g.pow(2).mean().sqrt())
    return (g + rel * rms * torch.randn(g.shape, generator=gen, dtype=torch.float64)).to(dtype)


def row(**kw) -> Row:
    return Row(kw.pop("module", "layer1.conv"), 0, kw.pop("phase", "forward"), "output[0]", "", [])


def run(t, r, g, *, k=2.0, strict_dtype=True, local=True, draws=()) -> Row:
    """judge() as isolation calls it by default (local: share and the bias metrics too)."""
    return judge(
        t, r, g, Tolerance(k=k), strict_dtype=strict_dtype, local=local, row=row(), draws=draws
    )


def explain(r: Row) -> str:
    return "; ".join(
        f"{m} {r.metrics[m]:.3g} limit {r.limits[m]:.3g} ref {r.reference.get(m, math.nan):.3g}"
        for m in r.limits
    )


# -- a target as good as the reference passes -----------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rel", [1e-6, 1e-4, 3e-3])
def test_same_noise_as_the_reference_passes(seed, rel):
    g = golden(seed=seed)
    r, t = noisy(g, rel, 2 * seed), noisy(g, rel, 2 * seed + 1)
    verdict = run(t, r, g, local=True)
    assert verdict.passed, explain(verdict)
    assert set(verdict.limits) == {
        "rel_rmse",
        "cos_err",
        "max_rel",
        "share",
        "mean_err",
        "scale_err",
        "slice_gain",  # a 1-d tensor has one slice: the whole tensor, paired
    }
    assert set(run(t, r, g, local=False).limits) == {"rel_rmse", "cos_err", "max_rel"}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_rounding_noise_in_low_precision_passes(seed, dtype):
    """Both sides round to the low-precision dtype; the target rounds slightly different
    values (another kernel), so its rounding errors are independent of the reference's."""
    g = golden(seed=seed)
    r = g.to(dtype)
    t = noisy(g, 1e-4, seed, torch.float64).to(dtype)
    verdict = run(t, r, g, k=3.0, strict_dtype=False, local=True)
    assert verdict.passed, explain(verdict)


def test_the_reference_itself_and_a_better_target_pass():
    g = golden()
    r = noisy(g, 1e-3, 0)
    assert run(r.clone(), r, g).passed
    assert run(g.float(), r, g).passed  # closer to golden than the reference


def test_exact_reference_still_allows_rounding_level_noise():
    """ReLU, pooling, copies: the reference equals golden, the target may still round."""
    g = golden().float().double()  # representable in float32: the reference is exact
    r = g.float()
    ulp = torch.nextafter(r, torch.full_like(r, math.inf)) - r
    t = r + ulp * torch.randint(-2, 3, r.shape, generator=torch.Generator().manual_seed(3))
    verdict = run(t, r, g, local=False)
    assert verdict.reference["rel_rmse"] == 0.0
    assert verdict.passed, explain(verdict)
    assert verdict.limits["rel_rmse"] == pytest.approx(error_floor(torch.float32))


# -- targets that must fail -----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rel", [1e-5, 3e-3])
def test_ten_times_the_noise_fails_rel_rmse(seed, rel):
    g = golden(seed=seed)
    r, t = noisy(g, rel, 2 * seed), noisy(g, 10 * rel, 2 * seed + 1)
    for local in (True, False):
        verdict = run(t, r, g, local=local)
        assert "rel_rmse" in verdict.failed, explain(verdict)
        assert verdict.metrics["rel_rmse"] == pytest.approx(10 * rel, rel=0.1)
    verdict = run(t, r, g, local=True)  # isolated: exactly k
    assert verdict.limits["rel_rmse"] == pytest.approx(
        2 * verdict.reference["rel_rmse"] + error_floor(torch.float32)
    )


def test_k_of_propagated_errors_rises_with_the_reference_error():
    """Whole-network tensors: k at one unit roundoff, 2k at NOISE_DOMINATED, log-linear."""
    unit = unit_roundoff(torch.float32)
    rels = (unit, error_floor(torch.float32), 1e-4, 1e-3, 1e-2, 0.1, 0.5)
    ks = [_k(2.0, rel, unit, local=False) for rel in rels]
    assert ks[0] == 2.0 and ks[-1] == pytest.approx(4.0)
    assert ks == sorted(ks) and len(set(ks)) == len(ks)
    assert 2.4 < ks[1] < 2.6  # an fp32 error at the floor is ~170 roundings: amplified
    assert _k(2.0, 1e-2, unit, local=True) == 2.0  # isolated: k until noise dominates
    assert _k(2.0, 0.6, unit, local=True) == _k(2.0, 0.6, unit, local=False) == 4.0


def test_cos_err_is_no_stricter_than_rel_rmse_for_noise():
    """For a noise error (cos_err = rel^2 / 2) both limits flip at the same error."""
    for reference in (1e-6, 1e-5, 1e-4, 1e-2):
        for floor in (1e-5, 4e-3):
            rel_limit = _limit("rel_rmse", 3.0, reference, floor, local=True)
            cos_limit = _limit("cos_err", 3.0, reference**2 / 2, floor**2 / 2, local=True)
            assert cos_limit == pytest.approx(rel_limit**2 / 2)


def test_a_few_large_errors_fail_share():
    """2% of the elements 10x off: the RMS stays within k, the share of outliers does not."""
    g = golden()
    r, t = noisy(g, 1e-3, 0), noisy(g, 1e-3, 1)
    idx = torch.arange(0, N, 50)
    signs = torch.tensor([1.0, -1.0]).repeat(len(idx))[: len(idx)]
    t[idx] += 10e-3 * signs
    verdict = run(t, r, g, local=True)
    assert "rel_rmse" not in verdict.failed, explain(verdict)
    assert "share" in verdict.failed, explain(verdict)
    # whole-network rows (local=False) do not judge share: propagated errors are correlated
    assert "share" not in run(t, r, g, local=False).limits


@pytest.mark.parametrize("seed", range(3))
def test_one_wrong_channel_fails_slice_gain_and_honest_noise_passes(seed):
    """A (2, 64, 4, 4) tensor with bf16-level noise (0.3%): one channel 2% off is 1/64 of
    the tensor, within every whole-tensor limit, but 2% over its 32 elements is ~40
    standard errors of that channel's noise. Honest noise of the same size passes."""
    shape = (2, 64, 4, 4)
    g = golden(2048, seed=seed).reshape(shape)
    rel = 3e-3
    r, honest = noisy(g, rel, 3 * seed), noisy(g, rel, 3 * seed + 1)
    assert run(honest, r, g).passed, explain(run(honest, r, g))
    bad = g.clone()
    bad[:, 17] *= 1.02
    t = noisy(bad, rel, 3 * seed + 1)
    verdict = run(t, r, g)
    assert "slice_gain" in verdict.failed, explain(verdict)
    assert not {"rel_rmse", "cos_err", "scale_err", "mean_err"} & set(verdict.failed)
    assert verdict.metrics["slice_gain"] == pytest.approx(0.02, abs=3e-3)
    assert "slice 17 of dim 1" in verdict.message
    assert "slice_gain" not in run(t, r, g, local=False).limits  # whole-network: correlated


@pytest.mark.parametrize("seed", range(3))
def test_a_gain_hidden_in_bf16_level_noise_fails_scale_err(seed):
    """fp32 tensors with bf16-level noise (0.2%): a 0.3% gain stays within the rel_rmse,
    cos_err, max_rel and share limits, but it is systematic, so scale_err sees it."""
    g = golden(seed=seed)
    rel = 2e-3
    r, t = noisy(g, rel, 2 * seed), noisy(1.003 * g, rel, 2 * seed + 1)
    hidden = run(t, r, g, local=False)
    assert hidden.passed, explain(hidden)
    verdict = run(t, r, g, local=True)
    assert verdict.failed == ["scale_err"], explain(verdict)
    assert verdict.metrics["scale_err"] == pytest.approx(0.003, abs=3e-4)
    assert verdict.divergence().metric == "scale_err"
    # and the opposite gain fails the same way: the limit is on |scale_err|
    t = noisy(0.997 * g, rel, 2 * seed + 1)
    assert run(t, r, g, local=True).failed == ["scale_err"]


@pytest.mark.parametrize("seed", range(2))
def test_a_gain_hidden_in_bf16_rounding_fails_scale_err(seed):
    """The amp-bf16 case: both outputs are bf16 (rounding noise ~0.2%), the target 0.3% high."""
    g = golden(seed=seed)
    r = g.to(torch.bfloat16)
    t = (1.003 * noisy(g, 1e-4, seed, torch.float64)).to(torch.bfloat16)
    assert run(
        t, r, g, k=3.0, strict_dtype=False, local=False
    ).passed  # hidden as a whole-network row
    verdict = run(t, r, g, k=3.0, strict_dtype=False, local=True)
    assert verdict.metrics["scale_err"] == pytest.approx(0.003, abs=3e-4)
    assert 2 * unit_roundoff(torch.bfloat16) > 0.003  # the floor that hides it
    assert "scale_err" in verdict.failed, explain(verdict)


def test_an_offset_fails_mean_err():
    g = golden()
    rel = 2e-3
    r, t = noisy(g, rel, 0), noisy(g + 0.003, rel, 1)
    assert run(t, r, g, local=False).passed
    assert run(t, r, g, local=True).failed == ["mean_err"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_target_where_the_reference_is_finite_fails(bad):
    g = golden()
    r, t = noisy(g, 1e-6, 0), noisy(g, 1e-6, 1)
    t[[3, 77, 1000]] = bad
    verdict = run(t, r, g)
    assert "nonfinite" in verdict.failed
    assert verdict.metrics["nonfinite"] == 3 and verdict.limits["nonfinite"] == 0
    assert "3 NaN/Inf" in verdict.message
    d = verdict.divergence()
    assert (d.metric, d.value, d.limit) == ("nonfinite", 3, 0)
    # the other metrics are those of the finite elements: nothing else is wrong
    assert verdict.failed == ["nonfinite"], explain(verdict)


def test_nonfinite_where_the_reference_is_nonfinite_too_is_not_counted():
    g = golden()
    r, t = noisy(g, 1e-6, 0), noisy(g, 1e-6, 1)
    r[5] = t[5] = math.nan
    r[6] = math.inf  # the reference overflowed, the target did not: not the target's fault
    verdict = run(t, r, g)
    assert verdict.passed, explain(verdict)
    assert "nonfinite" not in verdict.metrics


def test_dtype_mismatch_fails_under_strict_dtype():
    g = golden()
    r = noisy(g, 1e-6, 0)
    t = r.double()  # same values, another dtype
    strict = run(t, r, g, strict_dtype=True)
    assert strict.failed == ["dtype"], explain(strict)
    assert "dtype torch.float64 on the target" in strict.message
    assert strict.divergence().metric == "dtype"
    assert run(t, r, g, strict_dtype=False).passed


def test_low_precision_target_against_fp32_reference_fails_by_dtype_and_error():
    g = golden()
    r = noisy(g, 1e-7, 0)
    verdict = run(r.to(torch.bfloat16), r, g, strict_dtype=False)
    assert "dtype" not in verdict.failed and "rel_rmse" in verdict.failed


def test_shape_mismatch_fails():
    g = golden()
    r = noisy(g, 1e-6, 0)
    verdict = run(r[:-1], r, g)
    assert verdict.failed == ["shape"]
    assert "(4095,) on the target" in verdict.message
    assert not verdict.passed


# -- Row: the worst metric and the divergence ---------------------------------------------


def test_divergence_picks_the_worst_failing_metric():
    r = Row("blocks.1.conv", 2, "backward", "grad_input[0]", "float32", [4])
    r.metrics = {"rel_rmse": 0.03, "cos_err": 1e-3, "share": 0.59, "scale_err": -0.02}
    r.limits = {"rel_rmse": 0.01, "cos_err": 1e-4, "share": 0.6, "scale_err": 0.01}
    r.reference = {"rel_rmse": 0.004, "cos_err": 1e-5, "share": 0.3, "scale_err": 0.001}
    r.failed = ["rel_rmse", "cos_err", "scale_err"]  # ratios 3, 10, 2 (|value| for signed)
    d = r.divergence()
    assert isinstance(d, Divergence)
    assert (d.module, d.phase, d.call, d.tensor) == (
        "blocks.1.conv",
        "backward",
        2,
        "grad_input[0]",
    )
    assert (d.metric, d.value, d.limit, d.reference) == ("cos_err", 1e-3, 1e-4, 1e-5)
    r.metrics["scale_err"] = -0.5  # ratio 50: a signed metric counts by its magnitude
    assert r.divergence().metric == "scale_err"
    assert "blocks.1.conv#2 backward grad_input[0]: scale_err -0.5 > limit 0.01" in str(
        r.divergence()
    )


def test_worst_prefers_failed_metrics():
    r = Row("m", 0, "forward", "output[0]", "float32", [4])
    r.metrics = {"rel_rmse": 0.02, "cos_err": 0.9}
    r.limits = {"rel_rmse": 0.01, "cos_err": 0.1}
    r.failed = ["rel_rmse"]
    assert r.worst() == "rel_rmse"
    r.failed = []
    assert r.worst() == "cos_err"  # a passing row: the metric closest to its limit
    assert r.passed


def test_divergence_of_a_judged_row_is_its_worst_failure():
    g = golden()
    r, t = noisy(g, 1e-5, 0), noisy(g, 1e-4, 1)
    t[0] = math.nan
    verdict = run(t, r, g, local=False)
    assert {"rel_rmse", "cos_err", "nonfinite"} <= set(verdict.failed), explain(verdict)
    assert verdict.divergence().metric == "nonfinite"  # a limit of 0: infinitely beyond
    t[0] = g[0]
    verdict = run(t, r, g, local=False)
    ratios = {m: abs(verdict.metrics[m]) / verdict.limits[m] for m in verdict.failed}
    assert verdict.divergence().metric == max(ratios, key=ratios.get)
    assert verdict.divergence().reference == verdict.reference[verdict.divergence().metric]


def test_an_error_as_large_as_the_references_in_another_direction_passes():
    g = golden(8, 0)
    r = (1.2 * g).float()  # the reference: 20% gain, no direction error
    d = torch.randn(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    d -= (d @ g) / (g @ g) * g  # orthogonal to g
    t = (g + 0.2 * g.norm() * d / d.norm()).float()  # the target: 20%, all direction
    verdict = run(t, r, g, k=3.0, strict_dtype=False, local=False)
    assert verdict.metrics["rel_rmse"] == pytest.approx(verdict.reference["rel_rmse"], rel=1e-3)
    assert verdict.passed, explain(verdict)


def test_same_noise_on_small_tensors_rarely_fails():
    """One draw on 8 elements (SE biases, small BN parameters), whole network: at k=2 a
    same-noise target failed 3% of the time; k rising with the reference's error (here
    100x the floor) keeps that under 1 in 300."""
    failed = 0
    for seed in range(300):
        g = golden(8, seed)
        r, t = noisy(g, 1e-3, 2 * seed), noisy(g, 1e-3, 2 * seed + 1)
        failed += not run(t, r, g, local=False).passed
    assert failed <= 1, f"{failed} of 300 same-noise targets failed"


def test_same_noise_on_small_tensors_passes_with_two_honest_draws():
    """Isolated (k not raised): the largest of three draws' errors (align.numerics.jitter)."""
    failed = 0
    for seed in range(300):
        g = golden(8, seed)
        r, t = noisy(g, 1e-3, 4 * seed), noisy(g, 1e-3, 4 * seed + 1)
        draws = [noisy(g, 1e-3, 4 * seed + 2), noisy(g, 1e-3, 4 * seed + 3)]
        failed += not run(t, r, g, local=True, draws=draws).passed
    assert failed <= 1, f"{failed} of 300 same-noise targets failed"


def test_draws_do_not_hide_a_fault():
    """A gain fault of 10x the noise still fails when the limits come from three draws."""
    g = golden(seed=3)
    draws = [noisy(g, 1e-4, n) for n in range(3)]
    t = (g * (1 + 1e-3)).float()
    verdict = run(t, draws[0], g, draws=draws[1:])
    assert not verdict.passed and "scale_err" in verdict.failed, explain(verdict)


def test_the_reference_column_is_the_envelope_of_the_draws():
    g = golden(seed=4)
    r, big = noisy(g, 1e-5, 0), noisy(g, 1e-4, 1)
    verdict = run(noisy(g, 1e-5, 2), r, g, draws=[big])
    alone = run(noisy(g, 1e-5, 2), big, g)
    assert verdict.reference["rel_rmse"] == pytest.approx(alone.reference["rel_rmse"])
    assert verdict.limits["rel_rmse"] == pytest.approx(alone.limits["rel_rmse"])


@pytest.mark.parametrize("local", [True, False])
@pytest.mark.parametrize("rel,factor", [(1e-4, 3.0), (1e-2, 5.0), (0.4, 3.0)])
def test_needed_k_is_where_the_verdict_flips(local, rel, factor):
    """Row.needed_k (what calibration reads) is the k from which the target passes; exactly
    that k on whole-network rows, an upper bound on isolated ones (share's bound leaves
    out the reference's own share)."""
    g = golden(seed=7)
    r, t = noisy(g, rel, 11), noisy(g, factor * rel, 12)
    need = run(t, r, g, k=1.0, local=local).needed_k
    assert 1.0 < need < 10 * factor
    assert run(t, r, g, k=need * 1.001, local=local).passed
    if not local:
        assert not run(t, r, g, k=need * 0.99, local=local).passed


@pytest.mark.parametrize("case", ["one repeated value", "one large element"])
def test_a_slice_that_holds_one_rounding_may_carry_it_as_a_gain(case):
    """bf16 tensors: a slice whose values are all equal, or whose golden one element
    dominates, has one independent rounding, whatever its size: the target rounding that
    element the other way (one bf16 ulp off, ~0.4%) is honest, not a slice fault."""
    g = golden(2048, seed=4).reshape(2, 16, 64)
    if case == "one repeated value":
        g[:, :, 5] = 0.37
    else:
        g[:, :, 5] *= 1e-3
        g[1, 3, 5] = 3.0
    r = g.to(torch.bfloat16)
    t = r.clone()
    # every element of the slice one bf16 rounding up (2^-8 relative: the next value up)
    t[:, :, 5] = (r[:, :, 5].double() * (1 + 2**-8)).to(torch.bfloat16)
    verdict = run(t, r, g, strict_dtype=False)
    assert "slice_gain" not in verdict.failed, explain(verdict)


def test_a_float32_slice_of_a_few_bf16_roundings_may_be_one_bf16_ulp_off():
    """A weight gradient under amp-bf16 (float32, holding bf16 values) whose grad_output holds
    a few distinct values: an input channel's 576 elements are 6 roundings, so a kernel
    that sums the batch's partial gradients in bf16 (ATen's native one) may leave all of
    them one bf16 ulp off. Judged as float32 elements, each independent, that was a 200
    standard error gain; 3% off still fails."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(64, 32, 3, 3, generator=gen, dtype=torch.float64).to(torch.bfloat16).double()
    few = torch.tensor([1.4, 1.42, -1.38, 1.45, -1.41, 1.39], dtype=torch.float64) * 1e-9
    g[:, 5] = few[torch.randint(6, (64, 3, 3), generator=gen)]
    r = g.to(torch.bfloat16).float()
    t = r.clone()
    up = r[:, 5].to(torch.bfloat16).view(torch.int16) + 1  # sign and magnitude: the next
    t[:, 5] = up.view(torch.bfloat16).float()  # bf16 value away from zero, one ulp
    assert (t[:, 5].abs() > r[:, 5].abs()).all() and held_dtype(t) == torch.bfloat16
    verdict = run(t, r, g, strict_dtype=False)
    assert "slice_gain" not in verdict.failed, explain(verdict)
    fault = r.clone()
    fault[:, 5] = (r[:, 5].double() * 1.03).to(torch.bfloat16).float()
    failed = run(fault, r, g, strict_dtype=False)
    assert "slice_gain" in failed.failed and "slice 5 of dim 1" in failed.message, explain(failed)


@pytest.mark.parametrize("local", [True, False])
def test_exact_data_that_fits_bf16_is_judged_as_float32_under_amp(local):
    """Float32 values a narrower dtype holds are rounded there only where the golden's
    are not: integer coordinates (anchors, counts) are exact data, and a target 0.3% off
    on them fails under amp as under fp32, though bf16's floor would let it pass."""
    g = torch.randint(128, 256, (64, 64), generator=torch.Generator().manual_seed(0)).double()
    t = g.float()
    t[torch.rand(64, 64, generator=torch.Generator().manual_seed(1)) < 0.3] += 1
    verdict = run(t, g.float(), g, strict_dtype=False, local=local)
    assert "rel_rmse" in verdict.failed, explain(verdict)
    assert verdict.limits["rel_rmse"] < 1e-4  # float32's floor, not bf16's


def test_a_few_large_values_rounded_honestly_are_no_gain():
    """scale_err weighs each error by g, and rounding errors grow with |g|: over 20 bf16
    values spanning two decades (an SE block's activation at 1x1), a target whose every
    element rounds half an ulp otherwise, at random, never fails scale_err (2 of these 200
    seeds did while its standard error was taken as residual / sqrt(n))."""
    from align.testing.honest import _nudge

    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        g = torch.randn(20, generator=gen, dtype=torch.float64)
        g *= torch.logspace(-1, 1, 20, dtype=torch.float64)
        t = _nudge(g.to(torch.bfloat16), 0.5, gen)
        verdict = run(t, g.to(torch.bfloat16), g, k=3.0)
        assert "scale_err" not in verdict.failed, (seed, explain(verdict))


# efficientnet_b0's SE activation (blocks.3.0.se.act1) over 2x10x1x1 values at 16 px
SE_ACTIVATION = [1.2314, -0.0969, 1.6976, -0.1752, -0.1983, -0.1867, -0.2502, 0.4876, -0.2209]
SE_ACTIVATION += [-0.0572, 4.4115, 4.8974, -0.048, 0.5167, -0.1977, -0.2769, 5.28, -0.0339]
SE_ACTIVATION += [1.51, 1.6868]


def test_a_bias_of_a_few_effective_elements_may_be_one_ulp_of_them():
    """Three values carry this tensor's scale_err: an honest target one ulp below on all
    three (1 in 8 for a one-ulp target) passes; a 3% gain still fails."""
    g = torch.tensor(SE_ACTIVATION, dtype=torch.float64)
    r = g.to(torch.bfloat16)
    large = g.abs() > 4
    ulp = torch.finfo(torch.bfloat16).eps * 4  # the binade [4, 8)
    t = torch.where(large, r.double() - ulp, r.double()).to(torch.bfloat16)
    assert run(t, r, g, k=3.0).passed, explain(run(t, r, g, k=3.0))
    assert "scale_err" in run((g * 1.03).to(torch.bfloat16), r, g, k=3.0).failed


@pytest.mark.parametrize("seed", range(3))
def test_outputs_that_share_one_rounding_may_carry_it_as_a_bias(seed):
    """A train-mode BatchNorm over two values (batch 2, 1x1 maps) outputs about +-1 in
    every channel: 4096 bf16 elements, a few distinct roundings. A target one ulp off on
    half of them (the half-ulp nudge of align.testing.perturb, a whole ulp just below a
    power of two) is biased by ~0.15%, thousands of independent standard errors but one
    rounding: honest. A 1% gain on the same outputs still fails."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(2048, generator=gen, dtype=torch.float64)
    one = (d / 2) / (d * d / 4 + 1e-5).sqrt()  # (x - mean) / sqrt(var + eps) over 2 values
    g = torch.cat([one, -one])
    r = g.to(torch.bfloat16)
    _, exponent = torch.frexp(r.float())
    sign = torch.randint(0, 2, r.shape, generator=gen) * 2 - 1
    ulp = torch.finfo(torch.bfloat16).eps * torch.ldexp(torch.ones(r.shape), exponent - 1)
    t = (r.float() + sign * ulp / 2).to(torch.bfloat16)
    assert abs(float((t.double() - g) @ g / (g @ g))) > 5e-4  # a bias, as measured on resnet26d
    verdict = run(t, r, g, k=3.0, strict_dtype=False)
    assert verdict.passed, explain(verdict)
    faulty = run((1.01 * g).to(torch.bfloat16), r, g, k=3.0, strict_dtype=False)
    assert not faulty.passed, explain(faulty)


@pytest.mark.parametrize("reference_off_by", [0.6, 1.0, 4.0])
def test_a_propagated_tensor_the_reference_misses_by_half_its_size_is_not_judged(reference_off_by):
    """A gradient that cancels below the rounding of its terms (through a BatchNorm over
    two values): the reference 60% off, exactly 0 (off by its whole size) or 4x off, an honest
    target 30x off. No signal at this precision: reported, not failed. In isolation (local)
    the same tensor is judged."""
    g = 1e-6 * golden()
    r = (
        torch.zeros_like(g)
        if reference_off_by == 1.0
        else g + reference_off_by * (noisy(g, 1.0, 1) - g)
    )
    t = (g + 30 * (noisy(g, 1.0, 2, torch.float64) - g)).float()
    verdict = run(t, r.float(), g, local=False)
    assert verdict.passed and verdict.message == NO_SIGNAL_MESSAGE, explain(verdict)
    assert not run(t, r.float(), g, local=True).passed


def test_the_targets_overflow_of_a_tensor_without_signal_is_not_judged():
    """fp16 noise that overflows where the reference's does not, in a gradient that is 0
    in exact arithmetic: no signal, so no failure; the same Inf in a tensor that carries
    one fails, whole-network and isolated alike."""
    g = 1e-6 * golden()
    noise = noisy(g, 1.0, 1).double() - g
    r, t = (g + noise).float(), (g + 30 * noise).float()
    t[:4] = math.inf
    assert run(t, r, g, local=False).message == NO_SIGNAL_MESSAGE
    assert run(t, r, g, local=False).passed
    assert "nonfinite" in run(t, r, g, local=True).failed
    g = golden()
    t = noisy(g, 1e-7, 2)
    t[:4] = math.inf
    assert "nonfinite" in run(t, noisy(g, 1e-7, 1), g, local=False).failed


# -- heavy-tailed honest errors ----------------------------------------------------------------


def _robustly(t, r, g, draws, local, isolated=False):
    calls = []

    def made(round_):
        calls.append(round_)
        return draws[: 2 * 3**round_]

    judged = row()
    judged.isolated = isolated
    verdict = judge_robustly(
        t, r, g, Tolerance(k=2.0), strict_dtype=False, local=local, row=judged, draws=made
    )
    return verdict, calls


def test_a_propagated_tensor_whose_honest_runs_disagree_by_orders_is_not_judged():
    """The reference and two draws within 3x of each other, four more up to 100x: one more
    honest device may miss the tensor by anything (a BatchNorm over two values whose sign a
    rounding decides), so a target 20x the largest off is reported as no signal, not
    failed; but judged on every draw first, though it fails far beyond the gray zone."""
    g = golden(64, seed=5)
    r = noisy(g, 1e-5, 0)
    draws = [noisy(g, rel, n) for n, rel in enumerate([2e-5, 3e-5, 1e-5, 1e-3, 2e-5, 1e-5], 1)]
    t = noisy(g, 2e-2, 9)
    verdict, calls = _robustly(t, r, g, draws, local=False)
    assert verdict.passed and verdict.message == SPREAD_MESSAGE, explain(verdict)
    assert calls == [0, 1]
    isolated, calls = _robustly(t, r, g, draws, local=True)
    assert not isolated.passed and calls == [0]  # far beyond its limit: a fault, no more draws


def test_a_running_statistic_in_isolation_is_judged_however_its_draws_spread():
    """A running statistic judged alone (conditioned like a propagated tensor, `local`
    False) on the reference's inputs: every honest run sums the same values, so draws far
    from a reference that is all but exact are no heavy tail (rexnet_100's SE BatchNorm
    over two values under amp-bf16: a momentum fault 21% off was excused as one)."""
    g = golden(64, seed=5)
    r = noisy(g, 1e-5, 0)
    draws = [noisy(g, rel, n) for n, rel in enumerate([2e-5, 3e-5, 1e-5, 1e-3, 2e-5, 1e-5], 1)]
    t = noisy(g, 5e-2, 9)
    verdict, _ = _robustly(t, r, g, draws, local=False, isolated=True)
    assert not verdict.passed and verdict.message != SPREAD_MESSAGE, explain(verdict)
    honest, _ = _robustly(noisy(g, 1e-3, 9), r, g, draws, local=False, isolated=True)
    assert honest.passed, explain(honest)


def one_off(g: torch.Tensor, size: float, at: int) -> torch.Tensor:
    """g (float32) with element `at` off by `size` times g's RMS: an error one element carries."""
    x = g.clone()
    x[at] += size * float(g.pow(2).mean().sqrt())
    return x.float()


def test_a_propagated_error_that_one_element_carries_is_judged_as_a_small_sample():
    """Honest errors each carried by one element of 256 (AdamW's first update, steep where a
    gradient is near eps, moves one weight far): one more honest device's element may be
    several times theirs, and passes; one beyond what the sampling spread allows fails, as
    does the same element judged alone on the reference's inputs."""
    g = golden(256, seed=7)
    r = one_off(g, 1e-4, 3)
    draws = [one_off(g, size, at) for size, at in ((2e-4, 50), (1.5e-4, 90))]
    honest, _ = _robustly(one_off(g, 8e-4, 200), r, g, draws, local=False)
    assert honest.passed, explain(honest)
    assert 3.9 < sampling_spread(1.0) <= 4.0
    far, _ = _robustly(one_off(g, 2e-2, 200), r, g, draws, local=False)
    assert not far.passed, explain(far)
    isolated, _ = _robustly(one_off(g, 8e-4, 200), r, g, draws, local=False, isolated=True)
    assert not isolated.passed, explain(isolated)  # alone on the same inputs: no widening


def test_a_propagated_tensor_whose_honest_runs_agree_still_fails():
    g = golden(64, seed=5)
    r = noisy(g, 1e-5, 0)
    draws = [noisy(g, rel, n) for n, rel in enumerate([2e-5, 3e-5, 1e-5, 4e-5, 2e-5, 1e-5], 1)]
    verdict, calls = _robustly(noisy(g, 5e-3, 9), r, g, draws, local=False)
    assert not verdict.passed and verdict.message != SPREAD_MESSAGE, explain(verdict)
    assert calls == [0, 1]
    spread_of = spread(r, g, draws, floor=error_floor(torch.float32))
    assert 1 < spread_of < HEAVY_TAIL_SPREAD


def test_a_nonfinite_target_is_never_excused_by_a_wide_spread():
    g = golden(64, seed=5)
    r = noisy(g, 1e-5, 0)
    draws = [noisy(g, rel, n) for n, rel in enumerate([2e-5, 3e-5, 1e-5, 1e-3, 2e-5, 1e-5], 1)]
    t = noisy(g, 5e-3, 9)
    t[0] = float("inf")
    verdict, _ = _robustly(t, r, g, draws, local=False)
    assert not verdict.passed and "nonfinite" in verdict.failed


@pytest.mark.parametrize("seed", range(3))
def test_a_channel_gain_is_judged_against_the_reference_not_beside_it(seed):
    """bf16 outputs of a convolution (a reduction: two roundings' accuracy), (2, 64, 8, 8),
    whose every channel carries a bias both devices share (their common inputs and
    weights rounded to bf16, ~0.05%): a target 1% off on one channel (2.5 bf16 roundoffs,
    over 128 elements) departs from the reference there by far more than its own rounding
    explains, though its error against the golden is within a few ulp. An honest target
    (its own output rounding) passes."""
    shape = (2, 64, 8, 8)
    g = golden(8192, seed=seed).reshape(shape)
    gen = torch.Generator().manual_seed(seed)
    common = g * (1 + 5e-4 * torch.randn(1, 64, 1, 1, generator=gen, dtype=torch.float64))
    r = common.to(torch.bfloat16)

    def conv(t: torch.Tensor) -> Row:
        return judge(
            t, r, g, Tolerance(k=3.0), strict_dtype=True, local=True, row=row(), accuracy=2.0
        )

    honest = noisy(common, 1e-3, seed, dtype=torch.bfloat16)
    assert conv(honest).passed, explain(conv(honest))
    bad = common.clone()
    bad[:, 40] *= 1.01
    verdict = conv(bad.to(torch.bfloat16))
    assert "slice_gain" in verdict.failed, explain(verdict)
    assert "slice 40 of dim 1" in verdict.message


def test_a_gain_on_a_tensor_too_small_to_slice_is_judged_paired():
    """A linear layer's 10x10 fp32 weight gradient computed in bf16 (amp-bf16): honest
    draws whose nudged operands leave a 0.5% gain widen scale_err's limit past a 1% gain,
    and no dim has slices to judge. Paired with the reference, the whole tensor as one
    slice, 1% is far beyond what one rounding of its values leaves; an honest target
    (its own rounding of the same sums) passes."""
    g = golden(100, seed=0).reshape(10, 10)
    r = g.to(torch.bfloat16).float()
    draws = [(g * (1 + gain)).to(torch.bfloat16).float() for gain in (5e-3, -4e-3)]

    def weight_grad(t: torch.Tensor) -> Row:
        return judge(
            t, r, g, Tolerance(k=2.0), strict_dtype=True, local=True, row=row(), draws=draws
        )

    honest = weight_grad(noisy(g, 1e-3, 1, torch.bfloat16).float())
    assert honest.passed, explain(honest)
    verdict = weight_grad((noisy(g, 1e-3, 1, torch.float64) * 1.01).to(torch.bfloat16).float())
    assert verdict.failed == ["slice_gain"], explain(verdict)
    assert verdict.message.startswith("the whole tensor (100 elements"), verdict.message


def test_a_slice_may_depart_as_far_as_an_honest_draw_beyond_its_nudges():
    """An fp32 gradient that cancels down to a few eps-sized terms (rexnet_100's SE
    BatchNorm over 2x1x1 values at 32 px): one dominant element the fused reference gets
    nearly exact, an honest draw, whose nudged operands the cancellation amplifies, 3e-4
    off, and an honest decomposed kernel 1.5e-4 off. The draw says how far an honest
    device may be there; without it the slice fails."""
    g = golden(16 * 64, seed=5).reshape(16, 64)
    g[0] *= 1e-3
    g[0, 7:9] = 3.0  # slice 0 of dim 0: two effective elements
    r = g.float()
    draw, t = r.clone(), noisy(g, 1e-7, 6)
    draw[0, 7:9] *= 1 + 3e-4
    t[0, 7:9] *= 1 + 1.5e-4
    alone = run(t, r, g)
    assert "slice_gain" in alone.failed, explain(alone)
    verdict = run(t, r, g, draws=[draw])
    assert verdict.passed, explain(verdict)
    fault = t.clone()
    fault[0, 7:9] = r[0, 7:9] * (1 + 1e-3)
    assert "slice_gain" in run(fault, r, g, draws=[draw]).failed


def test_a_slice_one_element_carries_is_judged_as_that_element():
    """A depthwise weight gradient over 1x1 maps: each channel's 25 taps, one of them
    nonzero, a sum over the batch that cancels. Its gain is that one element's error, a
    ratio of two single samples: 10x the reference's is honest there, and passes; a 1%
    error on it still fails, as an element."""
    g = torch.zeros(64, 25, dtype=torch.float64)
    g[:, 12] = golden(64, seed=7)
    r = (g * (1 + 1e-5 * golden(64 * 25, seed=8).reshape(64, 25))).float()
    t = (g * (1 + 1e-5 * golden(64 * 25, seed=9).reshape(64, 25))).float()
    t[3, 12] = g[3, 12] * (1 + 10 * float((r[3, 12] - g[3, 12]) / g[3, 12]))
    honest = run(t, r, g)
    assert "slice_gain" not in honest.failed, explain(honest)
    fault = t.clone()
    fault[3, 12] = g[3, 12] * 1.01
    assert not run(fault, r, g).passed


def test_a_slice_of_few_effective_elements_may_carry_their_honest_ulps():
    """A bf16 channel of 32 values, four of which dominate (a BatchNorm over 2x4x4 values
    after a ReLU), all four one ulp low on an honest target by chance: its residual sees
    no noise, but four elements one ulp off are what an honest device may show."""
    gen = torch.Generator().manual_seed(0)
    g = (torch.rand(2, 16, 32, generator=gen, dtype=torch.float64) * 0.3).to(torch.bfloat16)
    g[:, 5] = 0.0
    g[:, 5, :4] = torch.tensor([1.336, 1.18, 3.578, 1.383], dtype=torch.bfloat16)
    g[:, 5, 4:12] = 0.26
    r = g.clone()
    t = r.clone()
    t[:, 5, :4] = (r[:, 5, :4].double() * (1 - 2**-8)).to(torch.bfloat16)  # one ulp low
    assert (t[:, 5, :4] < r[:, 5, :4]).all()
    verdict = run(t, r, g.double(), strict_dtype=False)
    assert "slice_gain" not in verdict.failed, explain(verdict)


def test_integer_tensors_are_judged_in_float64_without_wrapping():
    """uint8 masks (a detector's): a target one below the reference is -1 there, not 255."""
    r = (torch.arange(128) % 2).to(torch.uint8).reshape(2, 64)
    t = r.clone()
    t[0, 1] = 0
    verdict = run(t, r, r.double(), strict_dtype=False)
    assert verdict.metrics["slice_gain"] < 0, explain(verdict)


@pytest.mark.parametrize("seed", range(3))
def test_elements_straying_beyond_the_references_own_fail_excess_share(seed):
    """Isolated bf16 outputs whose reference misses the golden by 1% of RMS (weights both
    devices round alike to bf16, amplified where the sum cancels), and a target that also
    moves a tenth of its elements by 3% of RMS (a border the kernel pads wrongly): its
    rel_rmse stays within k times the reference's and no element is beyond share's tau,
    but those elements are further from the golden than the reference's by many ulps.
    An honest target (each element a rounding away from the reference's) and a more
    accurate one pass."""
    g = golden(seed=seed)
    common = noisy(g, 1e-2, seed, dtype=torch.float64)
    r = common.to(torch.bfloat16)
    rms = float(g.pow(2).mean().sqrt())
    sign = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    bad = common.clone()
    bad[: N // 10] += 0.03 * rms * sign[: N // 10]  # either way: no bias to speak of
    verdict = run(bad.to(torch.bfloat16), r, g, k=3.0)
    assert verdict.failed == ["excess_share"], explain(verdict)
    assert "further from the golden than the reference's" in verdict.message
    honest = (common * (1 + sign * 2.0**-8)).to(torch.bfloat16)
    assert (honest != r).float().mean() > 0.3  # most elements a rounding off
    for target in (honest, g.to(torch.bfloat16)):
        verdict = run(target, r, g, k=3.0)
        assert verdict.passed, explain(verdict)
        assert verdict.metrics["excess_share"] == 0.0


def test_excess_share_is_judged_on_reduced_precision_isolated_tensors_only():
    """fp32 tensors keep their k-times-the-reference limits (another summation order moves
    a cancelling fp32 element by many of its ulps), and whole-network ones are correlated
    through the layers before them: neither gets the paired element check."""
    g = golden()
    common = noisy(g, 1e-2, 0, dtype=torch.float64)
    for r, local in ((common.to(torch.float32), True), (common.to(torch.bfloat16), False)):
        assert "excess_share" not in run(r, r, g, local=local).metrics


def _bf16_scaled(g: torch.Tensor, scale: float) -> torch.Tensor:
    """bf16 values times `scale` rounded to bf16, as an elementwise bf16 kernel computes."""
    return (g.to(torch.bfloat16).double() * scale).to(torch.bfloat16)


def test_a_replayed_gain_both_sides_share_passes_on_inputs_unalike():
    """Each side re-run alone on its own inputs (step isolation): a constant rounded to bf16
    on both (1 / keep_prob of a drop-path: +0.11%) passes however unalike the two sides'
    values are, and a 1% gain on the target alone still fails."""
    rounded = float(torch.tensor(1 / 0.9857).to(torch.bfloat16))
    sides = [golden(seed=1).to(torch.bfloat16).double(), golden(seed=2).to(torch.bfloat16).double()]
    exact = [x / 0.9857 for x in sides]  # what each side's float64 replay computes
    reference = _bf16_scaled(sides[0], rounded)
    tol = Tolerance()
    for gain, passes in ((1.0, True), (1.01, False)):
        target = _bf16_scaled(sides[1], rounded * gain)
        row = Row("drop_path", 0, "forward", "output[0]", "", [], isolated=True)
        judged = judge_on_replays(
            target, reference, exact[1], exact[0], tol, strict_dtype=False, row=row, accuracy=1.0
        )
        assert judged.passed == passes, (gain, judged.failed, judged.message)


def test_a_replayed_weight_gradient_may_come_back_rounded_to_the_kernels_dtype():
    """Under bf16 autocast a kernel that computed a float32 parameter gradient from bf16
    operands may return it rounded to bf16 once (the CPU's channels_last BatchNorm
    backward does), where the reference's is an exact fp32 sum: it passes. The same
    rounding under fp32 fails, and a 2% gain rounded to bf16 fails under bf16."""
    sums = [golden(64, seed=s) for s in (1, 2)]  # each side's exact sum: its replay
    reference = sums[0].float()
    tol = Tolerance()
    for strict, gain, passes in ((False, 1.0, True), (True, 1.0, False), (False, 1.02, False)):
        target = (sums[1] * gain).to(torch.bfloat16).float()
        judged = judge_on_replays(
            target,
            reference,
            sums[1],
            sums[0],
            tol,
            strict_dtype=strict,
            row=Row("bn", 0, "param_grad", "bias", "", [], isolated=True),
            accuracy=2.0,
        )
        assert judged.passed == passes, (strict, gain, judged.failed, judged.message)


@pytest.mark.parametrize(
    "size, share, only",
    [
        # every channel: the CPU's channels_last kernel, up to 0.22 sqrt(n) fp32
        # roundoffs of gain per channel, n = 2 x 32 x 64
        ((32, 64), 0.22, None),
        # one channel alone, n = 2 x 160 x 160: an honest SSDlite target's BatchNorm
        # failed by slice_gain 1.32e-5 against 1e-5
        ((160, 160), 0.9, 2),
    ],
)
def test_a_normalization_may_share_its_statistics_summation_error_across_a_slice(size, share, only):
    """A BatchNorm whose statistics over n values summed in another order (a gain of
    `share` sqrt(n) fp32 roundoffs, in every channel or in channel `only`) passes as a
    normalization's output (`statistics`), and fails as any other kernel's; a 0.03% gain
    fails either way."""
    channels, n = 4, 2 * size[0] * size[1]
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(2, channels, *size, generator=gen, dtype=torch.float64)
    reference = g.float()
    honest = 1 + share * math.sqrt(n) * UNIT_FP32
    for gain, statistics, passes in (
        (honest, True, True),
        (honest, False, False),
        (1.0003, True, False),
    ):
        per_channel = torch.ones((1, channels, 1, 1), dtype=torch.float64)
        per_channel[0, slice(None) if only is None else only] = gain
        judged = judge(
            (g * per_channel).float(),
            reference,
            g,
            Tolerance(),
            strict_dtype=True,
            local=True,
            row=row(),
            accuracy=2.0,
            statistics=statistics,
        )
        assert judged.passed == passes, (gain, statistics, explain(judged))


def test_the_sampling_spread_of_few_elements_is_wide_and_of_many_near_one():
    assert sampling_spread(8) == pytest.approx(3.47, abs=0.01)
    assert 1.0 < sampling_spread(100_000) < 1.02
    assert sampling_spread(1) == sampling_spread(0.5) == 4.0  # capped


def test_a_complex_tensor_replayed_is_judged_on_its_imaginary_part_too():
    """A spectral weight's gradient (complex) re-run alone on each side's inputs: an
    imaginary part 10% off fails (cast to float64, it was dropped, and passed)."""
    exact = [torch.complex(golden(64, seed=s), golden(64, seed=s + 10)) for s in (1, 2)]
    reference = exact[0].to(torch.complex64)
    tol = Tolerance()
    for imaginary, passes in ((1.0, True), (1.1, False)):
        target = torch.complex(exact[1].real, exact[1].imag * imaginary).to(torch.complex64)
        row = Row("spectral", 0, "param_grad", "weight", "", [], isolated=True)
        judged = judge_on_replays(
            target, reference, exact[1], exact[0], tol, strict_dtype=True, row=row, accuracy=1.0
        )
        assert judged.passed == passes, (imaginary, judged.failed, judged.message)
