"""align.numerics.jitter: honest draws nudge results, and a reduction's terms."""

from __future__ import annotations

import torch

from align.numerics.jitter import Jitter, Pool
from align.numerics.precision import unit_roundoff

U = unit_roundoff(torch.float32)


def _relative_errors(fn, x: torch.Tensor, seeds=range(8)) -> list[float]:
    exact = fn(x.double())
    errors = []
    for seed in seeds:
        with Jitter(seed):
            y = fn(x)
        errors.append(float(((y.double() - exact).abs() / exact.abs()).max()))
    return errors


def test_a_cancelling_sum_errs_relative_to_its_terms():
    x = torch.tensor([1.5, -1.5, 1.5 * 2.0**-10] * 4)  # every partial sum exact in float32
    assert x.sum().item() == 6 * 2.0**-10
    errors = _relative_errors(lambda t: t.sum(), x)
    # a term rounded otherwise moves the sum by 340 u of its size; its result alone, 2 u
    assert 100 * U < max(errors) < 1e4 * U


def test_an_elementwise_op_errs_by_its_own_rounding():
    x = torch.linspace(0.5, 2.0, 1000)
    errors = _relative_errors(lambda t: t * 3.0, x)
    assert 0 < max(errors) < 8 * U


def test_float64_is_never_touched():
    x = torch.tensor([1.0, -1.0, 1e-3], dtype=torch.float64)
    with Jitter(0):
        assert x.sum().item() == 1e-3
        assert torch.equal(x * 3.0, torch.tensor([3.0, -3.0, 3e-3], dtype=torch.float64))


def test_a_pool_makes_each_draw_once_and_only_on_demand():
    made: list[int] = []
    pool = Pool(lambda k: made.append(k) or k, n=2)
    assert made == []
    assert pool(0) == [0, 1] and pool(0) == [0, 1] and made == [0, 1]
    assert pool(1) == [0, 1, 2, 3, 4, 5] and made == [0, 1, 2, 3, 4, 5]


def test_arguments_the_op_updates_in_place_are_left_alone():
    """BatchNorm's running statistics are written by the op (its schema does not say so):
    a draw in train mode updates them as the reference does, up to rounding."""
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) + 0.5
    plain, jittered = torch.nn.BatchNorm2d(3).train(), torch.nn.BatchNorm2d(3).train()
    plain(x)
    with Jitter(1):
        jittered(x)
    assert torch.allclose(jittered.running_mean, plain.running_mean, rtol=1e-5)
    assert torch.allclose(jittered.running_var, plain.running_var, rtol=1e-5)
    assert not torch.equal(plain.running_mean, torch.zeros(3))
