"""Faulty targets: `FAULTS[kind](model, module_name)` injects one known fault into a
module of a copy (a kernel gain, a weight through fp16, a norm's eps, a close-but-wrong
activation, a backward gain, a dropout without its rescale, a wrong channel, a norm's
backward without a term, a padding value, running statistics...), so the verdict must fail
it and name the module. Forward overrides swap the module's class for a subclass, so they
survive the deep copies align makes of a target. `fused_dropout_kernel()` swaps the CPU's
fused dropout kernel for a wrong one while it is active.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from align.testing.honest import (
    decomposed_functionals,
    module,
    override_forward,
    stored_weight,
    with_functionals,
)

# -- faults ------------------------------------------------------------------------------


def kernel_gain(model: nn.Module, name: str) -> None:
    """A forward kernel off by 0.3%."""
    base = type(module(model, name)).forward

    def forward(self, *args, **kwargs):
        return base(self, *args, **kwargs) * 1.003

    override_forward(module(model, name), forward, "Gain")


def weight_via_fp16(model: nn.Module, name: str) -> None:
    """A parameter conversion error: the weight went through fp16 and back."""
    w = stored_weight(module(model, name))
    with torch.no_grad():
        w.copy_(w.half().float())


def norm_gain(model: nn.Module, name: str) -> None:
    """A norm's affine weight off by 1% (BN running stats are unused in train mode)."""
    with torch.no_grad():
        module(model, name).weight.mul_(1.01)


class LeakyReLU(nn.Module):
    def forward(self, x):
        return F.leaky_relu(x, 0.01)


class SteepSiLU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.02 * x)


class ShiftedHardswish(nn.Module):
    def forward(self, x):
        return x * F.relu6(x + 3.05) / 6


class TanhGELU(nn.Module):
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


CLOSE_ACTIVATION = {
    nn.ReLU: LeakyReLU,
    nn.SiLU: SteepSiLU,
    nn.Hardswish: ShiftedHardswish,
    nn.GELU: TanhGELU,
}


def activation(model: nn.Module, name: str) -> None:
    """Another activation formula, close to the original."""
    parent, _, leaf = name.rpartition(".")
    old = module(model, name)
    setattr(module(model, parent) if parent else model, leaf, CLOSE_ACTIVATION[type(old)]())


def fp16_kernel(model: nn.Module, name: str) -> None:
    """A Linear / conv kernel that silently computes in fp16."""

    def forward(self, x):
        autocast = torch.is_autocast_enabled("cpu")
        out_dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
        bias = None if self.bias is None else self.bias.half()
        with torch.autocast("cpu", enabled=False):
            if isinstance(self, nn.Linear):
                y = F.linear(x.half(), self.weight.half(), bias)
            else:
                y = self._conv_forward(x.half(), self.weight.half(), bias)
        return y.to(out_dtype)

    override_forward(module(model, name), forward, "Half")


def norm_eps(model: nn.Module, name: str) -> None:
    """A norm layer with eps 1e-2 instead of 1e-5."""
    m = module(model, name)
    assert isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)), type(m)
    m.eps = 1e-2


class _GradGain(torch.autograd.Function):
    """Identity forward; backward scales the gradient by `gain` (1.01: a 1% fault)."""

    @staticmethod
    def forward(ctx, x, gain: float = 1.01):
        ctx.gain = gain
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.gain, None


def backward_gain(model: nn.Module, name: str) -> None:
    """A module whose forward is exact and whose backward is 1% off."""
    base = type(module(model, name)).forward

    def forward(self, *args, **kwargs):
        return _GradGain.apply(base(self, *args, **kwargs))

    override_forward(module(model, name), forward, "GradGain")


FAULTS = {
    "kernel_gain": kernel_gain,
    "weight_via_fp16": weight_via_fp16,
    "norm_gain": norm_gain,
    "activation": activation,
    "fp16_kernel": fp16_kernel,
    "norm_eps": norm_eps,
    "backward_gain": backward_gain,
}


class _Dropout(nn.Dropout):
    """Dropout that keeps the generator's mask but forgets to rescale by 1 / (1 - p)."""

    def forward(self, x):
        return super().forward(x) * (1 - self.p) if self.training else x


class FusedDropout(nn.Dropout):
    """Dropout through `aten.native_dropout`, the fused kernel CUDA and NPU builds call
    (the CPU's `F.dropout` draws a bernoulli mask instead)."""

    def forward(self, x):
        return torch.ops.aten.native_dropout(x, self.p, self.training)[0]


@contextlib.contextmanager
def fused_dropout_kernel(scale: float = 0.9) -> Iterator[None]:
    """While active, the CPU's `aten.native_dropout` is a faulty fused kernel: its kept
    outputs are off by `scale` from input x mask / (1 - p) for the mask it returns."""

    def kernel(x: torch.Tensor, p: float, train: bool | None):
        if not train:
            return x.clone(), torch.ones_like(x, dtype=torch.bool)
        mask = torch.rand(x.shape, device=x.device) >= p
        return x * mask / (1 - p) * scale, mask

    with warnings.catch_warnings():  # "overriding a previously registered kernel"
        warnings.simplefilter("ignore")
        library = torch.library.Library("aten", "IMPL")
        library.impl("native_dropout", kernel, "CPU")
    try:
        yield
    finally:
        library._destroy()  # the stock kernel is back


def dropout_scale(model: nn.Module, name: str) -> None:
    """A dropout whose kept elements are not rescaled."""
    old = module(model, name)
    parent, _, leaf = name.rpartition(".")
    setattr(module(model, parent) if parent else model, leaf, _Dropout(old.p))


def output_offset(model: nn.Module, name: str) -> None:
    """A kernel whose output is shifted by 0.2% of its RMS (a bias bug), inside the kernel:
    a bf16 / fp16 output is its fp32 result plus the shift, rounded once (added after the
    rounding, a shift under half an ulp would round away on most elements)."""
    base = type(module(model, name)).forward

    def forward(self, *args, **kwargs):
        with parametrize.cached():  # a spectral norm's weight: one power iteration, as before
            return _offset(self, *args, **kwargs)

    def _offset(self, *args, **kwargs):
        out = base(self, *args, **kwargs)
        if out.dtype not in (torch.bfloat16, torch.float16):
            return out + 2e-3 * out.detach().float().pow(2).mean().sqrt().to(out.dtype)
        with torch.no_grad(), torch.autocast(out.device.type, enabled=False):
            wide = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            saved = [(p, p.data) for p in self.parameters(recurse=False)]
            try:  # a model cast to half (o2-fp16): its fp32 result with fp32 weights
                for p, data in saved:
                    p.data = data.float()
                exact = base(self, *wide, **kwargs)
            finally:
                for p, data in saved:
                    p.data = data
            shifted = (exact + 2e-3 * exact.pow(2).mean().sqrt()).to(out.dtype)
        return out + (shifted - out).detach()

    override_forward(module(model, name), forward, "Offset")


class _ShiftedReLU(nn.Module):
    """A ReLU whose breakpoint moved to +0.05."""

    def forward(self, x):
        return F.threshold(x, 0.05, 0.0)


def moved_breakpoint(model: nn.Module, name: str) -> None:
    """A ReLU whose kernel cuts at 0.05 instead of 0."""
    parent, _, leaf = name.rpartition(".")
    setattr(module(model, parent) if parent else model, leaf, _ShiftedReLU())


FAULTS.update(
    dropout_scale=dropout_scale, output_offset=output_offset, moved_breakpoint=moved_breakpoint
)


# -- porting bugs -----------------------------------------------------------------------------


def avgpool_include_pad(model: nn.Module, name: str) -> None:
    """An average pool whose count_include_pad is flipped (the padded zeros counted, or not)."""
    m = module(model, name)
    m.count_include_pad = not m.count_include_pad


def align_corners(model: nn.Module, name: str) -> None:
    """An upsample whose align_corners is flipped."""
    m = module(model, name)
    m.align_corners = not bool(m.align_corners)


def unbiased_var(model: nn.Module, name: str) -> None:
    """A norm normalizing by the unbiased variance (N - 1) instead of the biased one (N)."""
    with_functionals(module(model, name), decomposed_functionals(correction=1), "Unbiased")


def norm_grad_no_mean(model: nn.Module, name: str) -> None:
    """A norm whose forward is exact and whose backward forgets the mean's gradient (the
    mean treated as a constant): the input gradient misses its -mean(g) term."""
    functionals = decomposed_functionals(detach_mean=True, exact_forward=True)
    with_functionals(module(model, name), functionals, "NoMeanGrad")


def norm_grad_no_var(model: nn.Module, name: str) -> None:
    """A norm whose forward is exact and whose backward forgets the variance's gradient
    (the variance treated as a constant): the input gradient misses its
    -x_hat * mean(g * x_hat) term. (Forgetting the mean's term instead, `norm_grad_no_mean`,
    changes nothing where the gradient reaching the norm has zero mean per channel, as
    behind a 1x1 conv feeding a train-mode BatchNorm.)"""
    functionals = decomposed_functionals(detach_var=True, exact_forward=True)
    with_functionals(module(model, name), functionals, "NoVarGrad")


def attn_scale(model: nn.Module, name: str) -> None:
    """An attention whose softmax scale is 3% off (1.03 / sqrt(head_dim))."""
    m = module(model, name)
    if hasattr(m, "fused_attn"):
        m.fused_attn = False  # timm's fused path ignores self.scale
    m.scale = m.scale * 1.03


def gelu_tanh(model: nn.Module, name: str) -> None:
    """A GELU computed with the tanh approximation instead of erf (any GELU class)."""
    parent, _, leaf = name.rpartition(".")
    setattr(module(model, parent) if parent else model, leaf, TanhGELU())


class _ParamGain(torch.autograd.Function):
    """Identity forward; backward scales the gradient by `gain`."""

    @staticmethod
    def forward(ctx, x, gain):
        ctx.gain = gain
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.gain, None


def _with_params(m: nn.Module, weight_gain: float | None, bias_gain: float | None, tag: str):
    def forward(self, x):
        w, b = self.weight, self.bias
        if weight_gain is not None:
            w = _ParamGain.apply(w, weight_gain)
        if bias_gain is not None and b is not None:
            b = _ParamGain.apply(b, bias_gain)
        if isinstance(self, nn.Linear):
            return F.linear(x, w, b)
        return self._conv_forward(x, w, b)

    override_forward(m, forward, tag)


def weight_grad_gain(model: nn.Module, name: str) -> None:
    """A conv / linear whose forward and input gradient are exact and whose weight
    gradient is 1% off."""
    _with_params(module(model, name), 1.01, None, "WeightGradGain")


def bias_grad_dropped(model: nn.Module, name: str) -> None:
    """A conv / linear whose bias gradient is zero (forgotten), everything else exact."""
    _with_params(module(model, name), None, 0.0, "NoBiasGrad")


def channel_gain(model: nn.Module, name: str) -> None:
    """A conv whose middle output channel is 1% off (a localized error, a few elements)."""
    base = type(module(model, name)).forward

    def forward(self, *args, **kwargs):
        out = base(self, *args, **kwargs)
        gain = torch.ones(out.shape[1], dtype=out.dtype, device=out.device)
        gain[out.shape[1] // 2] = 1.01
        return out * gain.view((1, -1) + (1,) * (out.dim() - 2))

    override_forward(module(model, name), forward, "ChannelGain")


def pad_value(model: nn.Module, name: str) -> None:
    """A convolution that pads its input with 5% of the input's RMS instead of zeros (a
    border bug: only the elements its window reaches past the edge are wrong)."""
    base = type(module(model, name)).forward

    def forward(self, x):
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or not any(self.padding):
            return base(self, x)
        value = float(x.detach().float().pow(2).mean().sqrt()) * 0.05
        pads = [p for p in reversed(self.padding) for _ in range(2)]
        padded = F.pad(x, pads, value=value)
        return F.conv2d(padded, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    override_forward(module(model, name), forward, "PadValue")


def norm_momentum(model: nn.Module, name: str) -> None:
    """A BatchNorm whose running statistics move with momentum 0.01 instead of 0.1: its
    train-mode outputs and gradients are exact; the running mean and variance, what eval
    mode and the trained model use, are not."""
    module(model, name).momentum = 0.01


def running_var_biased(model: nn.Module, name: str) -> None:
    """A BatchNorm that keeps the biased variance (N) in its running variance where torch
    keeps the unbiased one (N - 1); its outputs and gradients are exact."""
    base = type(module(model, name)).forward

    def forward(self, x):
        before = self.running_var.detach().clone()
        out = base(self, x)
        if self.training and self.momentum is not None:
            with torch.no_grad():
                dims = [0, *range(2, x.dim())]
                var = x.detach().float().var(dims, unbiased=False)
                self.running_var.data = before.lerp(var.to(before.dtype), self.momentum)
        return out

    override_forward(module(model, name), forward, "BiasedRunningVar")


# porting bugs met in the hold-out catalogue (bench/verdict_catalogue.py): padding and
# interpolation flags, a norm's variance and backward terms, attention and GELU variants,
# a gradient-only gain, a dropped bias gradient, one wrong channel, a wrong padding value,
# running statistics
PORT_FAULTS = {
    "avgpool_include_pad": avgpool_include_pad,
    "align_corners": align_corners,
    "unbiased_var": unbiased_var,
    "norm_grad_no_mean": norm_grad_no_mean,
    "norm_grad_no_var": norm_grad_no_var,
    "attn_scale": attn_scale,
    "gelu_tanh": gelu_tanh,
    "weight_grad_gain": weight_grad_gain,
    "bias_grad_dropped": bias_grad_dropped,
    "channel_gain": channel_gain,
    "pad_value": pad_value,
    "norm_momentum": norm_momentum,
    "running_var_biased": running_var_biased,
}
FAULTS.update(PORT_FAULTS)
