"""One-pass statistics draws: sized as one-chain sums, consistent between forward, backward
and what takes the same sums, and as large as a real one-pass kernel's errors."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from align.numerics.one_pass import SUM_ERROR, OnePass
from align.numerics.precision import UNIT_FP32


def _bn_run(x, dy, weight, bias, dtype=torch.float64, layout=torch.contiguous_format, mode=None):
    """A BatchNorm2d's output, input gradient, weight and bias gradients and running
    statistics (from 0 and 1, at momentum 0.1)."""
    bn = nn.BatchNorm2d(x.shape[1]).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    bn = bn.to(memory_format=layout)
    x = x.to(dtype).contiguous(memory_format=layout).requires_grad_(True)
    with mode or contextlib.nullcontext():
        y = bn(x)
        grads = torch.autograd.grad(y, [x, bn.weight, bn.bias], dy.to(dtype))
    return (y.detach(), *grads, bn.running_mean, bn.running_var)


def _channel_offsets(t: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Each channel's mean error, in sqrt(n) fp32 roundoffs of the exact tensor's RMS."""
    error = t.double() - exact
    dims = [d for d in range(t.dim()) if d != 1]
    n = t.numel() / t.shape[1]
    return error.mean(dims) / exact.pow(2).mean().sqrt() / math.sqrt(n) / UNIT_FP32


def _inputs(mean_over_std: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 16, 16, 16, generator=gen, dtype=torch.float64) + mean_over_std
    dy = torch.randn(8, 16, 16, 16, generator=gen, dtype=torch.float64) + 0.3
    weight = torch.rand(16, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.rand(16, generator=gen, dtype=torch.float64) - 0.5
    return x, dy, weight, bias


def test_a_batch_norm_mean_is_moved_by_a_one_chain_sum_of_its_terms_rms():
    x, dy, weight, bias = _inputs(6.0)
    exact = _bn_run(x, dy, weight, bias)
    drawn = _bn_run(x, dy, weight, bias, mode=OnePass(3))
    n = x.numel() // x.shape[1]
    rms = x.transpose(0, 1).reshape(16, -1).pow(2).mean(1).sqrt()
    d_mean = (drawn[4] - exact[4]) / 0.1  # the running mean took it at momentum 0.1
    expected = SUM_ERROR * math.sqrt(n) * UNIT_FP32 * rms
    torch.testing.assert_close(d_mean.abs(), expected, rtol=1e-6, atol=0)
    assert 0 < int((d_mean > 0).sum()) < 16  # random signs per channel
    # the output moved by the mean's move over the std, times the weight: the variance's
    # move (one-pass: E[x^2] - mean^2) adds a gain, not an offset
    offset = (drawn[0] - exact[0]).mean((0, 2, 3))
    std = x.transpose(0, 1).reshape(16, -1).std(1, unbiased=False)
    torch.testing.assert_close(offset, -d_mean * weight / std, rtol=1e-3, atol=1e-12)


def test_a_batch_norm_backward_moves_the_sums_its_weight_and_bias_gradients_take():
    """The draw's input gradient is a BatchNorm's backward from the draw's own statistics
    with mean(dy) and mean(dy x_hat) moved by what its bias and weight gradients moved."""
    x, dy, weight, bias = _inputs(0.5)
    exact = _bn_run(x, dy, weight, bias)
    grad_input, grad_weight, grad_bias, running_mean, running_var = _bn_run(
        x, dy, weight, bias, mode=OnePass(1)
    )[1:]
    n = x.numel() // x.shape[1]
    xs, ds = (t.transpose(0, 1).reshape(16, -1) for t in (x, dy))
    mean = running_mean / 0.1  # the draw's statistics, from its running ones
    variance = (running_var - 0.9) / 0.1 * (n - 1) / n
    x_hat = (xs - mean[:, None]) / (variance[:, None] + 1e-5).sqrt()
    d_sum = (grad_bias - exact[3]) / n
    d_dot = (grad_weight - (ds * x_hat).sum(1)) / n
    assert d_sum.abs().min() > 0 and d_dot.abs().min() > 0
    expected = (ds - ds.mean(1, keepdim=True) - d_sum[:, None]) - x_hat * (
        (ds * x_hat).mean(1, keepdim=True) + d_dot[:, None]
    )
    expected = expected * (weight / (variance + 1e-5).sqrt())[:, None]
    got = grad_input.transpose(0, 1).reshape(16, -1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    assert not torch.allclose(grad_input, exact[1], rtol=1e-8, atol=0)


@pytest.mark.parametrize("mean_over_std", [0.2, 6.0, 60.0])
@pytest.mark.usefixtures("one_thread")
def test_a_draw_is_as_far_off_as_the_cpus_one_pass_channels_last_kernel(mean_over_std):
    """The CPU's channels_last BatchNorm sums each channel's mean in one chain: its
    per-channel offsets grow with mean / std. A draw's must be as large (the verdict adds
    its k on top), or an honest one-pass device fails in isolation."""
    x, dy, weight, bias = _inputs(mean_over_std)
    exact = _bn_run(x, dy, weight, bias)
    kernel = _bn_run(x, dy, weight, bias, torch.float32, torch.channels_last)
    drawn = _bn_run(x, dy, weight, bias, mode=OnePass(0))
    for i in (0, 1):  # output, input gradient
        measured = _channel_offsets(kernel[i], exact[i]).pow(2).mean().sqrt()
        allowed = _channel_offsets(drawn[i], exact[i]).pow(2).mean().sqrt()
        assert measured < allowed, (i, float(measured), float(allowed))


@pytest.mark.parametrize(
    "norm, shape",
    [(nn.LayerNorm(32), (4, 6, 32)), (nn.GroupNorm(4, 16), (2, 16, 6, 6))],
    ids=["layer_norm", "group_norm"],
)
def test_layer_and_group_norms_move_each_slice_by_its_own_sums(norm, shape):
    norm = norm.double()
    x = (torch.randn(shape, dtype=torch.float64) + 4).requires_grad_(True)
    dy = torch.randn(shape, dtype=torch.float64)

    def run(mode=None):
        with mode or contextlib.nullcontext():
            y = norm(x)
            return [y.detach(), *torch.autograd.grad(y, [x], dy)]

    exact, drawn = run(), run(OnePass(0))
    for e, d in zip(exact, drawn):
        moved = ((d - e).norm() / e.norm()).item()
        # a slice of n terms: about SUM_ERROR sqrt(n) fp32 roundoffs, amplified by the
        # inputs' mean over their spread (4) in the variance formed in one pass
        assert 1e-8 < moved < 1e-4


def test_ops_that_sum_no_statistics_and_an_evaluating_batch_norm_are_left_alone():
    conv, bn = nn.Conv2d(3, 4, 3).double(), nn.BatchNorm2d(4).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    exact = bn(conv(x))
    with OnePass(0):
        assert torch.equal(bn(conv(x)), exact)


def test_the_draws_own_arithmetic_is_no_op_of_the_run_for_the_modes_below():
    """Recorded decisions (a ReLU's branches) are the run's alone: the draw's clamp of its
    variance is not among them, or a replay would take the wrong choices."""
    from align.numerics.decisions import Decisions

    bn = nn.BatchNorm1d(4).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    with Decisions() as plain:
        torch.relu(bn(x))
    with Decisions() as drawn, OnePass(0):
        torch.relu(bn(x))
    assert [op for op, _ in drawn.log] == [op for op, _ in plain.log] != []


def test_a_gpu_reference_batch_norm_is_moved_as_the_cpus_is():
    """A CUDA reference's draws run cuDNN's BatchNorm (other argument names, a reserve
    space): moved as native_batch_norm is. No GPU here: the CPU kernel's results are handed
    to the move under cuDNN's schema, and must come out as native's move makes them."""
    aten = torch.ops.aten
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(4, 3, 5, 5, generator=gen) + 2, torch.randn(4, 3, 5, 5, generator=gen)
    weight, bias = torch.rand(3, generator=gen) + 0.5, torch.rand(3, generator=gen)
    stats = [torch.zeros(3), torch.ones(3)]
    native = aten.native_batch_norm.default(x, weight, bias, *stats, True, 0.1, 1e-5)
    grads = aten.native_batch_norm_backward.default(
        dy, x, weight, None, None, native[1], native[2], True, 1e-5, [True, True, True]
    )
    reserve = torch.empty(0)
    ours = [torch.zeros(3), torch.ones(3)]
    theirs = [torch.zeros(3), torch.ones(3)]
    expected = OnePass(7).moved(
        aten.native_batch_norm.default, (x, weight, bias, *ours, True, 0.1, 1e-5), {}, native
    )
    cudnn = OnePass(7).moved(
        aten.cudnn_batch_norm.default,
        (x, weight, bias, *theirs, True, 0.1, 1e-5),
        {},
        (*native, reserve),
    )
    assert len(cudnn) == 4 and cudnn[3] is reserve
    for a, b in zip([*expected, *ours], [*cudnn[:3], *theirs]):
        assert torch.equal(a, b)
    assert not torch.equal(expected[0], native[0])
    expected = OnePass(8).moved(
        aten.native_batch_norm_backward.default,
        (dy, x, weight, None, None, native[1], native[2], True, 1e-5, [True, True, True]),
        {},
        grads,
    )
    cudnn = OnePass(8).moved(
        aten.cudnn_batch_norm_backward.default,
        (x, dy, weight, None, None, native[1], native[2], 1e-5, reserve),
        {},
        grads,
    )
    for a, b in zip(expected, cudnn):
        assert torch.equal(a, b)
    assert not torch.equal(expected[0], grads[0])
