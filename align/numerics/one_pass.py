"""Honest draws of a normalization whose statistics are summed in one pass.

A BatchNorm, LayerNorm or GroupNorm normalizes by the mean and variance of slices of its
input, and its backward subtracts two more sums per slice (of dy and of dy x_hat). How
accurately a device forms them is its own: the CPU's contiguous BatchNorm is all but
exact, its channels_last one sums each channel's mean in one chain, and Ascend's sums
x and x^2 per channel (aclnnBatchNormReduce: hicann/ops-nn norm/bn_training_reduce) and
takes the variance as E[x^2] - mean^2. Measured against float64 (BatchNorm2d over
8x16x32x32, one thread), the channels_last kernel's per-channel output offsets are 0.2,
1.9 and 27 sqrt(n) fp32 roundoffs at input mean / std 0.2, 6 and 60, its input gradient's
4: errors of long sums that grow with n, which a reference with exact statistics does not
have and nudging each rounding (align.numerics.jitter) does not make.

`OnePass` runs those ops with every such sum moved by `SUM_ERROR` sqrt(n) fp32 roundoffs
of its terms' RMS, with random signs per slice: the mean and E[x^2] forward (the
variance formed from them, as in one pass), mean(dy) and mean(dy x_hat) backward, and
what takes the same sums (a BatchNorm's running statistics, its weight and bias
gradients). Every honest draw moves them so (align.numerics.jitter); the isolations that
have no run to draw from run an honest kernel or a replay under `OnePass`
(align.judge.step_isolation, align.judge.replay). A reference may sum more accurately
than fp32, so its own error says nothing of a sum that cancels (an honest channels_last
ghostnet_050 at step 0, a running mean 0.1 of its batch mean: cos_err 4.6e-4 where the
reference's was 1.7e-16).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode

from align.numerics.precision import STATISTIC_ORDER, UNIT_FP32

# half the statistics allowance: a typical one-chain sum (1.5 of its standard deviations,
# u sqrt(n) / 3 of its terms' RMS each); statistics are summed in fp32 whatever the
# tensors' dtype. The worst order: a 64-lane sum (align.testing.one_pass_norms) errs 60-80x
# less at input mean / std 6 to 60
SUM_ERROR = STATISTIC_ORDER / 2


@dataclass
class _Slices:
    """How an op's statistics slice its input: `group(t)` views a tensor of the input's
    shape as (slices, `terms`), `ungroup` undoes it; `weight` is the affine weight
    broadcast to the input's shape (1 without one)."""

    terms: int
    group: Callable[[torch.Tensor], torch.Tensor]
    ungroup: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor | float


def _per_channel(x: torch.Tensor, weight: torch.Tensor | None) -> _Slices:
    """A BatchNorm's slices: each channel (dim 1) over every other dim."""
    channels, moved = x.shape[1], (x.shape[0], *x.shape[2:])
    return _Slices(
        x.numel() // channels,
        lambda t: t.transpose(0, 1).reshape(channels, -1),
        lambda g: g.reshape(channels, *moved).transpose(0, 1),
        _channel_weight(x, weight),
    )


def _channel_weight(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | float:
    """A per-channel affine weight broadcast to `x` (N, C, ...); 1 without one."""
    return 1.0 if weight is None else weight.view(1, x.shape[1], *[1] * (x.dim() - 2))


def _trailing(x: torch.Tensor, normalized: list[int], weight: torch.Tensor | None) -> _Slices:
    """A LayerNorm's slices: each row over its `normalized` trailing dims."""
    terms = int(math.prod(normalized))
    return _Slices(
        terms,
        lambda t: t.reshape(-1, terms),
        lambda g: g.reshape(x.shape),
        1.0 if weight is None else weight,
    )


def _grouped(x: torch.Tensor, groups: int, weight: torch.Tensor | None) -> _Slices:
    """A GroupNorm's slices: each sample's group of channels, over those and the rest."""
    count = x.shape[0] * groups
    return _Slices(
        x.numel() // count,
        lambda t: t.reshape(count, -1),
        lambda g: g.reshape(x.shape),
        _channel_weight(x, weight),
    )


class OnePass(TorchDispatchMode):
    """Moves the sums of normalization ops as a one-pass kernel may (module docstring);
    `seed` picks the signs. Ops it does not know run unchanged."""

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.moved(func, args, kwargs or {}, func(*args, **(kwargs or {})))

    def moved(self, func, args: tuple, kwargs: dict, out):
        """`out`, what `func` returned for `args`, with its sums moved where it is a
        normalization (align.numerics.jitter moves its draws' this way too)."""
        move = _MOVES.get(func.overloadpacket.__name__)
        if move is None:
            return out
        names = [a.name for a in func._schema.arguments]
        with no_dispatch():  # arithmetic of the draw, no op of the run: modes below skip it
            return move(self, {**dict(zip(names, args)), **kwargs}, out)

    def _signs(self, n: int, device: torch.device) -> torch.Tensor:
        signs = torch.randint(0, 2, (n,), generator=self.generator, dtype=torch.float64)
        return (signs * 2 - 1).to(device)

    def _moved(self, square_mean: torch.Tensor, n: int) -> torch.Tensor:
        """Per slice, a one-pass error of the mean of its `n` terms, from their mean square."""
        size = SUM_ERROR * math.sqrt(n) * UNIT_FP32
        return self._signs(len(square_mean), square_mean.device) * size * square_mean.sqrt()

    def forward(self, slices: _Slices, x: torch.Tensor, eps: float, out: tuple) -> tuple:
        """`out` (y, mean, 1/std) with the mean and E[x^2] of each slice moved; returns
        it and the moves of the mean and the variance. The statistics are the kernel's
        own (`out`); only the moves' sizes and the shift of y pass over x, in fp32 (the
        shift is formed without cancelling: (x - mean) d(1/std) - d_mean / std')."""
        y, mean_out, rstd_out = out
        work = _working(x)
        xs = slices.group(x.to(work))
        mean, rstd = mean_out.double().flatten(), rstd_out.double().flatten()
        variance = (rstd.pow(-2) - eps).clamp_min(0)
        n = slices.terms
        d_mean = self._moved(variance + mean.square(), n)
        d_square = self._moved(xs.square().square().mean(1).double(), n)
        # E[x^2] + d_square - (mean + d_mean)^2, as one pass forms the variance
        variance2 = (variance + d_square - 2 * mean * d_mean - d_mean.square()).clamp_min(0)
        rstd2 = (variance2 + eps).rsqrt()
        scale, offset = (rstd2 - rstd).to(work)[:, None], (d_mean * rstd2).to(work)[:, None]
        shift = slices.ungroup((xs - mean.to(work)[:, None]) * scale - offset)
        y = (y.to(work) + shift * _cast(slices.weight, work)).to(y.dtype)
        mean_out = (mean + d_mean).to(mean_out.dtype).reshape(mean_out.shape)
        rstd_out = rstd2.to(rstd_out.dtype).reshape(rstd_out.shape)
        return (y, mean_out, rstd_out), d_mean, variance2 - variance

    def backward(
        self,
        slices: _Slices,
        x: torch.Tensor,
        summed: torch.Tensor,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        grad_input: torch.Tensor | None,
        outer: torch.Tensor | float,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """`grad_input` = outer rstd (summed - mean(summed) - x_hat mean(summed x_hat)),
        per slice, with those two means moved; returns it and the moves."""
        work = _working(x)
        rstd = rstd.to(work).reshape(-1, 1)
        x_hat = (slices.group(x.to(work)) - mean.to(work).reshape(-1, 1)) * rstd
        terms = slices.group(summed.to(work))
        n = slices.terms
        d_sum = self._moved(terms.square().mean(1).double(), n)
        d_dot = self._moved((terms * x_hat).square().mean(1).double(), n)
        if grad_input is not None:
            shift = -rstd * (d_sum.to(work)[:, None] + x_hat * d_dot.to(work)[:, None])
            moved = grad_input.to(work) + slices.ungroup(shift) * _cast(outer, work)
            grad_input = moved.to(grad_input.dtype)
        return grad_input, d_sum, d_dot


def _working(x: torch.Tensor) -> torch.dtype:
    """The dtype a draw's arithmetic on `x` runs in: float64 for a golden, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _cast(weight: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor | float:
    return weight if isinstance(weight, float) else weight.to(dtype)


def _batch_norm(mode: OnePass, a: dict, out: tuple) -> tuple:
    """native_batch_norm, or cuDNN's and MIOpen's (the GPU's kernels: `epsilon`,
    `exponential_average_factor`, and cuDNN's reserve space as a fourth output)."""
    x = a["input"]
    if not a["training"] or x.numel() <= x.shape[1]:
        return out  # normalized by running statistics, or by one value per channel
    slices = _per_channel(x, a["weight"])
    moved, d_mean, d_variance = mode.forward(slices, x, _given(a, "eps", "epsilon"), out[:3])
    n = slices.terms
    momentum = _given(a, "momentum", "exponential_average_factor")
    for buffer, move in ((a["running_mean"], d_mean), (a["running_var"], d_variance * n / (n - 1))):
        if buffer is not None:
            buffer.add_((momentum * move).to(buffer.dtype))
    return (*moved, *out[3:])


def _batch_norm_backward(mode: OnePass, a: dict, out: tuple) -> tuple:
    """native_batch_norm_backward, or cuDNN's and MIOpen's (only ever in training; their
    `save_var` is the saved 1/std)."""
    x = a["input"]
    save_mean, save_invstd = a["save_mean"], _given(a, "save_invstd", "save_var")
    if not a.get("train", True) or save_mean is None or x.numel() <= x.shape[1]:
        return out
    slices = _per_channel(x, a["weight"])
    grad_input, grad_weight, grad_bias = out
    grad = _given(a, "grad_out", "grad_output")
    grad_input, d_sum, d_dot = mode.backward(
        slices, x, grad, save_mean, save_invstd, grad_input, slices.weight
    )
    n = slices.terms  # a BatchNorm's bias and weight gradients are the same sums, times n
    if grad_bias is not None:
        grad_bias = (grad_bias.double() + n * d_sum).to(grad_bias.dtype)
    if grad_weight is not None:
        grad_weight = (grad_weight.double() + n * d_dot).to(grad_weight.dtype)
    return grad_input, grad_weight, grad_bias


def _given(a: dict, name: str, alias: str):
    """Argument `name` of an op that may call it `alias` (cuDNN's and MIOpen's names)."""
    return a[name] if name in a else a[alias]


def _layer_norm(mode: OnePass, a: dict, out: tuple) -> tuple:
    slices = _trailing(a["input"], list(a["normalized_shape"]), a["weight"])
    return mode.forward(slices, a["input"], a["eps"], out)[0]


def _layer_norm_backward(mode: OnePass, a: dict, out: tuple) -> tuple:
    slices = _trailing(a["input"], list(a["normalized_shape"]), a["weight"])
    return _weighted_backward(mode, slices, a, out)


def _group_norm(mode: OnePass, a: dict, out: tuple) -> tuple:
    slices = _grouped(a["input"], a["group"], a["weight"])
    return mode.forward(slices, a["input"], a["eps"], out)[0]


def _group_norm_backward(mode: OnePass, a: dict, out: tuple) -> tuple:
    slices = _grouped(a["input"], a["group"], a["weight"])
    return _weighted_backward(mode, slices, a, out)


def _weighted_backward(mode: OnePass, slices: _Slices, a: dict, out: tuple) -> tuple:
    """A LayerNorm's or GroupNorm's backward: its sums are of dy times the weight (which
    varies within a slice); its weight and bias gradients sum across slices, elsewhere."""
    grad_input, grad_weight, grad_bias = out
    summed = a["grad_out"] * _cast(slices.weight, _working(a["input"]))
    grad_input = mode.backward(slices, a["input"], summed, a["mean"], a["rstd"], grad_input, 1.0)[0]
    return grad_input, grad_weight, grad_bias


_MOVES: dict[str, Callable[[OnePass, dict, tuple], tuple]] = {
    "native_batch_norm": _batch_norm,
    "_native_batch_norm_legit": _batch_norm,
    "native_batch_norm_backward": _batch_norm_backward,
    "cudnn_batch_norm": _batch_norm,
    "cudnn_batch_norm_backward": _batch_norm_backward,
    "miopen_batch_norm": _batch_norm,
    "miopen_batch_norm_backward": _batch_norm_backward,
    "native_layer_norm": _layer_norm,
    "native_layer_norm_backward": _layer_norm_backward,
    "native_group_norm": _group_norm,
    "native_group_norm_backward": _group_norm_backward,
}
