"""align.check's report on a divergence that no module causes on its own."""

import copy

import torch
from torch import nn

import align


def test_a_relu_flipped_by_honest_rounding_is_named_a_discontinuity():
    """One pre-activation is -5e-7 on the reference; the target's bias is 1e-6 higher (far
    below the fp32 floor on that layer's output): its ReLU lets that gradient through. The
    whole network diverges from there, yet no module is wrong on its own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(2, 4)
    with torch.no_grad():
        model[0].bias[0] -= model[0](x[:1])[0, 0] + 5e-7
    target = copy.deepcopy(model)
    with torch.no_grad():
        target[0].bias[0] += 1e-6
    report = align.check(model, x, target_model=target, target="cpu", draws=0)
    assert not report.passed
    assert report.first_divergence.module == "1" and report.first_divergence.phase == "backward"
    assert report.culprits == []
    assert any("discontinuity" in note for note in report.notes), report.notes


def test_compare_of_a_case_dump_uses_the_golden_tolerance():
    from align.golden import load_golden

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
