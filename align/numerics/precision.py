"""Precision policies: how a model and its inputs are cast and autocast on a device.

fp32, amp-fp16 / amp-bf16 (autocast; fp16 trains with dynamic loss scaling), o2-fp16
(apex-O2 style: half model with fp32 norm layers, fp32 master weights in training), and
the internal `fp64` used for golden runs. Aliases: O1 = amp-fp16, O2 = o2-fp16.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from align.numerics.emulate import to_tf32
from align.numerics.names import DEFAULT_K, canonical_precision
from align.numerics.trees import map_leaves

NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)

# Unit roundoff of each dtype: the scale of one rounding error, used for floors.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


@dataclass(frozen=True)
class Policy:
    """One precision policy. `default_k` is the error multiplier its verdict allows."""

    name: str
    autocast_dtype: torch.dtype | None = None
    model_dtype: torch.dtype | None = None  # cast parameters (norms stay fp32 for o2)
    # Fixed loss scale for forward/backward checks so fp16 gradients do not underflow.
    check_loss_scale: float = 1.0

    @property
    def default_k(self) -> float:
        """The error multiplier its verdict allows by default (align.numerics.names)."""
        return DEFAULT_K[self.name]

    @property
    def low_precision(self) -> torch.dtype:
        return self.autocast_dtype or self.model_dtype or torch.float32

    def prepare(self, model: nn.Module) -> nn.Module:
        """Cast `model` in place (callers pass a private copy)."""
        if self.model_dtype is None:
            return model
        # complex weights and buffers (an FNO's spectral weights, a frequency filter) kept
        # apart: Module.to(float64) casts them to float64, their imaginary parts dropped;
        # the golden's are complex128, other runs' as they were
        kept = [
            (slots, name, t.data)
            for module in model.modules()
            for slots in (module._parameters, module._buffers)
            for name, t in slots.items()
            if t is not None and t.is_complex()
        ]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Casting complex values to real")
            model.to(self.model_dtype)
        for slots, name, original in kept:
            double = self.model_dtype == torch.float64
            data = original.to(torch.complex128) if double else original
            if isinstance(slots[name], nn.Parameter):
                slots[name].data = data  # the same parameter, shared where it is
            else:
                slots[name] = data
        if self.name == "o2-fp16":
            for module in model.modules():
                if isinstance(module, NORMS):
                    module.float()
        return model

    def cast_inputs(self, inputs, device: torch.device):
        """Inputs on `device`; floating tensors cast to the model dtype where it is cast."""
        dtype = self.model_dtype

        def cast(x):
            if not isinstance(x, torch.Tensor):
                return x
            if dtype is not None and x.is_floating_point():
                return x.to(device=device, dtype=dtype, copy=True)
            return x.to(device=device, copy=True)

        return map_leaves(cast, inputs)

    def autocast(self, device: torch.device):
        """The autocast context for this policy on `device` (a no-op without autocast)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


POLICIES = {
    "fp32": Policy("fp32"),
    "amp-fp16": Policy(
        "amp-fp16",
        autocast_dtype=torch.float16,
        check_loss_scale=2.0**12,
    ),
    "amp-bf16": Policy("amp-bf16", autocast_dtype=torch.bfloat16),
    "o2-fp16": Policy("o2-fp16", model_dtype=torch.float16, check_loss_scale=2.0**12),
    "fp64": Policy("fp64", model_dtype=torch.float64),
}


def get_policy(name: str) -> Policy:
    """The policy called `name` (case-insensitive; O1/O2 aliases accepted)."""
    return POLICIES[canonical_precision(name, golden=True)]


# Relative error a correct kernel may show even where the reference is exact. Summation
# order alone moves an fp32 reduction of n terms by ~u*sqrt(n) of the sum of magnitudes,
# and gradient sums cancel: BatchNorm parameter gradients of a channels_last run were
# measured 6e-6 off where the contiguous reference was 1.3e-6 off. 1e-5 stays 30x below
# the faults align must catch (0.03% and up). A low-precision result is dominated by
# one rounding of its own output.
ERROR_FLOOR = {
    torch.float64: 1e-13,
    torch.float32: 1e-5,
    torch.bfloat16: 4e-3,
    torch.float16: 1e-3,
}

UNIT_FP32 = 2.0**-24  # the bias floor's constant: far below any gain fault, in any dtype
# A normalization's statistics (mean, variance) are sums over n values, which honest
# kernels form in any order, and every element of a slice shares its statistic's error.
# Summed in one chain (recursive summation, one thread), the partial sums grow as k times
# the terms' mean, each rounded within a unit roundoff u: the sum's relative error has a
# standard deviation of u sqrt(n) / 3 (Higham, 2nd ed., section 4.2's probabilistic
# bound, with uniform roundings); STATISTIC_ORDER allows 3 of them. Measured on the
# CPU's channels_last BatchNorm (per-thread running sums), worst channel of 20 draws: a
# gain of 0.22 sqrt(n) roundoffs with two threads, n from 128 to 25088, where the
# contiguous kernel stays within 1.4 roundoffs; with one thread, an input gradient's offset
# of 0.67 sqrt(n) roundoffs of the sums' terms (tests/judge/test_step_isolation.py's
# ZeroMean). Statistics are accumulated in fp32 at least, whatever the tensor's dtype. At
# n = 25088, sqrt(n) roundoffs is 9.4e-6, 30x under a 0.03% gain.
STATISTIC_ORDER = 1.0

# How far an honest kernel may be from the exact result, in roundings (unit roundoffs of
# its dtype, about `ERROR_FLOOR`): the accuracy vendors document. Arithmetic and
# conversions are correctly rounded (IEEE 754-2019 section 4.3: half an ulp, one
# rounding). Transcendental functions are not: the CUDA C++ Programming Guide's
# "Mathematical Functions" appendix gives expf, logf, tanhf, erff, rsqrtf 2 ulp (the fast
# intrinsics more), and 2 ulp are 4 roundings. Reductions (convolutions, matmuls, norms,
# sums, average pools) may sum in any order: their output is one rounding away from the
# sum the kernel formed, and the order adds about as much again on well-conditioned sums
# (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., section 4.2); an
# ill-conditioned sum is measured by the reference's own error and its honest draws.
# Piecewise-polynomial activations (hardswish, hardsigmoid) are composites of three
# arithmetic ops where a device has no fused kernel (x * relu6(x + 3) / 6): up to three
# roundings, counted as a reduction's two.
# Used twice: as the floor of an isolated module (`kernel_accuracy`), and as the size of
# each op's nudge in an honest draw (align.numerics.jitter), which then stands for another honest
# device rather than for the reference's own rounding.
KERNEL_ACCURACY = {"arithmetic": 1.0, "reduction": 2.0, "transcendental": 4.0}
TRANSCENDENTAL_OPS = frozenset(
    """exp exp2 expm1 log log1p log2 log10 pow sigmoid sigmoid_backward silu silu_backward
    gelu gelu_backward tanh tanh_backward erf erfc erfinv mish mish_backward softplus
    softplus_backward elu elu_backward _softmax _softmax_backward_data _log_softmax
    _log_softmax_backward_data rsqrt sin cos tan asin acos atan sinh cosh
    _scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_efficient_attention
    _scaled_dot_product_flash_attention""".split()
) | frozenset(  # fused recurrent layers: sigmoid and tanh gates, and a state whose precision
    # between steps is the kernel's choice (oneDNN's bf16 LSTM keeps it in fp32, ATen's own
    # rounds it to bf16 each step: measured, timm's sequencer2d_s under amp-bf16, 1.3% of an
    # isolated LSTM's final state over 4 ulp from the golden beyond the fused reference's)
    """lstm gru rnn_tanh rnn_relu lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell
    _thnn_fused_lstm_cell _thnn_fused_gru_cell _thnn_fused_lstm_cell_backward_impl
    _thnn_fused_gru_cell_backward mkldnn_rnn_layer mkldnn_rnn_layer_backward _cudnn_rnn
    _cudnn_rnn_backward miopen_rnn miopen_rnn_backward""".split()
)
# ops that sum many terms: their error is relative to the terms (align.numerics.jitter)
SUMMING_OPS = frozenset(
    """convolution convolution_backward mm addmm bmm baddbmm dot mv sum mean var std
    var_mean native_batch_norm native_batch_norm_backward _native_batch_norm_legit
    _native_batch_norm_legit_no_training batch_norm_backward native_layer_norm
    native_layer_norm_backward native_group_norm native_group_norm_backward
    avg_pool2d avg_pool2d_backward _adaptive_avg_pool2d _adaptive_avg_pool2d_backward
    avg_pool3d adaptive_avg_pool3d cumsum linalg_vector_norm norm""".split()
)
# ops that normalize by statistics of a slice (a channel, a row): each statistic is a sum
# whose order moves it, and every element of its slice with it (STATISTIC_ORDER)
STATISTIC_OPS = frozenset(
    """native_batch_norm native_batch_norm_backward _native_batch_norm_legit
    _native_batch_norm_legit_no_training batch_norm_backward native_layer_norm
    native_layer_norm_backward native_group_norm native_group_norm_backward var std
    var_mean std_mean linalg_vector_norm norm""".split()
)
# elementwise, but rounding twice (x * relu6(x + 3) / 6)
REDUCTION_OPS = SUMMING_OPS | frozenset(
    """hardswish hardswish_ hardswish_backward hardsigmoid hardsigmoid_
    hardsigmoid_backward""".split()
)


# How far the kernels that made a tensor may honestly bias a whole slice of it (a channel,
# a row) beyond the reference's own bias there, in roundings. Correctly rounded arithmetic
# and conversions: one rounding of a value the slice shares, at most a unit roundoff
# (IEEE 754-2019 section 4.3). Reductions: their summation-order errors have mean zero;
# what they can share is again one rounding of a common input (measured: mobilenetv3's
# conv_head weight gradient under amp-bf16, one input channel 0.18% off on an honest
# target, half a bf16 roundoff). Transcendental functions: documented to 2 ulp with no
# claim that the errors average out, so a biased implementation may move every element
# by its whole accuracy.
KERNEL_BIAS = {"arithmetic": 1.0, "reduction": 1.0, "transcendental": 4.0}


def kernel_bias(accuracy: float) -> float:
    """The shared bias, in roundings, of kernels of documented `accuracy` (kernel_accuracy)."""
    kinds = [kind for kind, a in KERNEL_ACCURACY.items() if a <= accuracy] or ["arithmetic"]
    return KERNEL_BIAS[max(kinds, key=KERNEL_ACCURACY.__getitem__)]


def op_accuracy(op: str) -> float:
    """The documented accuracy, in roundings, of the aten op (overload packet) `op`."""
    if op in TRANSCENDENTAL_OPS:
        return KERNEL_ACCURACY["transcendental"]
    if op in REDUCTION_OPS:
        return KERNEL_ACCURACY["reduction"]
    return KERNEL_ACCURACY["arithmetic"]


def kernel_accuracy(ops: set[str]) -> float:
    """The documented accuracy, in roundings, of a computation that ran these aten ops."""
    return max((op_accuracy(op) for op in ops), default=KERNEL_ACCURACY["arithmetic"])


def shares_statistics(ops: set[str]) -> bool:
    """Whether a computation that ran these aten ops normalized by statistics of slices."""
    return not STATISTIC_OPS.isdisjoint(ops)


def error_floor(dtype: torch.dtype) -> float:
    """Relative error floor of a floating dtype (fp32's for anything unknown)."""
    return ERROR_FLOOR.get(dtype, ERROR_FLOOR[torch.float32])


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of a floating dtype (fp32's for anything unknown)."""
    return UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF[torch.float32])


def held_dtype(t: torch.Tensor, min_elements: int = 8) -> torch.dtype:
    """The narrowest floating dtype whose precision holds every element of float32 `t`
    (bfloat16's 8 significant bits, then float16's 11), else `t`'s own: an fp32 gradient of
    a bf16 kernel's weight copy under autocast is bf16 values, and as accurate as bf16; an
    fp16 gradient divided by its loss scale (a power of two) keeps fp16's bits below fp16's
    range (`unscaled_dtype`). A tensor of fewer than `min_elements` nonzero
    elements keeps its dtype (a few values may fit by chance)."""
    if t.dtype != torch.float32 or int(t.count_nonzero()) < min_elements:
        return t.dtype
    bits = t[torch.isfinite(t)].view(torch.int32)
    for narrow, dropped in ((torch.bfloat16, 0xFFFF), (torch.float16, 0x1FFF)):
        if not bool((bits & dropped).any()):  # the float32 bits below its last significant one
            return narrow
    return t.dtype


def unscaled_dtype(dtype: torch.dtype, scale: float) -> torch.dtype:
    """The dtype a gradient of `dtype` is recorded in once divided by the loss `scale`:
    float32 where `dtype`'s range is narrower (an fp16 gradient at scale 65536 divided in
    fp16 is mostly subnormal: measured, 87% of resnet26d's under GradScaler, 13% flushed
    to zero, 5% off the golden); the division by a power of two, as GradScaler's scales
    are, is then exact, and the values keep fp16's precision (`held_dtype`)."""
    narrow = dtype.is_floating_point and torch.finfo(dtype).tiny > torch.finfo(torch.float32).tiny
    return torch.float32 if scale != 1.0 and narrow else dtype


def round_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 `t` rounded to `dtype`'s precision (nearest even), kept in float32 and its
    range, as `held_dtype` finds values held: an unscaled fp16 gradient is below fp16's."""
    if t.dtype != torch.float32 or dtype == t.dtype:
        return t
    if dtype == torch.float16:
        return to_tf32(t)  # 10 stored bits, as fp16's, in fp32's range
    return t.to(dtype).to(t.dtype)
