"""align.check end to end: a divergence no module causes on its own; fp16 loss scaling."""

import copy

import pytest
import torch
from torch import nn

import align
from align.errors import AlignError


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
