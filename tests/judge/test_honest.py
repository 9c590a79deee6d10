"""The default verdict on models nobody calibrated (align.testing): train mode, BatchNorm
over 1x1 maps, dropout and drop-path on. Honest targets of several kinds pass; faults
hidden behind a discontinuity or a random draw are caught and named.

bench/verdict_catalogue.py runs the same on larger timm models and prints the totals.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import align
from align.testing import FAULTS, USER_MODELS, one_pass_norms, perturb
from align.testing.honest import stored_weight

timm = pytest.importorskip("timm")

PRECISIONS = ("fp32", "amp-bf16")
# 32 px: the last stage's maps are 1x1, so its BatchNorms normalize 2 values per channel
MODELS = {"test_resnet": 32, "test_efficientnet": 32}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: verdicts reproducible


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, drop_rate=0.3, drop_path_rate=0.2).train()
    head = model.pretrained_cfg["classifier"]  # timm's head dropout is functional: add a module
    setattr(model, head, nn.Sequential(nn.Dropout(0.3), getattr(model, head)))
    size = MODELS[name]
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def honest(model: nn.Module, kind: str) -> nn.Module:
    if kind == "channels_last":
        return copy.deepcopy(model).to(memory_format=torch.channels_last)
    if kind == "one_pass_norm":
        return one_pass_norms(model)
    return perturb(model, {"half_ulp": 0.5, "one_ulp": 1.0}[kind])


def check(model, x, target, precision):
    return align.check(model, x, target_model=target, target="cpu", precision=precision)


@pytest.mark.parametrize("kind", ["half_ulp", "one_ulp", "channels_last", "one_pass_norm"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_an_honest_target_passes(name, precision, kind):
    model, x = build(name)
    report = check(model, x, honest(model, kind), precision)
    assert report.passed, str(report)


def test_a_one_pass_batch_norm_far_from_zero_mean_passes_and_a_wrong_eps_is_named():
    """A BatchNorm forming its statistics as Ascend's does (a sum and a sum of squares per
    channel, the variance E[x^2] - mean^2) is 1.7e-4 off at mean / std 60, 100x torch's
    kernel: honest draws move their statistics so too (align.numerics.one_pass), or the
    whole network and the training fail it. A kernel with eps 1e-2 is still named."""
    model, x = USER_MODELS["offset_norm"]()  # mean / std about 60
    for phases in ("forward,backward", "train"):
        report = align.check(model, x, target_model=one_pass_norms(model), phases=phases)
        assert report.passed, str(report)
    faulty = one_pass_norms(model)
    FAULTS["norm_eps"](faulty, "bn")
    report = align.check(model, x, target_model=faulty, target="cpu")
    assert [c.module for c in report.culprits] == ["bn"], str(report)


def _first(model: nn.Module, kind: type[nn.Module]) -> str:
    return next(n for n, m in model.named_modules() if type(m) is kind)


def _last(model: nn.Module, kind: type[nn.Module]) -> str:
    return [n for n, m in model.named_modules() if type(m) is kind][-1]


# fault -> where it goes: found by type, so the test follows the model, not a name list
SITES = {
    "activation": lambda m: _first(m, nn.ReLU) if _has(m, nn.ReLU) else _first(m, nn.SiLU),
    "moved_breakpoint": lambda m: _first(m, nn.ReLU),
    "dropout_scale": lambda m: _last(m, nn.Dropout),
    "output_offset": lambda m: _first(m, nn.Conv2d),  # thousands of elements share it
}


def _has(model: nn.Module, kind: type[nn.Module]) -> bool:
    return any(type(m) is kind for m in model.modules())


def _cases():
    for name in MODELS:
        model, _ = build(name)
        for fault, site in SITES.items():
            try:
                where = site(model)
            except (StopIteration, IndexError):
                continue  # the model has no module of that kind
            for precision in PRECISIONS:
                yield pytest.param(name, precision, fault, where, id=f"{name}-{precision}-{fault}")


@pytest.mark.parametrize("name,precision,fault,where", list(_cases()))
def test_a_fault_behind_a_discontinuity_is_caught_and_named(name, precision, fault, where):
    model, x = build(name)
    target = copy.deepcopy(model)
    FAULTS[fault](target, where)
    report = check(model, x, target, precision)
    assert not report.passed, str(report)
    assert report.culprits and report.culprits[0].module == where, str(report)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_a_weight_through_fp16_goes_into_a_parametrized_layers_stored_weight(norm):
    # weight norm stores a magnitude and a direction (original0, original1): the fault
    # raised AttributeError on `original`, and stopped a catalogue
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        getattr(torch.nn.utils.parametrizations, norm)(torch.nn.Linear(8, 4))
    )
    before = model[0].weight.detach().clone()
    FAULTS["weight_via_fp16"](model, "0")
    stored = stored_weight(model[0])
    assert stored.shape == (4, 8) and torch.equal(stored, stored.half().float())
    assert not torch.equal(model[0].weight, before)
