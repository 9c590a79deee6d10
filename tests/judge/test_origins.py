"""Where errors start in a dump comparison, read from the tensors alone (comparison.origins)."""

import copy

import pytest
import torch
from torch import nn

import align
from align.testing import FAULTS, perturb


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.fc(x))


class Net(nn.Module):
    """Two blocks in a container, with code of the parent's own between calls."""

    def __init__(self, between: float = 1.0):
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(16, 4)
        self.between = between

    def forward(self, x):
        return self.head(torch.relu(self.blocks(x)) * self.between)


def _report(target: nn.Module, model: nn.Module) -> align.Report:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    ref = align.capture(model, x)
    gold = align.capture(model, x, precision="fp64", decisions_of=ref)
    tgt = align.capture(target, x, decisions_of=ref)
    return align.compare(ref, tgt, gold)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Net()


def _wrong_forward(module: nn.Module, gain: float) -> None:
    base = module.forward
    module.forward = lambda *a, **k: base(*a, **k) * gain


def test_a_wrong_layer_inside_a_container_is_where_the_error_starts(model):
    target = copy.deepcopy(model)
    _wrong_forward(target.blocks[1].fc, 1.01)
    report = _report(target, model)
    assert not report.passed
    assert [(d.module, d.phase) for d in report.origins][:1] == [("blocks.1.fc", "forward")]
    # neither the block nor the Sequential around it is named for their child's error
    assert not {"blocks.1", "blocks"} & {d.module for d in report.origins}
    assert "errors start at" in str(report)


def test_a_wrong_weight_gradient_starts_at_its_module(model):
    target = copy.deepcopy(model)
    FAULTS["weight_grad_gain"](target, "head")
    report = _report(target, model)
    assert [(d.module, d.phase, d.tensor) for d in report.origins] == [
        ("head", "param_grad", "weight")
    ], str(report)


def test_an_error_of_the_parents_own_code_names_no_module_after_it(model):
    target = copy.deepcopy(model)
    target.between = 1.01  # computed between calls: the head's input is judged, and fails
    report = _report(target, model)
    assert not report.passed
    assert "head" not in {d.module for d in report.origins}, str(report)


def test_an_honest_target_has_no_origin(model):
    report = _report(perturb(model, 0.5), model)
    assert report.passed and report.origins == [], str(report)


def test_a_wrong_running_statistic_is_where_the_error_starts():
    """A BatchNorm whose outputs are exact and whose running variance is not: the dumps'
    comparison fails on the buffer and names the norm (its inputs and past state pass)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    target = copy.deepcopy(model)
    FAULTS["running_var_biased"](target, "1")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = align.capture(model, x)
    gold = align.capture(model, x, precision="fp64", decisions_of=ref)
    report = align.compare(ref, align.capture(target, x, decisions_of=ref), gold)
    assert not report.passed
    failing = [(r.module, r.tensor) for r in report.rows if r.failed]
    assert failing == [("1", "buffer running_var")]
    assert [(d.module, d.tensor) for d in report.origins] == [("1", "buffer running_var")]
    honest = align.compare(ref, align.capture(perturb(model, 1.0), x, decisions_of=ref), gold)
    assert honest.passed, [r for r in honest.rows if r.failed]
