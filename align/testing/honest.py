"""Honest targets: copies of a model whose kernels differ from the reference's the way
another correct device's do, so the verdict must pass them.

- `perturb(model, ulps)`: every accumulating kernel (convolutions, linear layers, norms,
  smooth activations, average pools) rounds its output and its input gradient `ulps`
  units in the last place otherwise, with a random sign per element.
- `transcendental_ulps(model)`: transcendental activations within 2 ulp of exact, the
  accuracy vendors document.
- `with_threads(model)`: every kernel on another intra-op thread count.
- `split_summation(model)`: convolutions and linear layers summing in two blocks (and the
  batch in two halves), as another blocking does.
- `decomposed_norms(model)`: norms built from primitives, as graph compilers lower them.
- `math_attention(model)`: scaled_dot_product_attention as separate matmuls and a
  softmax (each rounding its output) instead of the fused kernel the reference picks.
- `one_pass_norms(model)`: BatchNorms forming their statistics in one pass on a vector
  unit (a sum and a sum of squares per channel), as Ascend's do.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

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


def module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def override_forward(m: nn.Module, forward, tag: str) -> None:
    """Give `m` a subclass of its class with another forward (deep-copy safe)."""
    cls = type(m)
    m.__class__ = type(f"{tag}{cls.__name__}", (cls,), {"forward": forward})


def _binade(t: torch.Tensor) -> torch.Tensor:
    """Each element's binade (the power of two at or below its magnitude), 0 where it is 0
    (an exact 0 stays exact). Zero is told by its bits: decisions replay float comparisons
    and casts, and a perturbation is no decision of the model's."""
    mantissa, exponent = torch.frexp(t.float())
    nonzero = (mantissa.view(torch.int32) & 0x7FFFFFFF) != 0
    return torch.where(nonzero, torch.ldexp(torch.ones_like(mantissa), exponent - 1), 0.0)


def _nudge(
    t: torch.Tensor, ulps: float, gen: torch.Generator, uniform: bool = False
) -> torch.Tensor:
    if not t.is_floating_point() or t.dtype == torch.float64:
        return t
    eps = torch.finfo(t.dtype).eps  # one ulp at 1.0: scale by each element's binade
    binade = _binade(t.detach().float())
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
    """`x` nudged (`_Nudge`); as it is inside a torch.func transform, where an
    autograd.Function without setup_context cannot run (an ensemble's heads vmapped by
    torch.func.functional_call)."""
    if torch._C._functorch.maybe_current_level() is not None:  # a transform runs
        return x
    if isinstance(x, torch.Tensor) and x.is_floating_point() and (forward or x.requires_grad):
        return _Nudge.apply(x, ulps, seed, forward, uniform)
    return x


def perturb(model: nn.Module, ulps: float = 0.5, seed: int = 0) -> nn.Module:
    """A copy of `model` whose accumulating kernels round `ulps` ulp otherwise: their
    outputs, and the gradients they pass back to their inputs."""
    target = copy.deepcopy(model)
    nudged: dict[type, type] = {}  # one subclass per class: instances stay of one class, as
    # torch.func.stack_module_state requires of an ensemble's members
    for n, m in enumerate(target.modules()):
        if not isinstance(m, ACCUMULATING):
            continue
        cls = type(m)
        if cls not in nudged:

            def forward(self, *args, _base=cls.forward, **kwargs):
                args = tuple(_nudged(a, ulps, self._nudge_seed + 1, forward=False) for a in args)
                return _nudged(_base(self, *args, **kwargs), ulps, self._nudge_seed, forward=True)

            nudged[cls] = type(f"Nudged{cls.__name__}", (cls,), {"forward": forward})
        m._nudge_seed = seed * 100_000 + n * 2
        m.__class__ = nudged[cls]
    return target


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
    binade = _binade(exact.float())
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


def math_attention(model: nn.Module) -> nn.Module:
    """A copy of `model` whose scaled_dot_product_attention runs PyTorch's math backend:
    scores, softmax and the weighted sum as separate kernels, each rounding its output to
    the working dtype, where the reference's fused kernel (flash on the CPU) keeps them in
    float32. Every kernel is exact to its documented accuracy; the composition differs, as
    a device's fused attention differs from another's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    target = copy.deepcopy(model)
    for m in target.modules():
        base = type(m).forward

        def forward(self, *args, _base=base, **kwargs):
            with sdpa_kernel(SDPBackend.MATH):
                return _base(self, *args, **kwargs)

        m.__class__ = type(f"MathAttention{type(m).__name__}", (type(m),), {"forward": forward})
    return target


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


def stored_weight(m: nn.Module) -> torch.Tensor:
    """`m.weight` as stored: a parametrized one's original, not computed (spectral norm's
    computation runs a power iteration: a copy would differ from the model before it ran);
    weight norm stores a magnitude and a direction: the direction, of the weight's shape."""
    if parametrize.is_parametrized(m, "weight"):
        stored = m.parametrizations.weight
        return stored.original if hasattr(stored, "original") else stored.original1
    return m.weight


def split_summation(model: nn.Module) -> nn.Module:
    """A copy of `model` whose convolutions and linear layers sum in another order: each
    output is the sum of two partial sums (the first and second half of its input channels
    x taps, as a blocked kernel accumulates them), and the batch is computed in two halves,
    so the weight gradient is the sum of two partial sums too. Under autocast the inputs
    are rounded to the autocast dtype and accumulated in fp32, rounded once at the end (as
    the reference's bf16 kernels do). Depthwise convolutions split their taps. Subclasses
    that compute their weight in their own forward (timm's weight-standardized
    ScaledStdConv2d) keep it: splitting their raw weight would compute something else."""
    target = copy.deepcopy(model)
    plain = (nn.Conv2d.forward, nn.Linear.forward)
    split: dict[type, type] = {}  # one subclass per class (torch.func.stack_module_state)
    for m in target.modules():
        if type(m).forward not in plain or stored_weight(m)[0].numel() < 2:
            continue
        cls = type(m)
        if cls in split:
            m.__class__ = split[cls]
            continue

        def forward(self, x, _cls=cls):
            if torch._C._functorch.maybe_current_level() is not None:  # a transform runs
                return _cls.forward(self, x)
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

        split[cls] = m.__class__ = type(f"Split{cls.__name__}", (cls,), {"forward": forward})
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


def decomposed_functionals(
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


def with_functionals(m: nn.Module, functionals: dict, tag: str) -> None:
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
    functionals = decomposed_functionals()
    for m in target.modules():
        if isinstance(m, NORM_TYPES):
            with_functionals(m, functionals, "Decomposed")
    return target


# fp32 elements per vector instruction (256 bytes) on an Ascend AI core's vector unit
LANES = 64


def _lane_sums(t: torch.Tensor) -> torch.Tensor:
    """Row sums of fp32 `t` (rows, n) as a vector unit forms them: each of LANES lanes adds
    its share of the row in one chain, in fp32, then the lanes are summed."""
    rows, n = t.shape
    blocks = F.pad(t, (0, -n % LANES)).view(rows, -1, LANES)
    acc = torch.zeros(rows, LANES, dtype=torch.float32, device=t.device)
    for k in range(blocks.shape[1]):
        acc = acc + blocks[:, k]
    return acc.sum(1)


class _OnePassBatchNorm(torch.autograd.Function):
    """A training BatchNorm whose statistics are a sum and a sum of squares per channel
    (`_lane_sums`), the variance E[x^2] - mean^2, and whose backward takes its two sums
    the same way: Ascend's BatchNormReduce / BatchNormUpdate pair. Returns y and, not
    differentiable, the batch mean and biased variance (for the running statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        channels, moved = x.shape[1], (x.shape[0], *x.shape[2:])
        xs = x.float().transpose(0, 1).reshape(channels, -1)
        n = xs.shape[1]
        mean = _lane_sums(xs) / n
        variance = (_lane_sums(xs * xs) / n - mean * mean).clamp_min(0)
        rstd = torch.rsqrt(variance + eps)
        x_hat = (xs - mean[:, None]) * rstd[:, None]
        ctx.save_for_backward(x_hat, rstd, weight)
        ctx.moved = moved
        ctx.mark_non_differentiable(mean, variance)
        y = x_hat * weight.float()[:, None] + bias.float()[:, None]
        y = y.reshape(channels, *moved).transpose(0, 1)
        # a copy, not a view: the caller may update it in place
        return y.to(x.dtype).clone(memory_format=torch.contiguous_format), mean, variance

    @staticmethod
    def backward(ctx, dy, _mean, _variance):
        x_hat, rstd, weight = ctx.saved_tensors
        channels, n = x_hat.shape
        ds = dy.float().transpose(0, 1).reshape(channels, -1)
        grad_bias, grad_weight = _lane_sums(ds), _lane_sums(ds * x_hat)
        grad = ds - grad_bias[:, None] / n - x_hat * (grad_weight[:, None] / n)
        grad = grad * (weight.float() * rstd)[:, None]
        grad = grad.reshape(channels, *ctx.moved).transpose(0, 1).to(dy.dtype)
        return grad, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


_TORCH_BATCH_NORM = F.batch_norm


def one_pass_batch_norm(
    x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    """F.batch_norm with a training call's statistics formed in one pass (`_OnePassBatchNorm`);
    others are torch's own."""
    if not training or weight is None or bias is None or x.numel() == x.shape[1]:
        args = (running_mean, running_var, weight, bias, training, momentum, eps)
        return _TORCH_BATCH_NORM(x, *args)
    y, mean, variance = _OnePassBatchNorm.apply(x, weight, bias, eps)
    if running_mean is not None and momentum is not None:
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
            unbiased = (variance * n / max(n - 1, 1)).to(running_var.dtype)
            running_var.mul_(1 - momentum).add_(momentum * unbiased)
    return y


def one_pass_norms(model: nn.Module) -> nn.Module:
    """A copy of `model` whose BatchNorms form their statistics in one pass on a vector
    unit, as Ascend's do (aclnnBatchNormReduce: hicann/ops-nn norm/bn_training_reduce):
    each channel's sum and sum of squares in fp32, LANES lanes each summing its share in
    one chain; the variance E[x^2] - mean^2; the backward's sums of dy and dy x_hat alike.
    Honest: the same layer, summed in another order and formed by another algorithm."""
    target = copy.deepcopy(model)
    for m in target.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with_functionals(m, {"batch_norm": one_pass_batch_norm}, "OnePass")
    return target
