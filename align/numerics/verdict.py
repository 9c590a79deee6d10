"""The verdict: a target tensor is judged by its error against the float64 golden,
relative to the reference device's own error at the same precision.

    fail if metric(target, golden) > k * metric(reference, golden) + floor(dtype)

for each metric of `align.numerics.metrics` (k squared for cos_err, which is quadratic in the
error; for max_rel, the noisiest, 2k on isolated modules and 4k on propagated errors).
Floors depend on the reference tensor's dtype, so exact reference results (ReLU,
pooling, copies) still allow rounding-level noise (`precision.ERROR_FLOOR`). The
element-level and signed bias metrics (share, mean_err, scale_err) are judged only on
isolated modules, where errors are local rounding noise (propagated errors are correlated
across elements, which makes them flaky); there a bias must exceed 12 standard errors of
the mean of that noise and 5% of the reference's error.

The reference's error is one draw of its rounding noise; `judge_robustly` judges a
failing tensor again against the largest error of the reference and its honest draws
(align.numerics.jitter). On propagated tensors k rises with how ill-conditioned the reference's
error says the tensor is (`_k`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from align.errors import AlignError
from align.numerics import metrics
from align.numerics.jitter import GRAY_ZONE
from align.numerics.metrics import SIGNED
from align.numerics.names import call_label
from align.numerics.precision import (
    STATISTIC_ORDER,
    UNIT_FP32,
    Policy,
    error_floor,
    held_dtype,
    kernel_bias,
    round_to,
    unit_roundoff,
)

SHARE_FLOOR = 1e-2  # a hundredth of the elements may exceed tau without a reason
SHARE_COUNT = 4  # ... and at least this many, for small tensors (BN parameters)
BIAS_SIGMAS = 12.0
# A slice's gain over a few effective elements: its residual cannot tell chance from a
# gain (measured: mobilenetv4_conv_small under amp-bf16, a BatchNorm channel over 2x4x4
# values of which four dominate, all four one ulp low on an honest one-ulp target, 13
# residual standard errors). So a slice may also show what its effective elements, each
# honestly up to one ulp off and uniformly so, add up to within PRIOR_SIGMAS (that
# uniform spread overstates honest kernels' several times: measured quiet on the 48 honest
# targets of bench/verdict_catalogue.py's default and 24 of 8 more timm models under
# amp-bf16, and with half the reference's gain on 256 of 16 models, eight kinds).
PRIOR_SIGMAS = 3.0
# A slice whose gain fewer than this many effective elements carry is its largest element,
# judged as one (max_rel, share) and in the whole tensor's gain: a gain ratio of two single
# samples of a sum that cancels is heavy-tailed (a ratio of normals), so across hundreds of
# slices honest ones pass any fixed k (measured: depthwise 5x5 weight gradients over 1x1
# maps at 32 px, one effective element per channel, batch 8, efficientnet_b0 and
# mobilenetv3_small_050 in fp32: honest targets 9-12x the reference's error there, in 6 of
# 6 runs).
ONE_ELEMENT = 2.0
# A systematic error is only called one when it is a visible part of the error: honest
# kernels' summation orders leave biases of up to ~5% of the reference's own error
# (measured: RetinaNet's cls_logits weight gradient under amp-bf16, 1.6M elements, where
# the independent-noise bound is 20x smaller); a gain fault hidden in noise sigma is still
# seen from 0.05 sigma.
BIAS_FRACTION = 0.05
# scale_err's weighting effect, sqrt(n / effective count), for normal values: E[g^4] / E[g^2]^2 = 3
NORMAL_WEIGHTING = math.sqrt(3)
# Elements of an isolated reduced-precision tensor further from the golden than the
# reference's own element by more than EXCESS_ULPS of their value (an honest kernel's
# output is one rounding of nearly the sum the reference formed: within 1.5 ulp of the
# reference's, 4 ulp for a transcendental one) plus one at the tensor's RMS (what another
# fp32 summation order leaves): a share of them beyond SHARE_FLOOR is a wrong kernel whose
# elements stray where bf16's shared rounding of the weights hides them in the reference's
# own error (measured: a 3x3 convolution padding with 5% of RMS, 1.2% of error on top of
# the reference's 1.0%, under amp-bf16 in resnet26d and mobilenetv3_large_100). A target
# more accurate than the reference (an fp16 kernel under bf16 autocast) is never further.
EXCESS_ULPS = 4.0
REDUCED = (torch.bfloat16, torch.float16)
# A replay (an isolated call re-run from each side's own inputs) has no draws: its limit
# rests on the reference's error alone, measured from the tensor's few effective elements.
# Two such measurements of one noise differ by the sampling spread of an rms, sqrt of
# Fisher's F quantile at REPLAY_QUANTILE (3.5x over 8 elements, 1.1x over 1000), by which k
# widens, up to REPLAY_SPREAD_MAX (measured: an honest one-ulp target's conv bias gradient
# over 8 channels under amp-bf16, 3.1x the reference's rel_rmse). A dropped gradient or a
# 1% gain over 8 elements still fails.
# A propagated tensor whose honest errors sit in a few elements is as small a sample,
# whatever its size (`error_spread`; measured: an honest one-ulp AdamW script whose
# unrecorded step 0 moved zero-initialized BatchNorm weights by lr * g / (|g| + eps),
# steep where |g| ~ eps: 256 weights, the reference's and two draws' errors over 1.1 to
# 2.3 effective elements, a one-ulp target's one element at 4.8x the largest).
REPLAY_QUANTILE = 1e-3
REPLAY_SPREAD_MAX = 4.0
CANCELLING = 0.05  # an isolated reference's rel_rmse from which k rises (`_k`)
NOISE_DOMINATED = 0.5  # reference rel_rmse above this: golden ~ 0, both sides are roundoff
# A propagated tensor the reference misses by half its size or more (noise-dominated)
# carries no signal at this precision: its exact value cancels below the rounding of its
# terms (measured:
# rexnet_100's SE BatchNorm over 2x1x1 values under amp-bf16, input gradient 4.2x off on
# the reference, 30x on an honest channels_last target; ghostnet_050's at 32 px, ~100%
# off on the reference, 34x its size on channels_last). It is reported, not judged; a
# fault there still shows upstream and downstream, and in isolation.
NO_SIGNAL = NOISE_DOMINATED
OVERFLOWED_MESSAGE = "no signal at this precision (an honest draw of the reference overflowed)"
# A propagated tensor whose honest runs (the reference and at least SPREAD_DRAWS draws)
# miss it by amounts this far apart has an error no handful of runs can bound: one more
# honest device may miss it by anything (measured: mobilenetv3_large_100 at 32 px, fp32,
# the output of a BatchNorm over 2x1x1 values whose sign a rounding decides: 24 honest
# draws spanned 6.7e-10 to 0.073 in cos_err, and a one-ulp target's 0.071 failed 3 of 8
# checks). Light-tailed honest errors (every tensor of the zoo) stay within a few times
# each other. Reported, not judged; a fault there shows upstream, and in align.check's
# isolation, where the module alone is fed the reference's inputs.
HEAVY_TAIL_SPREAD = 30.0
SPREAD_DRAWS = 6  # fewer draws (a dump's one or two) say too little about a tail
SPREAD_MESSAGE = (
    f"no signal at this precision (honest runs miss it by amounts {HEAVY_TAIL_SPREAD:g}x "
    "or more apart)"
)
# what a heavy tail of honest errors may excuse: not NaN/Inf, shapes, dtypes
SPREAD_METRICS = frozenset({"rel_rmse", "cos_err", "max_rel"})
NO_SIGNAL_MESSAGE = "no signal at this precision (the reference misses it by half its size or more)"
# An optimizer's state and its parameter after a step whose gradient carried no signal:
# honest runs' noise there varies by orders, and the state sums it with what signal it had
# (measured: ghostnet_050 under AdamW with clipping, fp32, a BatchNorm weight's gradient
# 1.67x off on the reference and 35.6x on an honest one-ulp target; its exp_avg then 0.28
# and 4.7 off). Reported, not judged, in that step and every recorded step after it.
NOISY_GRADIENT_MESSAGE = "no signal at this precision (it took a gradient that carries none)"
# The same, element by element: an adaptive optimizer (Adam) scales each element's update
# by that element's own gradient history, so an element whose gradient an honest run
# misses by half its size or more moves by up to the learning rate, whatever the sign
# (measured: mobilenetv3_small_050 under AdamW, fp32, an SE conv weight whose elements
# took gradients of 1e-8 at step 2 beside 2e-3 for the rest, after zeros before: one
# element's sign flipped on an honest half-ulp target, 12x the reference's error in the
# whole weight after the step, 0.5x one draw's). Such a state is judged on its other
# elements, in that step and every recorded step after it.
NOISY_ELEMENTS_MESSAGE = "judged without the elements that took a gradient carrying no signal"
# Unscaled fp16 gradients whose reference comes within the check's headroom of float16's
# largest value: an honest device overflows there, and its Inf then runs through every
# gradient after it (measured: efficientnet_b0 at 32 px, amp-fp16, an honest
# channels_last target's gradients Inf from blocks.5.1 on at loss scale 1).
OVERFLOW_HEADROOM = 16.0  # scaled gradients stay this far below the dtype's largest value
HEADROOM_MESSAGE = (
    "no signal at this precision (unscaled gradients near float16's largest value: the "
    f"reference's within {OVERFLOW_HEADROOM:g}x, or an honest draw of it overflowed; an "
    "honest device may)"
)


def tolerance_problem(value: Any) -> str | None:
    """Why `value` cannot be a tolerance (k or floor), or None: a NaN, an infinite or a
    non-positive k or floor would let every target pass (or none), so none is ever used."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and math.isfinite(value) and value > 0:
        return None
    return f"must be a finite number > 0 (a non-negative number, not 0, NaN or inf), got {value!r}"


@dataclass(frozen=True)
class Tolerance:
    """How much worse than the reference the target may be: k times, plus floor x dtype floor."""

    k: float = 2.0
    floor: float = 1.0

    def __post_init__(self) -> None:
        """Refuse a k or floor that is not a finite positive number: NaN or inf would pass
        every target."""
        for key in ("k", "floor"):
            if problem := tolerance_problem(getattr(self, key)):
                raise AlignError(f"tolerance {key} {problem}")


def as_tolerance(tolerance: Tolerance | dict | None, policy: Policy) -> Tolerance:
    """A Tolerance from a Tolerance, a dict of k / floor (missing keys: the precision's
    defaults) or None (the defaults)."""
    if isinstance(tolerance, Tolerance):
        return tolerance
    unknown = sorted(set(tolerance or {}) - {"k", "floor"})
    if unknown:
        raise AlignError(f"unknown tolerance key(s) {', '.join(map(str, unknown))}: known k, floor")
    return Tolerance(**{"k": policy.default_k, **(tolerance or {})})


@dataclass(frozen=True)
class Divergence:
    """One failing tensor: which module, phase and tensor, which metric, value and limit."""

    module: str
    phase: str  # "forward", "backward", "param_grad", "train"
    metric: str
    value: float
    limit: float
    call: int = 0
    tensor: str = ""
    reference: float | None = None
    isolated: bool = False
    message: str = ""

    def __str__(self) -> str:
        where = call_label(self.module, self.call)
        ref = "" if self.reference is None else f" (reference {self.reference:.3g})"
        text = (
            f"{where} {self.phase} {self.tensor}: {self.metric} {self.value:.3g} "
            f"> limit {self.limit:.3g}{ref}"
        )
        return f"{text}; {self.message}" if self.message else text


@dataclass
class Row:
    """The judgement of one tensor: target and reference metrics and their limits."""

    module: str
    call: int
    phase: str
    tensor: str
    dtype: str
    shape: list[int]
    metrics: dict[str, float] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    message: str = ""
    isolated: bool = False
    needed_k: float = 0.0  # the smallest k this tensor would pass with (calibration)

    @property
    def passed(self) -> bool:
        return not self.failed

    def ratio(self, metric: str) -> float:
        value, limit = self.metrics.get(metric, 0.0), self.limits.get(metric, math.inf)
        if limit > 0:
            return abs(value) / limit
        return math.inf if value else 0.0

    def worst(self) -> str:
        """The metric furthest beyond (or closest to) its limit; failed ones first."""
        pool = self.failed or [m for m in self.metrics if m in self.limits]
        return max(pool, key=self.ratio) if pool else "rel_rmse"

    def divergence(self) -> Divergence:
        metric = self.worst()
        return Divergence(
            module=self.module,
            phase=self.phase,
            metric=metric,
            value=self.metrics.get(metric, math.nan),
            limit=self.limits.get(metric, math.nan),
            call=self.call,
            tensor=self.tensor,
            reference=self.reference.get(metric),
            isolated=self.isolated,
            message=self.message,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        return out


def _k(k: float, reference_rel: float, unit: float, local: bool) -> float:
    """k, raised where the reference's error says the tensor is ill-conditioned.

    Where the exact result is ~0 (a gradient that cancels), both errors are pure roundoff
    of different summation orders: allow twice the usual spread. A propagated error grows
    towards that regime: the more the reference's error exceeds the dtype floor, the more
    it is an amplified sum of a few upstream roundings, and the more two honest devices'
    ratio varies (measured: DenseNet-121's last BatchNorm over 2x2x2 values, fp32
    gradients with 2% error, an honest native-kernel target at 2.8x the reference). So
    for whole-network tensors k rises log-linearly from k at one unit roundoff `unit` of
    the dtype (a single rounding: nothing amplified) to 2k at NOISE_DOMINATED (measured:
    resnet18d's `layer1.1.bn2` bias gradient, a cancelling per-channel sum 240 roundoffs
    off, 1.45x the fp32 floor, honest channels_last at 2.3x the reference). An isolated
    module's error is one kernel's roundings, not an amplified sum: k holds until the
    reference misses by CANCELLING of the tensor's size, where its exact value is itself
    mostly cancelled, and rises to 2k at NOISE_DOMINATED (measured: starnet_s050's
    depthwise conv bias gradient before a train-mode BatchNorm, exactly 0 in exact
    arithmetic, the reference 0.48 off, honest channels_last 1.03).
    """
    if reference_rel > NOISE_DOMINATED:
        return 2 * k
    start = CANCELLING if local else unit
    if reference_rel <= start or start <= 0:
        return k
    return k * 2 ** (math.log(reference_rel / start) / math.log(NOISE_DOMINATED / start))


def _multiplier(metric: str, k: float, local: bool = True) -> float:
    """How the reference's error is scaled into the limit: k, and for the noisiest,
    max_rel, 2k on isolated modules and 4k on propagated errors."""
    return (2 if local else 4) * k if metric == "max_rel" else k


def _limit(metric: str, k: float, reference: float, floor: float, local: bool) -> float:
    """k times the reference's error plus the floor. cos_err is composed on its square
    root, the rel_rmse it stands for (cos_err ~ rel^2 / 2 for noise): k * rel + floor
    there, so that neither metric is stricter than the other where k * rel ~ floor."""
    if metric == "cos_err":
        return (k * math.sqrt(2 * reference) + math.sqrt(2 * floor)) ** 2 / 2
    return _multiplier(metric, k, local) * reference + floor


def _needed_k(metric: str, value: float, reference: float, floor: float, local: bool) -> float:
    """The smallest k under which `value` would still pass `_limit` (calibration)."""
    if metric == "cos_err":
        excess, reference = math.sqrt(2 * value) - math.sqrt(2 * floor), math.sqrt(2 * reference)
    else:
        excess = value - floor
    if excess <= 0:
        return 0.0
    if reference == 0:
        return math.inf
    return excess / reference / _multiplier(metric, 1.0, local)


def judge(
    target: torch.Tensor,
    reference: torch.Tensor,
    golden: torch.Tensor,
    tol: Tolerance,
    *,
    strict_dtype: bool,
    local: bool,
    row: Row,
    draws: Sequence[torch.Tensor] = (),
    accuracy: float = 1.0,
    paired: bool = True,
    statistics: float = 0.0,
) -> Row:
    """Fill `row` with the metrics of target and reference against golden, and the verdict.

    `draws` are honest draws of the reference (align.numerics.jitter); the reference's error on
    each metric is then the largest of the reference's and the draws'. `accuracy` scales
    the dtype floor by what the kernels that made the tensor may honestly differ by
    (`precision.kernel_accuracy`: 4 where transcendental functions ran). `paired`: target
    and reference computed from the same inputs (an isolated module fed the reference's),
    so each element of the target may stray from the reference's by roundings only
    (`EXCESS_ULPS`); not so for replays of each side's own inputs. `statistics`: the
    kernels normalized by statistics of slices (`precision.shares_statistics`), whose
    summation order may bias a slice (`STATISTIC_ORDER`), by rounding of sums of that
    many times the tensor's RMS (align.judge.isolation.statistics_span; 0: none ran). NaN/Inf on the
    target where the others are finite fail `nonfinite`, as does a tensor with no element
    finite on every side; callers refuse NaN/Inf in the reference or golden first
    (`require_finite`, in `judge_robustly`).
    """
    target, reference, golden = (metrics.judged_form(t) for t in (target, reference, golden))
    draws = [metrics.judged_form(t) for t in draws]
    row.dtype, row.shape = str(reference.dtype).replace("torch.", ""), list(reference.shape)
    if tuple(target.shape) != tuple(reference.shape) or target.numel() != golden.numel():
        row.failed.append("shape")
        row.message = (
            f"shape {tuple(target.shape)} on the target, {tuple(reference.shape)} on the reference"
        )
        return row
    if strict_dtype and target.dtype != reference.dtype:
        row.failed.append("dtype")
        row.metrics["dtype"], row.limits["dtype"] = 1.0, 0.0
        row.message = f"dtype {target.dtype} on the target, {reference.dtype} on the reference"
    # the precision its values hold (a float32 gradient of a bf16 kernel's, an fp16
    # gradient unscaled): its floors and roundings are that dtype's
    computed = _held(reference, target, golden, strict_dtype, row.phase)
    floor = error_floor(computed) * tol.floor * accuracy
    t, g = metrics.flat(target), metrics.as_f64(golden)
    honest = [metrics.flat(h) for h in (reference, *draws) if h.shape == reference.shape]
    against = metrics.Against(g)
    parts = [against.partial(x) for x in (t, *honest)] if math.isfinite(against.gg) else []
    if not parts or not all(math.isfinite(rms) for _, _, rms in parts):  # NaN/Inf: mask
        # the reference's and golden's shared infinities (a -inf mask) the target must match
        designed = metrics.shared_infinities(honest[0], g)
        unmatched = int((designed & (t != honest[0])).sum())
        bad = metrics.nonfinite(t, honest[0], g)
        if bad or unmatched:
            row.failed.append("nonfinite")
            row.metrics["nonfinite"], row.limits["nonfinite"] = float(bad + unmatched), 0.0
            row.message = f"{bad} NaN/Inf on the target where the reference is finite" + (
                f", {unmatched} elements not the infinity reference and golden hold"
                if unmatched
                else ""
            )
        keep = torch.isfinite(t) & torch.isfinite(g)
        for h in honest:
            keep &= torch.isfinite(h)
        if not bad and not unmatched and not bool(keep.any()):
            row.failed.append("nonfinite")  # nothing left to judge is never a pass
            row.metrics["nonfinite"], row.limits["nonfinite"] = float(t.numel()), 0.0
            row.message = "no element is finite on target, reference and golden alike"
        against = metrics.Against(g[keep])
        parts = [against.partial(x[keep]) for x in (t, *honest)]
    (mt, abs_t, _), judged = parts[0], parts[1:]
    # per-slice gains: isolated rows with every element finite and enough of them
    clean = local and abs_t.numel() == t.numel() and t.numel() >= 4 * metrics.MIN_SLICE
    scale = math.sqrt(against.gg / max(against.g.numel(), 1))
    rms_r = max(rms for _, _, rms in judged)
    # per element: k times the reference's spread plus rounding that scales with |g|
    tau = against.abs_g.mul(floor).add_(floor * scale + 4 * tol.k * rms_r)
    mt["share"] = against.share(abs_t, tau)
    for found, abs_h, _ in judged:
        found["share"] = against.share(abs_h, tau)
    mr = _envelope([found for found, _, _ in judged])
    paired = paired and clean and reference.dtype in REDUCED
    if paired:  # each element against the reference's own (`EXCESS_ULPS`)
        excess = (honest[0] - g).abs_().neg_().add_(abs_t)  # one tensor: large ones abound
        beyond = excess.sub_(floor * scale).div_(floor * EXCESS_ULPS)  # in units of |g|
        mt["excess_share"], mr["excess_share"] = against.share(beyond, against.abs_g), 0.0
    # Standard error of a mean of n rounding errors, times BIAS_SIGMAS: rounding errors of
    # one tensor are correlated (shared weights, shared inputs), so n overstates the
    # independent draws; 12 sigmas measured quiet on honest kernel differences. The noise
    # is the target's error less its systematic part (gain and offset): a gain fault must
    # not widen its own yardstick (a 1% gain on 120 bf16 elements was hidden by it).
    # (the residual variance with its two fitted parameters' degrees of freedom back)
    # Elements whose exact values share one rounding count once (metrics.design_effects;
    # measured: resnet26d's BatchNorm over 2x1x1 values under amp-bf16, outputs ~ +-1,
    # biased 0.14% by an honest half-ulp target, 39 independent standard errors), up to
    # the bias one shared rounding can leave, a unit roundoff (rexnet_100's SE BatchNorm
    # over 2x1x1 values 1% high, one bf16 ulp at 1.0, is still a fault), or the whole
    # documented accuracy of a transcendental kernel (precision.KERNEL_BIAS, as for a slice).
    n = max(abs_t.numel(), 1)
    systematic = mt["scale_err"] ** 2 + mt["mean_err"] ** 2
    residual = max(mt["rel_rmse"] ** 2 - systematic, 0.01 * mt["rel_rmse"] ** 2)
    residual = math.sqrt(residual * n / (n - 2)) if n > 2 else mt["rel_rmse"]
    sigma = dict.fromkeys(SIGNED, residual / math.sqrt(n))
    # scale_err weighs an error by g, and rounding errors grow with |g|: its standard error
    # is wider by its weights' effect, sqrt(n / effective count), sqrt(3) for about normal
    # values, on which BIAS_SIGMAS was measured quiet; more concentrated values widen it by
    # the excess (efficientnet_b0's SE activation over 2x10x1x1 values at 16 px, three of
    # them 4.4 to 5.3 and the rest under 1.7: 2.3)
    counts = metrics.effective_counts(against.g)
    if counts[1] > 0:  # (no element left to judge: nothing to widen)
        sigma["scale_err"] *= max(1.0, math.sqrt(n / counts[1]) / NORMAL_WEIGHTING)
    if clean:  # elements that share one rounding are one draw (metrics.design_effects),
        # and one rounding, shared, biases them by one unit roundoff at most
        effects = metrics.design_effects_of(g, computed)
        shared = unit_roundoff(computed) * kernel_bias(accuracy) / BIAS_SIGMAS
        sigma = {
            m: max(sigma[m], min(sigma[m] * effect, shared)) for m, effect in zip(SIGNED, effects)
        }
    # the biases honest kernels leave are a part of the reference's own error (the draws'
    # jitter is unbiased and sized for other devices: it says nothing about biases)
    own = judged[0][0]["rel_rmse"]
    floors = {"rel_rmse": floor, "cos_err": floor * floor / 2, "max_rel": 2 * floor}
    # the gain a normalization's statistics over n values each (a channel's: numel /
    # channels, or fewer) may honestly share, summed in another order (STATISTIC_ORDER)
    statistic = 0.0
    if local and statistics:
        n_stat = t.numel() / max(reference.shape[1] if reference.dim() > 1 else 1, 1)
        statistic = STATISTIC_ORDER * math.sqrt(n_stat) * UNIT_FP32 * statistics
    if local:  # element-level and bias metrics: only where errors are local rounding noise
        floors["share"] = max(SHARE_FLOOR, SHARE_COUNT / max(abs_t.numel(), 1))
        if paired:
            floors["excess_share"] = floors["share"]
        floors.update(
            {m: max(BIAS_SIGMAS * sigma[m], BIAS_FRACTION * own) + 2 * UNIT_FP32 for m in SIGNED}
        )
        # Measured from fewer effective elements than a slice needs, a bias is a rounding
        # of a few values: one ulp of them is allowed (an honest one-ulp target's scale_err
        # on that SE activation was -0.73%: its three large values all rounded down, 1 in 8)
        for m, count in zip(SIGNED, counts):
            if count < metrics.MIN_SLICE:
                floors[m] += 2 * unit_roundoff(computed) * kernel_bias(accuracy)
        for m in SIGNED:
            floors[m] += statistic
    ramp = _k(1.0, mr["rel_rmse"], unit_roundoff(computed), local)
    if not local and not row.isolated:
        ramp *= error_spread([abs_h for _, abs_h, _ in judged])
    k = tol.k * ramp
    # A reference error that happens to be a pure gain has cos_err ~ 0: use its rel_rmse too.
    mr_cos = max(mr["cos_err"], mr["rel_rmse"] ** 2 / 2)
    limits = {
        m: _limit(m, k, mr_cos if m == "cos_err" else abs(mr[m]), f, local)
        for m, f in floors.items()
    }
    # one rounding at the precision the tensor was computed at (the dtype whose values it
    # holds, or twice the reference's own rel_rmse), shared by a slice; and one ulp of it
    # per element, the reference's rounding and the target kernel's accuracy together
    shared = max(error_floor(computed) * tol.floor, 2 * own) * kernel_bias(accuracy)
    ulp = 2 * max(floor, own)
    worst = None
    if local and abs_t.numel() == t.numel() and t.numel() >= metrics.MIN_SLICE:
        cells = functools.cache(lambda: metrics.rounding_cells(g, computed))
        worst = _worst_slice(reference.shape, t, honest, g, cells, k, shared, ulp, statistic)
    if worst is not None:  # local rows only
        mt["slice_gain"], mr["slice_gain"], limits["slice_gain"], slice_note, slice_k = worst
    row.metrics.update(mt)
    row.reference.update(mr)
    row.limits.update(limits)
    if not local and mr["rel_rmse"] >= NO_SIGNAL and math.isfinite(mt["rel_rmse"]):
        # noise all through, and so is the target's overflow of it (an fp16 gradient
        # through a BatchNorm over two values): where it reaches a signal, that fails
        row.message = NO_SIGNAL_MESSAGE
        row.failed = [m for m in row.failed if m != "nonfinite"]
    else:
        row.failed += [m for m, limit in limits.items() if abs(mt[m]) > limit]
    if "slice_gain" in row.failed and not row.message:
        row.message = slice_note
    if "excess_share" in row.failed and not row.message:
        row.message = (
            f"{mt['excess_share']:.1%} of the elements are further from the golden than the "
            f"reference's by more than {EXCESS_ULPS:g} ulp of their value and one at the "
            f"tensor's RMS (limit: {floors['excess_share']:.1%}; an honest kernel's elements "
            "are within one or two roundings of the reference's)"
        )
    biased = [m for m in SIGNED if m in row.failed]
    if biased and not row.message:  # the statistics behind a systematic error, stated
        row.message = "; ".join(
            f"{m} {mt[m]:.3g} is {abs(mt[m]) / sigma[m]:.0f} standard errors of the residual "
            f"noise over {n} elements (limit: {BIAS_SIGMAS:.0f}, and "
            f"{BIAS_FRACTION:.0%} of the reference's error)"
            for m in biased
        )
    linear = max(
        _needed_k(m, abs(mt[m]), mr_cos if m == "cos_err" else abs(mr[m]), f, local)
        for m, f in floors.items()
        if m not in ("share", "excess_share")  # no k lets a straying element pass
    )
    row.needed_k = linear / ramp
    if local:
        allowed = int(floors["share"] * abs_t.numel())
        row.needed_k = max(row.needed_k, _share_k(abs_t, against, scale, floor, rms_r, allowed))
    if worst is not None:
        row.needed_k = max(row.needed_k, slice_k)
    return row


def _worst_slice(
    shape: torch.Size,
    t: torch.Tensor,
    honest: Sequence[torch.Tensor],
    g: torch.Tensor,
    cells: Callable[[], torch.Tensor],
    k: float,
    shared: float,
    per_element: float,
    statistic: float = 0.0,
) -> tuple[float, float, float, str, float] | None:
    """The slice (along any dim with slices of MIN_SLICE elements or more, or the whole
    tensor) where the target departs furthest from the reference, relative to what an
    honest device may. The whole tensor is one more slice: a tensor too small to slice
    (a linear layer's 10x10 weight gradient) or a gain that every slice shares is judged
    paired too, where the unpaired scale_err measures it against honest draws whose
    nudged operands may leave a larger gain than the device's own rounding (measured: a
    10x10 weight gradient under amp-bf16, 1% off, within the draws' 0.42% times k).

    The gain is measured on the target's difference from the reference (paired: the
    roundings both share, of their common inputs and weights, cancel). It may reach k
    times the reference's own gain there (the reference kernel's bias, which another
    device does not share but has its own of: measured, efficientnet_b4's depthwise
    weight gradients under amp-bf16, 25-element slices 2.2x the reference's bias off on
    an honest target), or as far as an honest draw's own gain there exceeds one shared
    rounding, plus the reference's own gain (the target's gain is measured from the
    reference, which departs from the golden by its own; what a draw's nudges alone may
    leave is one shared rounding; beyond that, the slice's conditioning
    amplified them, as it amplifies an honest kernel's own roundings: measured,
    rexnet_100's SE BatchNorm over 2x1x1 values at 32 px in fp32, an input gradient that
    cancels to eps-sized terms, its dominant element 5e-6 off on the fused reference,
    1.5e-4 on a draw, 7e-5 on an honest decomposed norm; under bf16 a draw's nudges are
    as large as the gains sought, and with one rounding taken off a 1% gain is still
    caught). Plus the largest of: BIAS_SIGMAS standard errors of the difference's
    residual; `shared`, the bias one rounding shared by the slice may honestly leave
    (precision.KERNEL_BIAS: a repeated value, an input every element multiplies, which a
    kernel computing in HF32 or bf16 rounds once); and PRIOR_SIGMAS of what the slice's
    effective elements, each up to `per_element` off, add up to
    (never more than `per_element`), the elements of one rounding cell counting once
    (`cells`, metrics.rounding_cells, worked out where a slice fails without them;
    measured: retinanet's classification conv under amp-bf16, a weight gradient whose
    grad_output holds six distinct values, 7371 elements of an input channel in 15 cells,
    one bf16 ulp off on ATen's native kernel, which sums the batch's partial gradients in
    bf16); and `statistic`, the gain a normalization's statistics, summed in another
    order, may leave every element of a channel (measured: an honest SSDlite target's
    BatchNorm over 51,200 values per channel at 160 px, 1.3e-5, 1.3x one shared rounding).
    Returns (the difference, the reference's gain, the limit on the difference, what to
    say, the k it needs) or None."""
    best, numel = None, t.numel()
    dims = [d for d, rows in enumerate(shape) if rows >= 2 and numel // rows >= metrics.MIN_SLICE]
    r, draws = honest[0], honest[1:]
    for dim in [*dims, None]:  # None: the whole tensor, one slice
        layout = tuple(shape) if dim is not None else (1, numel)
        rows = layout[dim or 0]
        slices = metrics.Slices(g, layout, dim or 0)
        ref = slices.gains(r - g)[0]
        # the target may depart from the golden as a draw does, and the reference by its own
        drawn = [slices.gains(h - g)[0].abs().sub_(shared).add_(ref.abs()) for h in draws]
        allowed = torch.stack([k * ref.abs(), *drawn]).amax(0)
        diff, se = slices.gains(t.double() - r.double())  # integers would wrap around
        concentration = roundings = slices.concentration()
        for counted in (False, True):  # cells only where elements alone fail (cells sort)
            chance = (PRIOR_SIGMAS * per_element / math.sqrt(3) * roundings).clamp(max=per_element)
            noise = (BIAS_SIGMAS * se).clamp(min=shared).maximum(chance) + statistic
            limit = allowed + noise
            if counted or bool((diff.abs() <= limit).all()):
                break
            roundings = slices.concentration(cells())
        ratio = diff.abs() / limit
        if dim is not None:  # a slice one element carries is that element (`ONE_ELEMENT`)
            ratio = ratio.masked_fill(concentration.pow(-2) < ONE_ELEMENT, 0.0)
        i = int(ratio.argmax())
        if best is None or float(ratio[i]) > best[0]:
            z = float(diff[i].abs() / se[i]) if float(se[i]) > 0 else math.inf
            note = (
                f"{'the whole tensor' if dim is None else f'slice {i} of dim {dim}'} "
                f"({numel // rows} elements, "
                f"{float(concentration[i]) ** -2:.0f} effective, "
                f"{float(roundings[i]) ** -2:.0f} independent roundings): gain "
                f"{float(ref[i] + diff[i]):.3g} against the reference's {float(ref[i]):.3g}, "
                f"{float(diff[i]):+.3g} apart, {z:.0f} standard errors of the difference's "
                f"residual (limit: {k:g}x the reference's gain, or an honest draw's beyond one "
                f"shared rounding and the reference's, plus the largest of "
                f"{BIAS_SIGMAS:.0f} standard errors, one shared rounding {shared:.3g}, and "
                f"chance over its independent roundings {float(chance[i]):.3g}"
                + (f"; plus its statistics' summation order {statistic:.3g})" if statistic else ")")
            )
            excess, ref_gain = float(diff[i].abs() - noise[i]), float(allowed[i]) / k
            needed = 0.0 if excess <= 0 else math.inf if not ref_gain else excess / ref_gain
            best = (float(ratio[i]), float(diff[i]), float(ref[i]), float(limit[i]), note, needed)
    return None if best is None else best[1:]


def _share_k(abs_t, against: metrics.Against, scale, floor, rms_r, allowed: int) -> float:
    """The k from which at most `allowed` target elements exceed tau(k), tau growing with k
    (an upper bound of share's needed k: it leaves out the reference's own share)."""
    if allowed >= abs_t.numel():
        return 0.0
    beyond = abs_t - (against.abs_g + scale) * floor
    worst = float(torch.topk(beyond, allowed + 1).values[-1])
    if worst <= 0:
        return 0.0
    return worst / (4 * rms_r) if rms_r > 0 else math.inf


def judge_robustly(
    target: torch.Tensor,
    reference: torch.Tensor,
    golden: torch.Tensor,
    tol: Tolerance,
    *,
    strict_dtype: bool,
    local: bool,
    row: Row,
    draws: Callable[[int], Sequence[torch.Tensor]],
    accuracy: float = 1.0,
    paired: bool = True,
    statistics: float = 0.0,
) -> Row:
    """`judge` against the reference alone, and where that fails, again against the
    reference and its honest draws (made only then: they cost a run each): `draws(0)` the
    first ones, then `draws(1)`, more of them: for an isolated tensor only while it fails
    by less than jitter.GRAY_ZONE times its limit (far beyond is a fault), for a
    whole-network one always, whose honest errors may be heavy-tailed: where they span
    HEAVY_TAIL_SPREAD or more it is one without signal (SPREAD_MESSAGE). Not so for a
    running statistic in isolation (`local` False, `row.isolated`): there every honest run
    sums the same inputs, and a reference all but exact beside draws whose nudges a
    cancelling sum amplifies is no heavy tail (measured: rexnet_100's SE BatchNorm over
    two values under amp-bf16, running variance 1e-5 off on the reference and 1.3e-3 on
    draws, excused whole while a momentum fault put it 21% off). NaN/Inf in the
    reference or the golden is an AlignError (`require_finite`); NaN/Inf in a draw of a
    whole-network tensor makes it one without signal (OVERFLOWED_MESSAGE), in an
    isolated one a draw left out."""
    target, reference, golden = (metrics.judged_form(t) for t in (target, reference, golden))
    made = draws
    draws = functools.cache(lambda round_: [metrics.judged_form(t) for t in made(round_)])
    require_finite(row, [("reference", reference), ("golden", golden)])
    kw = dict(
        strict_dtype=strict_dtype,
        local=local,
        accuracy=accuracy,
        paired=paired,
        statistics=statistics,
    )
    judged = judge(target, reference, golden, tol, row=row, **kw)
    used, finite = 0, []
    for round_ in (0, 1):
        # an isolated tensor far beyond its limit is a fault; a propagated one may be
        # honest and heavy-tailed (HEAVY_TAIL_SPREAD): it is judged on every draw
        if judged.passed or (round_ and local and judged.ratio(judged.worst()) > GRAY_ZONE):
            return judged
        honest = draws(round_)
        if len(honest) <= used:
            break  # no more draws to be had
        used = len(honest)
        finite = [h for h in honest if not _overflowed(h, reference, golden)]
        judged = Row(row.module, row.call, row.phase, row.tensor, "", [], isolated=row.isolated)
        judged = judge(target, reference, golden, tol, row=judged, draws=finite, **kw)
        if len(finite) < len(honest) and not local:
            # an honest draw overflowed here (fp16): honest devices reach the dtype's
            # largest value, so whatever the target holds, there is no signal to judge
            judged.failed, judged.message = [], OVERFLOWED_MESSAGE
            return judged
    if (
        not judged.passed
        and not local
        and not row.isolated  # alone on the reference's inputs, the draws bound it
        and set(judged.failed) <= SPREAD_METRICS
        and len(finite) >= SPREAD_DRAWS
    ):
        held = _held(reference, target, golden, strict_dtype, row.phase)
        floor = error_floor(held) * tol.floor * accuracy
        if spread(reference, golden, finite, floor) >= HEAVY_TAIL_SPREAD:
            judged.failed, judged.message = [], SPREAD_MESSAGE
    return judged


def judge_on_replays(
    target: torch.Tensor,
    reference: torch.Tensor,
    target_replay: torch.Tensor,
    reference_replay: torch.Tensor,
    tol: Tolerance,
    *,
    strict_dtype: bool,
    row: Row,
    accuracy: float,
    local: bool = True,
    honest: Callable[[], torch.Tensor | None] = lambda: None,
    statistics: float = 0.0,
) -> Row:
    """An isolated tensor judged from each side's own inputs: `target` against its exact
    (float64) replay, relative to the reference's error against its own replay, moved
    onto the target's elementwise and rounded to the reference's dtype (align.judge.replay,
    align.judge.step_isolation). A replay has no run to draw from: its draws are that error
    moved unrounded, and moved relatively (`_ratio`), and `honest()`, an honest kernel's
    result on the target's inputs (None without one); and k widens by the sampling spread
    of the reference's error (`sampling_spread`). `local`:
    False for a running statistic (align.judge.isolation says why); `statistics` as for
    `judge`."""
    target, reference, target_replay, reference_replay = (
        metrics.judged_form(t) for t in (target, reference, target_replay, reference_replay)
    )
    made = honest
    honest = lambda: None if (t := made()) is None else metrics.judged_form(t)  # noqa: E731
    error = reference.double() - reference_replay
    moved = target_replay + error
    count = metrics.effective_counts(metrics.as_f64(target_replay))[1]  # rel_rmse's weights: g^2
    # at the precision the reference's values carry: an fp32 weight gradient of a bf16
    # kernel is bf16 values, whose roundings its floors and shared roundings must know
    # (measured: an honest one-ulp AdamW script under amp-bf16, a 3x3 conv's weight gradient
    # over 2x2 maps, gains of -0.008% on the reference and -0.038% on the target, 14
    # fp32-sized standard errors)
    return judge_robustly(
        target,
        round_to(
            moved.to(reference.dtype),
            _held(reference, target, target_replay, strict_dtype, row.phase),
        ),
        target_replay,
        replace(tol, k=tol.k * sampling_spread(count)),
        strict_dtype=strict_dtype,
        local=local,
        row=row,
        draws=lambda _round: [
            moved,
            target_replay + error * _ratio(target_replay, reference_replay),
            *_same_shape(honest(), target),
        ],
        accuracy=accuracy,
        paired=False,  # each side's error is its own: their elements are independent
        statistics=statistics,
    )


def _held(
    reference: torch.Tensor,
    target: torch.Tensor,
    golden: torch.Tensor,
    strict_dtype: bool,
    phase: str,
) -> torch.dtype:
    """The dtype whose values both sides' float32 tensors hold (`held_dtype`), where the
    policy is not strict about dtypes (under fp32, the reference's own). A parameter
    gradient, float32 as its parameter is, may hold only the target's: a kernel that
    computed it from half-precision operands may round it to their dtype once (measured:
    the CPU's channels_last BatchNorm backward under bf16 autocast, its grad_output
    contiguous, returns bias gradients rounded to bf16 where the contiguous kernel's are
    exact sums). Where the golden's exact values fit that dtype too, the tensor is exact
    data (anchor coordinates, counts), not rounded to it: its own dtype."""
    if strict_dtype or reference.dtype != torch.float32 or target.dtype != torch.float32:
        return reference.dtype
    if phase == "param_grad":
        held = held_dtype(target)
    else:
        held = held_dtype(torch.cat([reference.flatten(), target.flatten()]))
    exact = metrics.as_f64(golden)
    if held != reference.dtype and torch.equal(exact.to(held).double(), exact):
        return reference.dtype
    return held


def _same_shape(t: torch.Tensor | None, like: torch.Tensor) -> list[torch.Tensor]:
    return [t] if t is not None and t.shape == like.shape and t.is_floating_point() else []


def _ratio(target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """target / reference elementwise, eased to 0 where the reference is under a tenth of
    its RMS: the reference's error moved onto the target's values relatively, for the
    honest draws of a replay. The error moved as it is (the stand-in) is right where the
    two sides computed nearly the same values; where they did not, a gain both sides share
    is lost in it (measured: an honest AdamW script under amp-bf16, whose step 0 flipped the
    sign of zero-initialized BatchNorm weights, drop-path inputs of the two sides at
    correlation 0.06, 1 / keep_prob rounded to bf16 +0.09% on each side, 0.002% moved), and
    so is one rounded away (the stand-in is rounded to the reference's dtype)."""
    ease = (0.1 * reference.square().mean().sqrt()).square()
    return target * reference / (reference.square() + ease).clamp_min(1e-300)


def sampling_spread(count: float) -> float:
    """How many times one rel_rmse of rounding noise over `count` effective elements may
    exceed another of the same noise, once in 1 / REPLAY_QUANTILE (capped)."""
    from scipy.special import fdtri  # (scipy's import is slow; few checks need it)

    count = max(count, 1.0)
    return min(math.sqrt(fdtri(count, count, 1 - REPLAY_QUANTILE)), REPLAY_SPREAD_MAX)


def error_spread(abs_errors: Sequence[torch.Tensor]) -> float:
    """`sampling_spread` of a propagated tensor's honest errors (|run - golden|, flat),
    over the most effective elements any of them is spread across: an error that a few
    elements carry is a small sample of a heavy-tailed one."""
    return sampling_spread(max(metrics.effective_counts(e)[1] for e in abs_errors))


def spread(
    reference: torch.Tensor, golden: torch.Tensor, draws: Sequence[torch.Tensor], floor: float
) -> float:
    """How many times the largest rel_rmse of the reference and its draws is the smallest
    (each at least `floor`): a few for honest errors that one number describes."""
    against = metrics.Against(metrics.as_f64(golden))
    errors = [
        max(against.partial(metrics.flat(h))[0]["rel_rmse"], floor) for h in (reference, *draws)
    ]
    return max(errors) / min(errors)


def _overflowed(draw: torch.Tensor, reference: torch.Tensor, golden: torch.Tensor) -> bool:
    """True when an honest draw holds NaN/Inf beyond the infinities reference and golden
    share (a -inf mask every run builds alike)."""
    x = metrics.flat(draw)
    if metrics.all_finite(x):
        return False
    return bool((~torch.isfinite(x) & ~metrics.shared_infinities(x, reference, golden)).any())


def require_finite(row: Row, sides: Sequence[tuple[str, torch.Tensor]]) -> None:
    """AlignError naming the tensor of `row` when a side the target is measured by (the
    golden, the reference, a draw) holds NaN/Inf: the limit is then undefined there, and
    masking those elements would let a verdict pass unearned. Infinities every side holds
    alike are built, not overflowed (a causal mask of -inf): the target must match them."""
    sides = [(who, metrics.judged_form(x)) for who, x in sides]
    designed = metrics.shared_infinities(*(x for _, x in sides))
    for who, x in sides:
        if bad := int((~torch.isfinite(metrics.flat(x)) & ~designed).sum()):
            scaled = (
                " (a gradient that overflowed under a loss scaler, whose step the scaler "
                "skips: compare a step it did not skip, or record with align.Recorder, which "
                "leaves a skipped step's overflowed gradients out)"
                if row.phase in ("backward", "param_grad")
                else ""
            )
            raise AlignError(
                f"the {who} holds {bad} NaN/Inf of {x.numel()} elements in "
                f"{call_label(row.module, row.call)} {row.phase} {row.tensor}: no verdict can be "
                f"earned against it; find why that run overflowed, or dump it again{scaled}"
            )


def carries_no_signal(row: Row) -> bool:
    """True for a row reported, not judged, for carrying no signal at its precision."""
    return row.message.startswith("no signal at this precision")


def _envelope(draws: list[dict[str, float]]) -> dict[str, float]:
    """Per metric, the value of largest magnitude over the honest draws (sign kept)."""
    return {m: max((d[m] for d in draws), key=abs) for m in draws[0]}
