"""align.judge.steps' judgment of a recorded step's state (its loop-level tests, with real
training scripts, are in tests/record/test_loop.py)."""

from __future__ import annotations

import pytest
import torch

from align.errors import MismatchError
from align.judge.steps import _state_row
from align.numerics.verdict import NOISY_GRADIENT_MESSAGE, Tolerance
from align.record.loop_dump import Step
from align.record.trace import Trace

KEY = "optim/0/fc.weight/exp_avg"


def _step(value: torch.Tensor) -> Step:
    return Step(0, 0, Trace([], {}), {KEY: value, "param/fc.weight": value}, {})


def _sides(target_error: float):
    """Golden, reference 1e-6 off and a target `target_error` off, every element alike."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(256, generator=gen, dtype=torch.float64)
    noise = torch.randn(256, generator=gen, dtype=torch.float64)
    return [_step((g + scale * noise).float()) for scale in (1e-6, target_error)] + [_step(g)]


def _row(ref, tgt, gold, noisy=frozenset(), key=KEY):
    return _state_row(
        ref, tgt, gold, [], Tolerance(k=2.0), True, "fc", "optimizer", "exp_avg", key, key,
        noisy=noisy,
    )  # fmt: skip


def test_the_state_of_a_parameter_that_took_a_gradient_without_signal_is_not_judged():
    """An optimizer's state that summed a gradient of pure noise (an honest target's noise
    20x the reference's, measured on ghostnet_050) is reported, not failed; another
    parameter's, or a shape that differs, still fails."""
    ref, tgt, gold = _sides(1e-4)
    assert _row(ref, tgt, gold).failed
    excused = _row(ref, tgt, gold, noisy={"fc.weight"})
    assert not excused.failed and excused.message == NOISY_GRADIENT_MESSAGE
    assert _row(ref, tgt, gold, noisy={"fc.weight"}, key="param/fc.weight").message == (
        NOISY_GRADIENT_MESSAGE
    )
    assert _row(ref, tgt, gold, noisy={"fc.bias"}).failed
    tgt.state[KEY] = torch.cat([tgt.state[KEY], tgt.state[KEY]]).reshape(2, 256)
    with pytest.raises(MismatchError, match="shape"):  # a mismatch, never excused
        _row(ref, tgt, gold, noisy={"fc.weight"})
