"""align.judge.steps' judgment of a recorded step's state (its loop-level tests, with real
training scripts, are in tests/record/test_loop.py)."""

from __future__ import annotations

import pytest
import torch

from align.errors import MismatchError
from align.judge.steps import _judge_step, _state_row
from align.numerics.verdict import NOISY_ELEMENTS_MESSAGE, NOISY_GRADIENT_MESSAGE, Tolerance
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


def _all(name: str) -> dict[str, torch.Tensor]:
    """Every element of parameter `name` took a gradient without signal."""
    return {name: torch.ones(256, dtype=torch.bool)}


def _row(ref, tgt, gold, noisy=None, key=KEY):
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
    excused = _row(ref, tgt, gold, noisy=_all("fc.weight"))
    assert not excused.failed and excused.message == NOISY_GRADIENT_MESSAGE
    assert _row(ref, tgt, gold, noisy=_all("fc.weight"), key="param/fc.weight").message == (
        NOISY_GRADIENT_MESSAGE
    )
    assert _row(ref, tgt, gold, noisy=_all("fc.bias")).failed
    tgt.state[KEY] = torch.cat([tgt.state[KEY], tgt.state[KEY]]).reshape(2, 256)
    with pytest.raises(MismatchError, match="shape"):  # a mismatch, never excused
        _row(ref, tgt, gold, noisy=_all("fc.weight"))


def _adam_step(grad: torch.Tensor, eps: float = 1e-8) -> Step:
    """A step of Adam from a zero state on `grad`: its trace holds the gradient, its state
    the parameter and moments after the step."""
    param = torch.nn.Parameter(torch.ones(grad.shape))
    opt = torch.optim.Adam([param], lr=1e-3, eps=eps)
    param.grad = grad.float()
    opt.step()
    state = {f"optim/0/fc.weight/{k}": v for k, v in opt.state[param].items() if k != "step"}
    state["param/fc.weight"] = param.detach().clone()
    trace = Trace([], {"g": grad.float()}, param_grads={"fc.weight": "g"})
    return Step(0, 0, trace, state, {"groups": [{"params": ["fc.weight"]}]})


def test_elements_adam_moved_on_a_gradient_without_signal_are_left_out():
    """Adam scales each element's update by its own gradient's size: an element whose
    gradient is all rounding (1e-7 beside 1e-3, after an SE channel gated off) moves by lr
    one way or the other. An honest target whose rounding flips the sign of a few of them
    passes on the other elements; a fault in the optimizer (another eps) still fails."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(512, generator=gen, dtype=torch.float64) * 1e-3
    g[:8] = 1e-7  # all rounding on an fp32 run, yet above Adam's eps
    ref_grad = g + torch.randn(512, generator=gen, dtype=torch.float64) * 1e-6
    tgt_grad = g + torch.randn(512, generator=gen, dtype=torch.float64) * 1e-6
    ref_grad[:8] = g[:8] + 1e-9  # the reference's rounding happened to spare them
    tgt_grad[:8] = -tgt_grad[:8].abs()  # the target's flipped them
    gold, ref, tgt = _adam_step(g), _adam_step(ref_grad), _adam_step(tgt_grad)
    rows = _judge_step(ref, tgt, gold, tol=Tolerance(k=2.0), strict=True, name_map={})
    after = next(r for r in rows if r.phase == "param")
    assert not after.failed and after.message == NOISY_ELEMENTS_MESSAGE, after
    whole = _state_row(ref, tgt, gold, [], Tolerance(k=2.0), True, "fc", "param", "after",
                       "param/fc.weight", "param/fc.weight")  # fmt: skip
    assert whole.failed  # judged on every element, the flips fail
    wrong = _adam_step(tgt_grad, eps=1e-5)
    rows = _judge_step(ref, wrong, gold, tol=Tolerance(k=2.0), strict=True, name_map={})
    failed = {(r.phase, r.tensor) for r in rows if r.failed}
    assert ("param", "group 0 fc.weight after the step") in failed, failed
    assert ("optimizer", "group 0 fc.weight exp_avg_sq") not in failed  # eps is not in it
