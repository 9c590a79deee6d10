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


def _nudge(
    t: torch.Tensor, ulps: float, gen: torch.Generator, uniform: bool = False
) -> torch.Tensor:
    if not t.is_floating_point() or t.dtype == torch.float64:
        return t
    eps = torch.finfo(t.dtype).eps  # one ulp at 1.0: scale by each element's binade
    mantissa, exponent = torch.frexp(t.detach().float())  # an exact 0 stays exact
    binade = torch.where(mantissa == 0, 0.0, torch.ldexp(torch.ones_like(mantissa), exponent - 1))
    if uniform:  # a draw in [-ulps, ulps] rather than exactly +-ulps
        noise = (torch.rand(t.shape, generator=gen) * 2 - 1).to(t.device)
    else:
        noise = (torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t.device)
    return (t.float() + noise * ulps * eps * binade).to(t.dtype)


class _Nudge(torch.autograd.Function):
    """Nudges the values passing forward (`forward=True`) or the gradient passing back."""

    @staticmethod
    def forward(ctx, x, ulps, seed, forward, uniform=False):
        ctx.ulps, ctx.seed, ctx.forward, ctx.uniform = ulps, seed, forward, uniform
        if forward:
            return _nudge(x, ulps, torch.Generator().manual_seed(seed), uniform)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.forward:
            return grad, None, None, None, None
        gen = torch.Generator().manual_seed(ctx.seed)
        return _nudge(grad, ctx.ulps, gen, ctx.uniform), None, None, None, None


def _nudged(x, ulps: float, seed: int, forward: bool, uniform: bool = False):
    if isinstance(x, torch.Tensor) and x.is_floating_point() and (forward or x.requires_grad):
        return _Nudge.apply(x, ulps, seed, forward, uniform)
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
    assert isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)), type(m)
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
    """A kernel whose output is shifted by 0.2% of its RMS (a bias bug), inside the kernel:
    a bf16 / fp16 output is its fp32 result plus the shift, rounded once (added after the
    rounding, a shift under half an ulp would round away on most elements)."""
    base = type(module(model, name)).forward

    def forward(self, *args, **kwargs):
        out = base(self, *args, **kwargs)
        if out.dtype not in (torch.bfloat16, torch.float16):
            return out + 2e-3 * out.detach().float().pow(2).mean().sqrt().to(out.dtype)
        with torch.no_grad(), torch.autocast(out.device.type, enabled=False):
            wide = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            exact = base(self, *wide, **kwargs)
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


# -- more honest targets ---------------------------------------------------------------------

# Activations evaluated with exp / tanh / erf / log1p: a device's transcendental kernels are
# documented to within 2 ulp (CUDA's expf, tanhf, erff: 2 ulp; most NPU vector units alike).
TRANSCENDENTAL = (
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softmax,
    nn.Mish,
    nn.ELU,
    nn.Softplus,
)
# timm's own activation classes (timm.layers.activations), matched by name
TRANSCENDENTAL_NAMES = {"GELU", "GELUTanh", "QuickGELU", "Sigmoid", "Swish", "Tanh", "Mish"}


def _is_transcendental(m: nn.Module) -> bool:
    return isinstance(m, TRANSCENDENTAL) or (
        type(m).__module__.startswith("timm") and type(m).__name__ in TRANSCENDENTAL_NAMES
    )


def _within(exact: torch.Tensor, ulps: float, gen: torch.Generator) -> torch.Tensor:
    """`exact` (float64) moved by a uniform draw in [-ulps, ulps] fp32 ulp of its binade."""
    mantissa, exponent = torch.frexp(exact.float())
    binade = torch.where(mantissa == 0, 0.0, torch.ldexp(torch.ones_like(mantissa), exponent - 1))
    u = torch.rand(exact.shape, generator=gen, dtype=torch.float64) * 2 - 1
    return exact + u * ulps * torch.finfo(torch.float32).eps * binade.double()


def transcendental_ulps(model: nn.Module, ulps: float = 2.0, seed: int = 0) -> nn.Module:
    """A copy of `model` whose transcendental activations are `ulps` ulp accurate.

    Forward: each output is the float64 value of the same formula on the same input, moved
    by a uniform draw of up to `ulps` - 0.5 fp32 ulp and rounded to fp32 (so within `ulps`
    ulp of the exact value, the documented bound), then to the output's dtype (a bf16 /
    fp16 kernel computes in fp32 and rounds once). Backward: the input gradient nudged by
    a uniform draw of up to `ulps` - 0.5 ulp of its dtype (the backward kernel's own
    transcendental). Nothing else changes."""
    target = copy.deepcopy(model)
    for n, m in enumerate(target.modules()):
        if not _is_transcendental(m):
            continue
        base = type(m).forward

        def forward(self, x, *args, _base=base, _seed=seed * 100_000 + n * 2, **kwargs):
            if not (
                isinstance(x, torch.Tensor)
                and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            ):
                return _base(self, x, *args, **kwargs)
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                exact = _base(self, x.detach().double(), *args, **kwargs)  # before an inplace
            if x.dtype == torch.float32:  # a bf16 / fp16 gradient is rounded once from fp32
                x = _nudged(x, ulps - 0.5, _seed + 1, forward=False, uniform=True)
            out = _base(self, x, *args, **kwargs)
            gen = torch.Generator().manual_seed(_seed)
            value = _within(exact, ulps - 0.5, gen).float().to(out.dtype)
            return out + (value - out).detach()

        m.__class__ = type(f"Ulps{type(m).__name__}", (type(m),), {"forward": forward})
    return target


class _Threads(torch.autograd.Function):
    """Identity; its backward switches the intra-op thread count until the backward ends."""

    @staticmethod
    def forward(ctx, threads, base, *xs):
        ctx.threads, ctx.base = threads, base
        return tuple(x.clone() for x in xs)  # a view would forbid in-place activations

    @staticmethod
    def backward(ctx, *grads):
        if torch.get_num_threads() != ctx.threads:
            torch.set_num_threads(ctx.threads)
            base = ctx.base
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: torch.set_num_threads(base)
            )
        return (None, None, *grads)


def with_threads(model: nn.Module, threads: int = 2) -> nn.Module:
    """A copy of `model` that runs on `threads` intra-op threads (the reference's count
    otherwise): every module's forward switches and restores the count (isolated module
    runs included); the first module output reached by a backward switches it until that
    backward ends (`queue_callback`), so the whole backward (input and weight gradients,
    norms' reductions) runs on `threads` too. Same kernels, other work partition: what a
    device with another number of cores does to reductions split across them."""
    target = copy.deepcopy(model)
    for m in target.modules():
        base = type(m).forward

        def forward(self, *args, _base=base, **kwargs):
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                out = _base(self, *args, **kwargs)
            finally:
                torch.set_num_threads(previous)
            if isinstance(out, torch.Tensor) and out.requires_grad:
                (out,) = _Threads.apply(threads, previous, out)
            return out

        m.__class__ = type(f"Threads{type(m).__name__}", (type(m),), {"forward": forward})
    return target


def _split_reduction(weight: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask of `weight`'s shape selecting the first half of each output's reduction
    (input channels x taps, in memory order)."""
    per_output = weight[0].numel()
    flat = (torch.arange(per_output) < (per_output + 1) // 2).to(weight.dtype)
    return flat.view(weight.shape[1:]).expand_as(weight).to(weight.device)


def split_summation(model: nn.Module) -> nn.Module:
    """A copy of `model` whose convolutions and linear layers sum in another order: each
    output is the sum of two partial sums (the first and second half of its input channels
    x taps, as a blocked kernel accumulates them), and the batch is computed in two halves,
    so the weight gradient is the sum of two partial sums too. Under autocast the inputs
    are rounded to the autocast dtype and accumulated in fp32, rounded once at the end (as
    the reference's bf16 kernels do). Depthwise convolutions split their taps."""
    target = copy.deepcopy(model)
    for m in target.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or m.weight[0].numel() < 2:
            continue
        cls = type(m)

        def forward(self, x, _cls=cls):
            autocast = torch.is_autocast_enabled(x.device.type)
            dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
            w, b = self.weight, self.bias
            mask = _split_reduction(w)
            with torch.autocast(x.device.type, enabled=False):
                xs = x.to(dtype).float() if autocast else x
                ws = w.to(dtype).float() if autocast else w
                bs = None if b is None else (b.to(dtype).float() if autocast else b)

                def apply(xp, wp, bp):
                    if isinstance(self, nn.Linear):
                        return F.linear(xp, wp, bp)
                    return self._conv_forward(xp, wp, bp)

                halves = xs.split((xs.shape[0] + 1) // 2) if xs.shape[0] > 1 else (xs,)
                out = torch.cat(
                    [apply(h, ws * mask, None) + apply(h, ws * (1 - mask), bs) for h in halves]
                )
            return out.to(dtype)

        m.__class__ = type(f"Split{cls.__name__}", (cls,), {"forward": forward})
    return target


# -- norms from primitives (an honest decomposition, and two faults built on it) ------------


def _stats(x: torch.Tensor, dims, correction: int, detach_mean: bool, detach_var: bool = False):
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    n = 1
    for d in dims:
        n *= x.shape[d]
    var = centred.pow(2).sum(dims, keepdim=True) / (n - correction)
    if detach_mean:
        centred = x - mean.detach()
    if detach_var:
        var = var.detach()
    return mean, var, centred


def _decomposed_functionals(
    correction: int = 0,
    detach_mean: bool = False,
    exact_forward: bool = False,
    detach_var: bool = False,
) -> dict:
    """batch_norm / layer_norm / group_norm from primitives (mean, two-pass variance, rsqrt),
    computed in fp32 and rounded to the input's dtype, differentiated by autograd. With
    `exact_forward` the values are torch's own functional's (which also updates the running
    stats) and only the gradient comes from the primitives."""
    original = {"batch_norm": F.batch_norm, "layer_norm": F.layer_norm, "group_norm": F.group_norm}

    def exact(name, fn):
        if not exact_forward:
            return fn

        def wrapped(*args, **kwargs):
            with torch.no_grad():
                value = original[name](*args, **kwargs)
            out = fn(*args, **kwargs)
            return out + (value - out).detach()

        return wrapped

    def batch_norm(
        x, running_mean, running_var, weight=None, bias=None, training=False,
        momentum=0.1, eps=1e-5,
    ):  # fmt: skip
        dtype, xf = x.dtype, x.float()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if training or running_mean is None:
            dims = [0] + list(range(2, x.dim()))
            mean, var, centred = _stats(xf, dims, correction, detach_mean, detach_var)
            update = training and running_mean is not None and momentum is not None
            if update and not exact_forward:
                n = xf.numel() // xf.shape[1]
                with torch.no_grad():
                    unbiased = (xf - mean).pow(2).sum(dims) / max(n - 1, 1)
                    running_mean.mul_(1 - momentum).add_(momentum * mean.flatten())
                    running_var.mul_(1 - momentum).add_(momentum * unbiased)
        else:
            mean, var = running_mean.view(shape).float(), running_var.view(shape).float()
            centred = xf - mean
        y = centred * torch.rsqrt(var + eps)
        if weight is not None:
            y = y * weight.float().view(shape)
        if bias is not None:
            y = y + bias.float().view(shape)
        return y.to(dtype)

    def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        dtype, xf = x.dtype, x.float()
        dims = list(range(x.dim() - len(normalized_shape), x.dim()))
        _, var, centred = _stats(xf, dims, correction, detach_mean, detach_var)
        y = centred * torch.rsqrt(var + eps)
        if weight is not None:
            y = y * weight.float()
        if bias is not None:
            y = y + bias.float()
        return y.to(dtype)

    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
        dtype, xf = x.dtype, x.float()
        g = xf.reshape(x.shape[0], num_groups, -1)
        _, var, centred = _stats(g, [2], correction, detach_mean, detach_var)
        y = (centred * torch.rsqrt(var + eps)).reshape(x.shape)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if weight is not None:
            y = y * weight.float().view(shape)
        if bias is not None:
            y = y + bias.float().view(shape)
        return y.to(dtype)

    return {
        "batch_norm": exact("batch_norm", batch_norm),
        "layer_norm": exact("layer_norm", layer_norm),
        "group_norm": exact("group_norm", group_norm),
    }


def _with_functionals(m: nn.Module, functionals: dict, tag: str) -> None:
    """Give `m` a forward that runs its own forward with torch.nn.functional's norms swapped
    for `functionals` (so subclasses with their own forward, timm's BatchNormAct2d and
    LayerNorm2d, keep it)."""
    base = type(m).forward

    def forward(self, *args, **kwargs):
        saved = {name: getattr(F, name) for name in functionals}
        try:
            for name, fn in functionals.items():
                setattr(F, name, fn)
            return base(self, *args, **kwargs)
        finally:
            for name, fn in saved.items():
                setattr(F, name, fn)

    override_forward(m, forward, tag)


NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def decomposed_norms(model: nn.Module) -> nn.Module:
    """A copy of `model` whose BatchNorm / LayerNorm / GroupNorm layers are composed from
    primitives (mean, two-pass biased variance, rsqrt, scale, shift) in fp32 and
    differentiated by autograd: what a graph compiler lowering norms to elementwise and
    reduction ops does. Mathematically the same layer, rounded otherwise."""
    target = copy.deepcopy(model)
    functionals = _decomposed_functionals()
    for m in target.modules():
        if isinstance(m, NORM_TYPES):
            _with_functionals(m, functionals, "Decomposed")
    return target


# -- more faults ------------------------------------------------------------------------------


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
    _with_functionals(module(model, name), _decomposed_functionals(correction=1), "Unbiased")


def norm_grad_no_mean(model: nn.Module, name: str) -> None:
    """A norm whose forward is exact and whose backward forgets the mean's gradient (the
    mean treated as a constant): the input gradient misses its -mean(g) term."""
    functionals = _decomposed_functionals(detach_mean=True, exact_forward=True)
    _with_functionals(module(model, name), functionals, "NoMeanGrad")


def norm_grad_no_var(model: nn.Module, name: str) -> None:
    """A norm whose forward is exact and whose backward forgets the variance's gradient
    (the variance treated as a constant): the input gradient misses its
    -x_hat * mean(g * x_hat) term. (Forgetting the mean's term instead, `norm_grad_no_mean`,
    changes nothing where the gradient reaching the norm has zero mean per channel, as
    behind a 1x1 conv feeding a train-mode BatchNorm.)"""
    functionals = _decomposed_functionals(detach_var=True, exact_forward=True)
    _with_functionals(module(model, name), functionals, "NoVarGrad")


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


NEW_FAULTS = {
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
}
FAULTS.update(NEW_FAULTS)
