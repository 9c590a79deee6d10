"""Short-train alignment: a clean target passes; optimizer and loss-scaling faults fail and
say which step and quantity diverged."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import align
from align.training import TrainOptions


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).train()


X = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
Y = torch.arange(8) % 5


def _loss(out, inputs):
    return F.cross_entropy(out if out.dtype == torch.float64 else out.float(), Y.to(out.device))


def _check(precision="fp32", target=None, steps=6, **kw):
    return align.check(
        _net(),
        X,
        target="cpu",
        precision=precision,
        phases=("train",),
        steps=steps,
        loss_fn=_loss,
        train_options=TrainOptions(lr=0.05),
        target_train_options=target,
        **kw,
    )


@pytest.mark.parametrize("precision", ["fp32", "amp-bf16"])
def test_clean_target_passes(precision):
    report = _check(precision)
    assert report.passed, str(report)
    assert report.train["steps_run"] == 6
    first = report.train["steps"][0]["loss"]
    assert first["golden"] == pytest.approx(first["reference"], rel=1e-2)


def test_clean_emulated_target_passes():
    report = _check(emulate="npu-fp32")
    assert report.passed, str(report)


@pytest.mark.parametrize(
    "fault, quantity",
    [
        (dict(momentum=0.8), "update_norm"),  # another momentum: the second update differs
        (dict(norm_decay=True, weight_decay=0.05), "update_norm"),  # decay on norm params
    ],
)
def test_optimizer_faults_fail_naming_step_and_quantity(fault, quantity):
    report = _check(target=dataclasses.replace(TrainOptions(lr=0.05), **fault))
    assert not report.passed
    first = report.first_divergence
    assert first.phase == "train" and quantity in first.metric
    assert first.tensor.startswith("step ")
    assert "step" in str(report) and quantity in str(report)


def test_loss_scale_not_unscaled_before_clipping_fails():
    good = TrainOptions(lr=0.05, clip_grad=1.0)
    bad = dataclasses.replace(good, unscale_before_clip=False)
    clean = align.check(
        _net(),
        X,
        target="cpu",
        precision="amp-fp16",
        phases=("train",),
        steps=3,
        loss_fn=_loss,
        train_options=good,
    )
    assert clean.passed, str(clean)
    report = align.check(
        _net(),
        X,
        target="cpu",
        precision="amp-fp16",
        phases=("train",),
        steps=3,
        loss_fn=_loss,
        train_options=good,
        target_train_options=bad,
    )
    assert not report.passed
    assert report.first_divergence.tensor == "step 0 update_norm"
