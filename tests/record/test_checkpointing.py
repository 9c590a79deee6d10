"""Activation checkpointing in align's runs and in a recorded training loop: a fault inside
a checkpointed block is named, reentrant or not."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import align
from align.record.checkpointing import plain_checkpoints
from align.testing import FAULTS
from align.testing.models import Checkpointed

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: verdicts reproducible


def test_a_reentrant_checkpoint_calls_its_function_once_with_its_autograd():
    calls = []
    layer = torch.nn.Linear(4, 4)

    def block(x):
        calls.append(torch.is_grad_enabled())
        return layer(x)

    x = torch.randn(2, 4, requires_grad=True)
    with plain_checkpoints():
        checkpoint(block, x, use_reentrant=True).sum().backward()
        with warnings.catch_warnings():  # torch's: no input requires grad
            warnings.simplefilter("ignore", UserWarning)
            out = checkpoint(block, x.detach(), use_reentrant=True)
    assert calls == [True, False]  # once each, not again in backward
    assert x.grad is not None and layer.weight.grad is not None
    assert not out.requires_grad  # as the reentrant checkpoint gives it
    checkpoint(block, x, use_reentrant=True).sum().backward()  # restored on exit
    assert calls[2:] == [False, True]  # under no_grad, then again in backward


def _train(out, fault: str | None, reentrant: bool, **recorder) -> None:
    torch.manual_seed(0)
    model = Checkpointed(reentrant=reentrant).train()
    if fault:
        FAULTS[fault](model, "blocks.1.conv")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    with align.Recorder(model, out, steps=[0, 1], optimizer=opt, **recorder) as rec:
        for step in range(2):
            x, y = (
                torch.randn(2, 3, 16, 16, generator=gen),
                torch.randint(0, 10, (2,), generator=gen),
            )
            with rec.step(step):
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_weight_gradient_fault_in_a_checkpointed_block_is_named_in_a_recorded_loop(
    tmp_path, reentrant
):
    # reentrant: the loss was taken for the backward the checkpoint runs inside backward
    # (a RuntimeError), and either way the module called twice (once again to recompute)
    # had no call that owned its weight gradient: caught, no culprit named
    _train(tmp_path / "ref", None, reentrant)
    _train(tmp_path / "golden", None, reentrant, replay=tmp_path / "ref", golden=True)
    _train(tmp_path / "same", None, reentrant, replay=tmp_path / "ref")
    _train(tmp_path / "off", "weight_grad_gain", reentrant, replay=tmp_path / "ref")
    model = Checkpointed(reentrant=reentrant)
    same = align.compare(tmp_path / "ref", tmp_path / "same", tmp_path / "golden", model=model)
    assert same.passed, str(same)
    off = align.compare(tmp_path / "ref", tmp_path / "off", tmp_path / "golden", model=model)
    assert not off.passed
    assert off.culprits and off.culprits[0].module == "blocks.1.conv", str(off)


def test_a_backward_fault_in_a_reentrant_checkpointed_block_is_named_by_check():
    # before: the blocks' backward went unrecorded in the forward, the re-run of the whole
    # model refused torch.autograd.grad, and no module was isolated
    torch.manual_seed(0)
    model = Checkpointed().train()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    target = copy.deepcopy(model)
    FAULTS["backward_gain"](target, "blocks.1.conv")
    report = align.check(model, x, target_model=target, target="cpu")
    assert report.culprits and report.culprits[0].module == "blocks.1.conv", str(report)


class _UpcastBlock(torch.nn.Module):
    """Attention-like scores normalized in float32 (`softmax(..., dtype=float32)`), as
    LLaMA-style blocks do, under a non-reentrant checkpoint."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.softmax(self.lin(x), -1, dtype=torch.float32).to(x.dtype) * x


def test_a_checkpointed_block_that_upcasts_recomputes_as_it_ran_in_the_golden():
    # the float64 golden kept float64 nowhere in backward: the recomputation's float32
    # softmax differed from the forward's float64 one and torch raised CheckpointError
    torch.manual_seed(0)
    block = _UpcastBlock()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=False)

    model = Net()
    report = align.check(model, torch.randn(4, 8), target_model=copy.deepcopy(model), target="cpu")
    assert report.passed, str(report)


def test_plain_checkpoints_nest_and_interleave_across_threads():
    import threading

    original = torch.utils.checkpoint.CheckpointFunction
    entered, leave = threading.Event(), threading.Event()

    def other():
        with plain_checkpoints():
            entered.set()
            leave.wait(5)

    thread = threading.Thread(target=other)
    thread.start()
    entered.wait(5)
    with plain_checkpoints():
        leave.set()
        thread.join()  # the other thread left first: still patched here
        assert torch.utils.checkpoint.CheckpointFunction is not original
    assert torch.utils.checkpoint.CheckpointFunction is original
