"""align.check end to end: a divergence no module causes on its own; fp16 loss scaling."""

import copy

import pytest
import torch
from torch import nn

import align
from align.errors import AlignError
from align.numerics.verdict import HEADROOM_MESSAGE
from align.testing.models import BoxLoss, box_inputs


def test_a_relu_flipped_by_honest_rounding_takes_the_references_branch():
    """One pre-activation is -5e-7 on the reference; the target's bias is 1e-6 higher (far
    below the fp32 floor on that layer's output): on its own its ReLU would let that
    gradient through and the whole network would diverge from there. The flip is a
    decision replayed from the reference (align.numerics.decisions), reported with its distance
    from the breakpoint, and the check passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(2, 4)
    with torch.no_grad():
        model[0].bias[0] -= model[0](x[:1])[0, 0] + 5e-7
    target = copy.deepcopy(model)
    with torch.no_grad():
        target[0].bias[0] += 1e-6
    report = align.check(model, x, target_model=target, target="cpu", draws=0)
    assert report.passed, str(report)
    note = next(n for n in report.notes if "target would have made" in n)
    assert "relu 1 of 16" in note, note
    a_leak = copy.deepcopy(target)  # the same flip, and a leaky slope: still a fault
    a_leak[1] = nn.LeakyReLU(0.01)
    assert not align.check(model, x, target_model=a_leak, target="cpu", draws=0).passed


def test_compare_of_a_case_dump_uses_the_golden_tolerance():
    from align.zoo.golden import load_golden

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(2, 4)
    ref, tgt = (align.capture(model, x) for _ in range(2))
    gold = align.capture(model, x, precision="fp64")
    plain = align.compare(ref, tgt, gold)
    assert plain.meta["tolerance"]["k"] == 2.0  # the fp32 default
    ref.meta["case"] = "resnet50"  # what `python -m align.dump resnet50` records
    report = align.compare(ref, tgt, gold)
    assert report.meta["tolerance"] == load_golden("resnet50").tolerance("forward", "fp32")


def test_fp16_gradients_that_overflow_the_check_loss_scale_back_it_off():
    """amp-fp16 checks scale the loss (2^12) so small gradients do not underflow; where the
    reference's scaled gradients overflow fp16 instead (65504), every run backs off to a
    scale that fits, as a GradScaler would, rather than refusing a NaN reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.mul_(2000.0)  # input gradients of ~100: x 4096 overflows fp16
    x = torch.randn(8, 16)
    report = align.check(model, x, target="cpu", precision="amp-fp16")
    assert report.passed, report
    assert report.meta["loss_scale"] < 2.0**12
    assert any("overflowed" in n for n in report.notes)
    assert align.check(model, x, target="cpu", precision="amp-bf16").meta["loss_scale"] == 1.0


def test_fp16_gradients_that_overflow_even_unscaled_are_a_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.mul_(1e7)  # input gradients of ~1e6: past fp16's 65504 at any scale
    with pytest.raises(AlignError, match="overflow torch.float16 even unscaled"):
        align.check(model, torch.randn(8, 16), target="cpu", precision="amp-fp16")


class _NanUnderBf16(torch.autograd.Function):
    """Identity whose backward makes NaN from a finite bf16 gradient, as the CPU's bf16
    Conv3d weight gradient did in timm's lambda_resnet26t."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.nan if grad.dtype == torch.bfloat16 else grad


class _FlakyAtBf16(nn.Module):
    def forward(self, x):
        return _NanUnderBf16.apply(x)


def test_nan_a_bf16_kernel_makes_from_finite_values_names_the_call_and_is_no_overflow():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), _FlakyAtBf16(), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(8, 16)
    assert align.check(model, x, target="cpu", precision="fp32").passed
    made = r"made NaN at amp-bf16 from finite values in 1 grad_input\[0\]"
    with pytest.raises(AlignError, match=made) as e:
        align.check(model, x, target="cpu", precision="amp-bf16")
    assert "overflow " not in str(e.value) and "at fp32" in str(e.value)


def test_a_target_overflowing_where_unscaled_fp16_gradients_near_the_limit_is_no_signal():
    """Unscaled fp16 gradients within 16x of 65504 on the reference: an honest device may
    overflow there (a kernel's intermediate sum past the limit), and its Inf reaches every
    gradient after it; those tensors are reported, not failed. A backward 30x too large
    still fails, with its finite elements, and is named alone."""
    from align.testing.faults import _GradGain
    from align.testing.honest import override_forward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.mul_(5e4)  # gradients up to ~1.4e4: within 16x of fp16's largest
    x = torch.randn(8, 16)
    checked = {}
    wraps = (
        ("overflows", lambda t: _OverflowPast.apply(t, 2000.0), 1),
        ("30x", lambda t: _GradGain.apply(t, 30.0), 2),
    )
    for kind, wrap, module in wraps:
        target = copy.deepcopy(model)
        base = type(target[module]).forward
        override_forward(target[module], lambda self, x, b=base, w=wrap: w(b(self, x)), kind)
        checked[kind] = align.check(
            model, x, target_model=target, target="cpu", precision="amp-fp16"
        )
    honest = checked["overflows"]
    assert honest.passed and honest.meta["loss_scale"] == 1.0, honest
    assert any("come within 16x" in n for n in honest.notes), honest
    assert any(r.message == HEADROOM_MESSAGE for r in honest.rows)
    faulty = checked["30x"]
    assert not faulty.passed and faulty.culprits[0].module == "2", faulty


def test_a_target_overflowing_unscaled_fp16_where_honest_draws_overflow_elsewhere_is_no_signal():
    """The reference's unscaled fp16 gradients stay far below 65504, but an honest draw of
    it overflows (in its first layer's gradients): an honest device may overflow too, here
    at the last layer, and every gradient before it is Inf; reported, not failed."""
    from align.testing.honest import override_forward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    model.append(nn.Linear(16, 4))
    with torch.no_grad():
        model[4].weight.mul_(2e3)  # unscaled gradients ~1e3: beyond 4096 only when scaled
    base = type(model[0]).forward
    override_forward(model[0], lambda self, x: _OverflowInDraws.apply(base(self, x)), "Draws")
    target = copy.deepcopy(model)
    last = type(model[4]).forward
    override_forward(target[4], lambda self, x: _OverflowPast.apply(last(self, x), 0.1), "Tgt")
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    report = align.check(model, x, target_model=target, target="cpu", precision="amp-fp16")
    assert report.passed and report.meta["loss_scale"] == 1.0, report
    assert any("an honest draw overflowed" in n for n in report.notes), report
    assert any(r.message == HEADROOM_MESSAGE for r in report.rows)


class _OverflowInDraws(torch.autograd.Function):
    """A backward that overflows fp16 in an honest draw (under align.numerics.jitter's
    Jitter), exact on the reference."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        from align.numerics.jitter import Jitter

        if any(isinstance(m, Jitter) for m in _get_current_dispatch_mode_stack()):
            return grad.masked_fill(grad.abs() > 0, float("inf"))
        return grad


class _OverflowPast(torch.autograd.Function):
    """A backward that overflows fp16 where the gradient passes `threshold` (an
    intermediate sum past 65504), exact elsewhere."""

    @staticmethod
    def forward(ctx, x, threshold: float):
        ctx.threshold = threshold
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.masked_fill(grad.abs() > ctx.threshold, float("inf")), None


def _boxes_and_image():
    torch.manual_seed(0)
    return BoxLoss(), box_inputs()


def test_an_input_whose_gradient_the_model_makes_nan_is_not_differentiated_and_said_so():
    from align.testing import perturb

    model, inputs = _boxes_and_image()
    report = align.check(model, inputs, target_model=perturb(model, 1.0), target="cpu")
    assert report.passed, report
    assert any("did not differentiate" in n for n in report.notes)
    assert not any("not judged in isolation" in n for n in report.notes), report.notes
    chosen = align.check(model, inputs, target="cpu", grad_inputs=lambda inputs: inputs[0])
    assert chosen.passed and not any("did not differentiate" in n for n in chosen.notes)
    faulty = copy.deepcopy(model)
    with torch.no_grad():
        faulty.lin.weight.mul_(1.001)
    report = align.check(model, inputs, target_model=faulty, target="cpu")
    assert not report.passed and "lin" in {c.module for c in report.culprits}


def test_nan_gradients_of_the_models_own_at_fp32_name_the_tensor_and_do_not_say_overflow():
    model, inputs = _boxes_and_image()
    with pytest.raises(AlignError, match=r"hold NaN or infinity at fp32 \(first: transform "):
        align.check(model, inputs, target="cpu", grad_inputs=lambda inputs: inputs)


def test_a_loss_holding_float32_class_weights_is_checked_against_the_float64_golden():
    # the golden's float64 logits met the loss's float32 weights: "loss_fn raised
    # RuntimeError on cpu at fp64: expected scalar type Double but found Float"
    from align.testing import FAULTS, perturb

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]))
    kw = dict(loss_fn=lambda out, inputs: criterion(out, y), phases="forward,backward,train")
    honest = align.check(model, x, target_model=perturb(model, 1.0), **kw)
    assert honest.passed, honest
    faulty = copy.deepcopy(model)
    FAULTS["weight_grad_gain"](faulty, "0")
    report = align.check(model, x, target_model=faulty, **kw)
    assert not report.passed and report.culprits[0].module == "0", report
