"""Fault injection: small timm models with one known fault in a copy used as the target.

Every fault must make the report fail AND be localized: `report.culprits[0].module` is the
qualified name of the faulty module. Targets that differ from the reference only by
device-like rounding (HF32 emulation, channels_last kernels) must pass.

Faults are injected into a deep copy (`target_model=`), never into the reference model.
Forward overrides swap the module's class for a subclass, so they survive the deep copies
align makes of the target (an instance-attribute forward is tested on its own below).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import align

timm = pytest.importorskip("timm")

PRECISIONS = ("fp32", "amp-bf16")
BATCH = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """CPU reductions depend on the thread count: pin it, so verdicts are reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- faults ---------------------------------------------------------------------------------


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


# -- models ---------------------------------------------------------------------------------


@dataclass
class Model:
    name: str
    faults: dict[str, str]  # fault -> the module it goes into
    kwargs: dict = field(default_factory=dict)
    size: int = 64  # 32 px leaves 1x1 maps in mobilenetv3: bf16 BN gradients become noise
    extra: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (fault, module)
    # faults that are no fault at amp-bf16 for this model, with the reason (see below)
    bf16_not_a_fault: dict[str, str] = field(default_factory=dict)


MODELS = {
    m.name: m
    for m in (
        # BasicBlocks without zero-initialized last BN, so residual faults propagate
        Model(
            "resnet18",
            {
                "kernel_gain": "layer2.0.conv1",
                "weight_via_fp16": "layer1.1.conv2",
                "norm_gain": "layer3.0.bn1",  # BatchNorm2d
                "activation": "layer2.1.act1",  # ReLU -> leaky ReLU
                "fp16_kernel": "fc",  # Linear
                "norm_eps": "layer1.0.bn2",  # BatchNorm2d
                "backward_gain": "layer3.1.conv1",
            },
            kwargs={"zero_init_last": False},
            # a container: its own computation is the residual add and the block's output
            extra={"backward_gain_block": ("backward_gain", "layer3.1")},
        ),
        # BatchNormAct2d (a non-leaf module computing itself), Hardswish, SE with Hardsigmoid
        Model(
            "mobilenetv3_small_100",
            {
                "kernel_gain": "blocks.1.0.conv_pw",
                "weight_via_fp16": "blocks.2.0.conv_pwl",
                "norm_gain": "blocks.1.0.bn2",  # BatchNormAct2d
                "activation": "blocks.3.0.bn1.act",  # Hardswish inside BatchNormAct2d
                "fp16_kernel": "blocks.2.0.conv_pw",  # a conv mid-network
                "norm_eps": "blocks.2.1.bn1",  # BatchNormAct2d
                "backward_gain": "blocks.1.0.conv_dw",  # depthwise
            },
        ),
        # timm's small EfficientNet: SiLU, SE with Sigmoid, EdgeResidual, BatchNormAct2d
        Model(
            "test_efficientnet",
            {
                "kernel_gain": "blocks.2.0.conv_exp",
                "weight_via_fp16": "blocks.1.0.conv_pwl",
                "norm_gain": "blocks.3.0.bn2",
                "activation": "blocks.2.0.bn1.act",  # SiLU inside BatchNormAct2d
                "fp16_kernel": "classifier",  # Linear
                "norm_eps": "bn1",
                "backward_gain": "blocks.3.0.conv_pwl",
            },
        ),
        # timm's small ViT: LayerNorm, GELU, attention
        Model(
            "test_vit",
            {
                "kernel_gain": "blocks.0.attn.qkv",
                "weight_via_fp16": "blocks.0.mlp.fc2",
                "norm_gain": "blocks.0.norm2",  # LayerNorm
                "activation": "blocks.0.mlp.act",  # GELU erf -> tanh approximation
                "fp16_kernel": "blocks.1.attn.proj",
                "norm_eps": "blocks.1.norm1",  # LayerNorm
                "backward_gain": "blocks.0.mlp.fc1",
            },
            kwargs={"img_size": 32},
            size=32,
            bf16_not_a_fault={
                # tanh-GELU differs from erf-GELU by at most 4.7e-4 (relative RMS 2e-4 on
                # N(0,1) inputs), 8x below bf16's own rounding of the output (1.7e-3): it is
                # the approximation bf16 kernels use, not a fault at this precision.
                "activation": "GELU tanh approximation is below bf16 resolution",
            },
        ),
    )
}

_BUILT: dict[str, tuple[nn.Module, torch.Tensor]] = {}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The reference model (train mode, no dropout) and its inputs; built once."""
    if name not in _BUILT:
        spec = MODELS[name]
        torch.manual_seed(0)
        model = timm.create_model(
            name,
            pretrained=False,
            num_classes=10,
            drop_rate=0.0,
            drop_path_rate=0.0,
            **spec.kwargs,
        ).train()
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(BATCH, 3, spec.size, spec.size, generator=gen)
        _BUILT[name] = (model, x)
    return _BUILT[name]


def check(model, x, target, precision, phases=("forward", "backward"), **kw):
    return align.check(
        model,
        x,
        target_model=target,
        reference="cpu",
        target="cpu",
        precision=precision,
        phases=phases,
        **kw,
    )


def faulty(name: str, fault: str, where: str) -> tuple[nn.Module, torch.Tensor, nn.Module]:
    model, x = build(name)
    target = copy.deepcopy(model)
    FAULTS[fault](target, where)
    return model, x, target


def describe(report) -> str:
    culprits = "\n".join(f"  culprit {c}" for c in report.culprits[:5]) or "  no culprit"
    return f"{culprits}\n  first divergence {report.first_divergence}\n  notes {report.notes}"


# -- expected outcomes ------------------------------------------------------------------------

# Faults no verdict can flag under amp-bf16, because the target is as accurate as (or more
# accurate than) the reference at that precision. Instead, the check must pass.
NOT_A_FAULT_UNDER_BF16 = {
    # Autocast rounds the weight to bf16 (8 significant bits) before the conv; rounding it
    # to fp16 (11 bits) first changes the bf16 value only at double-rounding ties, so the
    # target computes (almost) exactly what the reference computes.
    "weight_via_fp16": "fp16 rounding is invisible through bf16 rounding",
    # fp16 keeps 3 more significant bits than bf16: the target kernel is *more* accurate
    # than the reference's bf16 autocast kernel (values here are far from fp16's range).
    "fp16_kernel": "an fp16 kernel is more accurate than bf16 autocast",
}

# False alarms of the verdict, measured on this suite (1 thread, x86 CPU): targets that are as
# accurate as the reference but fail. They are verdict weaknesses reported to the lead, not
# faults; each names the failing tensor with value > limit (reference's own value).
# Not strict: rounding differs between CPUs, so a false alarm may not fire elsewhere.
_ZERO_GRAD = (
    "false alarm, mathematically zero gradient: {what} is exactly 0 in exact arithmetic (the "
    "BN feeds a 1x1 conv and a train-mode BN, whose input gradient has zero mean per "
    "channel), so golden is ~0 and rel_rmse compares two summation orders' roundoff: {numbers}"
)
_SMALL = (
    "false alarm, k times one draw of the reference's error: {numbers}; the target is no "
    "less accurate (same precision, another summation order), but the ratio of two draws of "
    "a propagated error on a small or low-rank tensor exceeds k"
)
_COS = (
    "false alarm, cos_err limit from the reference's cos_err only: {numbers}; the "
    "reference's ~20% error happens to lie along the golden (a gain, cos_err ~0), the "
    "target's equal error does not; the limit should allow ~k^2 rel_rmse_ref^2 / 2"
)
SE_BIAS_BF16 = (
    "blocks.0.0.se.conv_reduce param_grad bias (8 elements): cos_err {cos} > limit 0.00271 "
    "(reference 0.000301) while rel_rmse {rel} (reference 0.196, limit 0.588)"
)
_SHARE = (
    "false alarm (isolation), share floor: {numbers}; with no outlier on the reference the "
    "share limit is the bare floor 0.1%, which does not grow with a target error that is "
    "within k on rel_rmse"
)
KNOWN_FALSE_ALARMS = {
    ("resnet18", "amp-bf16", "emulate"): _SHARE.format(
        numbers="a false culprit, conv1 backward grad_input[0] (2x3x64x64, ATen's own bf16 "
        "conv backward vs oneDNN's): share 0.00122 > limit 0.001 (reference 0) while rel_rmse "
        "0.00502 < limit 0.007 (reference 0.00233)"
    ),
    ("mobilenetv3_small_100", "fp32", "emulate"): _SMALL.format(
        numbers="blocks.3.1.bn2.act backward grad_input[0] (2x144x4x4, whole network, HF32 "
        "on both sides): max_rel 0.114 > limit 0.106 (reference 0.0264); blocks.3.1.bn2 "
        "param_grad weight (144): max_rel 0.0805 > 0.0754 (reference 0.0188)"
    ),
    ("mobilenetv3_small_100", "fp32", "channels_last"): _ZERO_GRAD.format(
        what="blocks.0.0.bn2.bias's gradient",
        numbers="rel_rmse 1.05e9 > limit 9.26e8 (reference 4.63e8); also "
        + _SMALL.format(
            numbers="blocks.0.0.se.conv_expand backward grad_input[0] (16 elements): cos_err "
            "1.89e-10 > limit 1.46e-10 (reference 2.4e-11); blocks.1.1.bn1 param_grad weight "
            "(88): cos_err 1.53e-4 > 1.3e-4 (reference 3.26e-5)"
        ),
    ),
    ("mobilenetv3_small_100", "amp-bf16", "channels_last"): _ZERO_GRAD.format(
        what="blocks.4.2.bn3.bias's gradient",
        numbers="rel_rmse 8.55e12 > limit 7.69e12 (reference 2.56e12); also "
        + _COS.format(numbers=SE_BIAS_BF16.format(cos="0.00464", rel="0.199")),
    ),
    ("test_efficientnet", "amp-bf16", "channels_last"): _ZERO_GRAD.format(
        what="blocks.4.0.bn3.bias's gradient",
        numbers="rel_rmse 1.16e13 > limit 8.23e12 (reference 2.74e12)",
    ),
    # the fp16 conv is more accurate in isolation (output rel_rmse 0.0017 vs 0.0024), but
    # its different rounding changes the propagated bf16 noise upstream
    ("mobilenetv3_small_100", "amp-bf16", "fp16_kernel"): _COS.format(
        numbers=SE_BIAS_BF16.format(cos="0.0104", rel="0.221")
    ),
}


def _marks(*key) -> list:
    reason = KNOWN_FALSE_ALARMS.get(key)
    return [pytest.mark.xfail(reason=reason, strict=False)] if reason else []


def cases():
    for name, spec in MODELS.items():
        faults = {f: (f, where) for f, where in spec.faults.items()} | spec.extra
        for precision in PRECISIONS:
            for fid, (fault, where) in faults.items():
                yield pytest.param(
                    name,
                    precision,
                    fault,
                    where,
                    id=f"{name}-{precision}-{fid}",
                    marks=_marks(name, precision, fid),
                )


@pytest.mark.parametrize("name,precision,fault,where", list(cases()))
def test_fault_is_caught_and_localized(name, precision, fault, where):
    model, x, target = faulty(name, fault, where)
    report = check(model, x, target, precision)
    not_a_fault = NOT_A_FAULT_UNDER_BF16 | MODELS[name].bf16_not_a_fault
    if precision == "amp-bf16" and fault in not_a_fault:
        assert report.passed, describe(report)
        if fault == "fp16_kernel":  # in isolation the fp16 kernel beats the bf16 reference
            own = [r for r in report.local_rows if r.module == where and r.tensor == "output[0]"]
            assert own, "the faulty module was not isolated"
            for r in own:
                assert r.metrics["rel_rmse"] < r.reference["rel_rmse"], r
        return
    assert not report.passed, describe(report)
    assert report.culprits, describe(report)
    assert report.culprits[0].module == where, describe(report)
    assert report.culprits[0].isolated


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_backward_fault_is_invisible_to_the_forward_phase(name, precision):
    where = MODELS[name].faults["backward_gain"]
    model, x, target = faulty(name, "backward_gain", where)
    report = check(model, x, target, precision, phases=("forward",))
    assert report.passed, describe(report)
    assert "the target reproduced the reference bit for bit" in report.notes


# -- targets that must pass -----------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_clean_copy_passes(name, precision):
    model, x = build(name)
    report = check(model, x, copy.deepcopy(model), precision)
    assert report.passed, describe(report)
    assert report.first_divergence is None and not report.culprits


def noise_cases():
    for name in MODELS:
        for precision in PRECISIONS:
            for kind in ("emulate", "channels_last"):
                yield pytest.param(
                    name,
                    precision,
                    kind,
                    id=f"{name}-{precision}-{kind}",
                    marks=_marks(name, precision, kind),
                )


@pytest.mark.parametrize("name,precision,kind", list(noise_cases()))
def test_device_like_noise_passes(name, precision, kind):
    model, x = build(name)
    if kind == "emulate":  # HF32 convs, other kernels on the target; the reference emulates too
        report = check(model, x, None, precision, emulate="npu-fp32")
        assert report.meta["emulate"] == "npu-fp32"
    else:
        target = copy.deepcopy(model).to(memory_format=torch.channels_last)
        report = check(model, x, target, precision)
    assert report.passed, describe(report)


# -- a forward patched on the instance ------------------------------------------------------


def test_forward_patched_on_the_instance_is_localized():
    model, x = build("resnet18")
    target = copy.deepcopy(model)
    conv = module(target, "layer2.0.conv1")

    def forward(self, inp):
        return type(self).forward(self, inp) * 1.003

    conv.forward = forward.__get__(conv)  # a bound method: deep copies rebind it
    report = check(model, x, target, "fp32")
    assert not report.passed
    assert report.first_divergence.module == "layer2.0.conv1"
    assert report.culprits and report.culprits[0].module == "layer2.0.conv1", describe(report)


def test_faults_leave_the_reference_model_alone():
    """The suite's own hygiene: faults go into copies; the built reference stays clean."""
    for name in MODELS:
        model, _ = build(name)
        for m in model.modules():
            assert type(m).__module__.split(".")[0] in ("timm", "torch"), type(m)
            assert "forward" not in m.__dict__
        assert not math.isclose(sum(float(p.detach().sum()) for p in model.parameters()), 0.0)
