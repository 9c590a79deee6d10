"""Targets for testing a verdict: honest ones that must pass, faulty ones that must fail.

`perturb(model, ulps)` gives every accumulating kernel (convolutions, linear layers,
norms, smooth activations, average pools) of a copy an output and an input gradient that
differ from the reference's by `ulps` units in the last place, with a random sign per
element: what another device's kernels with another rounding and summation order do.
`FAULTS[kind](model, module_name)` injects one known fault into a module of a copy (a
kernel gain, a weight through fp16, a norm's eps, a close-but-wrong activation, a
backward gain, a dropout without its rescale...); `tests/judge/test_faults.py` and
`bench/verdict_catalogue.py` use both. Forward overrides swap the module's class for a
subclass, so they survive the deep copies align makes of a target.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

ACCUMULATING = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.AdaptiveAvgPool2d,
    nn.AvgPool2d,
)


def _nudge(t: torch.Tensor, ulps: float, gen: torch.Generator) -> torch.Tensor:
    if not t.is_floating_point() or t.dtype == torch.float64:
        return t
    eps = torch.finfo(t.dtype).eps  # one ulp at 1.0: scale by each element's binade
    mantissa, exponent = torch.frexp(t.detach().float())  # an exact 0 stays exact
    binade = torch.where(mantissa == 0, 0.0, torch.ldexp(torch.ones_like(mantissa), exponent - 1))
    noise = (torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t.device)
    return (t.float() + noise * ulps * eps * binade).to(t.dtype)


class _Nudge(torch.autograd.Function):
    """Nudges the values passing forward (`forward=True`) or the gradient passing back."""

    @staticmethod
    def forward(ctx, x, ulps, seed, forward):
        ctx.ulps, ctx.seed, ctx.forward = ulps, seed, forward
        return _nudge(x, ulps, torch.Generator().manual_seed(seed)) if forward else x.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.forward:
            return grad, None, None, None
        return _nudge(grad, ctx.ulps, torch.Generator().manual_seed(ctx.seed)), None, None, None


def _nudged(x, ulps: float, seed: int, forward: bool):
    if isinstance(x, torch.Tensor) and x.is_floating_point() and (forward or x.requires_grad):
        return _Nudge.apply(x, ulps, seed, forward)
    return x


def perturb(model: nn.Module, ulps: float = 0.5, seed: int = 0) -> nn.Module:
    """A copy of `model` whose accumulating kernels round `ulps` ulp otherwise: their
    outputs, and the gradients they pass back to their inputs."""
    target = copy.deepcopy(model)
    for n, m in enumerate(target.modules()):
        if not isinstance(m, ACCUMULATING):
            continue
        base = type(m).forward

        def forward(self, *args, _base=base, _seed=seed * 100_000 + n * 2, **kwargs):
            args = tuple(_nudged(a, ulps, _seed + 1, forward=False) for a in args)
            return _nudged(_base(self, *args, **kwargs), ulps, _seed, forward=True)

        m.__class__ = type(f"Nudged{type(m).__name__}", (type(m),), {"forward": forward})
    return target


# -- faults ------------------------------------------------------------------------------


def module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def override_forward(m: nn.Module, forward, tag: str) -> None:
    """Give `m` a subclass of its class with another forward (deep-copy safe)."""
    cls = type(m)
    m.__class__ = type(f"{tag}{cls.__name__}", (cls,), {"forward": forward})


def kernel_gain(model: nn.Module, name: str) -> None:
    """A forward kernel off by 0.3%."""
    base = type(module(model, name)).forward

    def forward(self, *args, **kwargs):
        return base(self, *args, **kwargs) * 1.003

    override_forward(module(model, name), forward, "Gain")


def weight_via_fp16(model: nn.Module, name: str) -> None:
    """A parameter conversion error: the weight went through fp16 and back."""
    w = module(model, name).weight
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
    assert isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm)), type(m)
    m.eps = 1e-2


class _GradGain(torch.autograd.Function):
    """Identity forward; backward scales the gradient by 1.01."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


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
    """A kernel whose output is shifted by 0.2% of its RMS (a bias bug)."""
    base = type(module(model, name)).forward

    def forward(self, *args, **kwargs):
        out = base(self, *args, **kwargs)
        return out + 2e-3 * out.detach().float().pow(2).mean().sqrt().to(out.dtype)

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
