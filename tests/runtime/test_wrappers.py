"""align.runtime.wrappers: the user's model inside torch.compile and data parallelism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import align
from align.errors import AlignError
from align.runtime.wrappers import unwrapped, wrapped
from align.testing import perturb


def test_the_model_inside_any_nesting_of_wrappers():
    model = nn.Sequential(nn.Linear(3, 2))
    assert wrapped(model) == (model, False)
    assert wrapped(nn.DataParallel(model)) == (model, False)
    assert wrapped(torch.compile(nn.DataParallel(model), backend="eager")) == (model, True)
    assert unwrapped(nn.DataParallel(torch.compile(model, backend="eager"))) is model


def test_check_reports_a_compiled_model_by_its_own_names_and_says_it_ran_eagerly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    report = align.check(
        torch.compile(model, backend="eager"),
        torch.randn(4, 8),
        target="cpu",
        target_model=perturb(model, 0.5),  # honest: rows to name
    )
    assert report.passed and report.meta["model"] == "Sequential"
    assert {r.module for r in report.rows} == {"0", "1", "2"}
    assert any("compiled (torch.compile): align runs it eagerly" in n for n in report.notes)


def test_a_torchscript_model_is_an_align_error_that_asks_for_the_eager_one(tmp_path):
    # before: register_forward_pre_hook's RuntimeError from inside align.check
    model = nn.Sequential(nn.Linear(8, 4))
    for scripted in (torch.jit.script(model), torch.jit.trace(model, torch.randn(2, 8))):
        with pytest.raises(AlignError, match="TorchScript .* give the eager model"):
            align.check(scripted, torch.randn(2, 8), target="cpu")
        with pytest.raises(AlignError, match="TorchScript"):
            align.Recorder(scripted, tmp_path / "d", steps=[0])
        with pytest.raises(AlignError, match="TorchScript"):  # a scripted child
            align.check(nn.Sequential(scripted, nn.ReLU()), torch.randn(2, 8), target="cpu")


def test_a_lazy_module_not_yet_initialized_is_an_error_and_checks_once_it_is(tmp_path):
    # before: torch's ValueError "Attempted to use an uninitialized parameter" out of
    # align.check and out of the Recorder's first step
    from align.testing import perturb

    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(AlignError, match="LazyConv2d's parameters are not initialized .* once"):
        align.check(model, x, target="cpu")
    with pytest.raises(AlignError, match="not initialized"):
        align.Recorder(model, tmp_path / "d", steps=[0])
    with pytest.raises(AlignError, match="not initialized"):  # a target left lazy
        align.check(
            nn.Sequential(nn.Linear(3, 3)), torch.randn(2, 3), target_model=nn.LazyLinear(3)
        )
    with torch.no_grad():
        model(x)
    report = align.check(model, x, target_model=perturb(model, 0.5), phases="forward,backward")
    assert report.passed and {r.module for r in report.rows} >= {"0", "3"}, report
