"""Isolation (align.judge.isolation): what an isolated call is given."""

import torch

from align.judge.isolation import _Payload, _Replay, statistics_span
from align.numerics.jitter import Jitter
from align.record.trace import Call, Trace


def test_an_honest_draw_isolates_a_container_on_its_childrens_records_as_they_are():
    """A replayed child's outputs are records, not ops of the run: a draw's jitter nudges
    what the container computes, not them (a nudged record adds one rounding to every
    input of the container, and so to the honest spread its limits grow from)."""
    recorded = torch.randn(100)
    feed = torch.randn(1, requires_grad=True)
    with Jitter(3):
        (replayed,) = _Replay.apply(_Payload([recorded], [None]), feed)
        nudged = recorded * 1.0
    assert torch.equal(replayed, recorded)
    assert not torch.equal(nudged, recorded)  # the jitter is on: a computed op is nudged


def _batch_norm_call(dy: torch.Tensor) -> tuple[Trace, Call, torch.Tensor]:
    """A train-mode BatchNorm's call on zero-mean channels, with its exact input gradient."""
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = (x - x.mean((0, 2, 3), keepdim=True)) * 3.0
    bn = torch.nn.BatchNorm2d(4).double()
    xg = x.clone().requires_grad_(True)
    y = bn(xg)
    (dx,) = torch.autograd.grad(y, xg, dy)
    tensors = {"x": x, "y": y.detach(), "dy": dy}
    call = Call("bn", 0, "BatchNorm2d", None, ["x"], ["y"], ["dy"], ["dx"])
    return Trace([call], tensors), call, dx


def test_an_input_gradient_that_cancels_is_allowed_its_grad_outputs_summation_order():
    """A BatchNorm's input gradient is offset by the rounding of mean(dy) and mean(dy x),
    sums of its grad_output carried through the forward gain 1 / 3: where dy is mostly
    a per-channel constant the input gradient cancels it, and the allowance is in dy's
    units; an input gradient that cancels nothing is allowed its own, and a computation
    without statistics none."""
    ran = {"native_batch_norm", "native_batch_norm_backward"}
    noise = torch.randn(8, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    trace, call, dx = _batch_norm_call(10.0 + noise)  # dx keeps only the noise's part
    span = statistics_span(ran, trace, call, "grad_input[0]", dx)
    assert 6.0 < span < 15.0  # rms(dy) / (3 rms(dx)): 10 / 1, less what the gradient keeps
    assert statistics_span(ran, trace, call, "output[0]", trace.tensor("y")) == 1.0
    assert statistics_span({"convolution"}, trace, call, "grad_input[0]", dx) == 0.0
    trace, call, dx = _batch_norm_call(noise)
    assert statistics_span(ran, trace, call, "grad_input[0]", dx) < 1.2  # (its projection)
