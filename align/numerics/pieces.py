"""Piecewise ops whose branch honest rounding can flip, as one table for
align.numerics.decisions: for each op (forward and backward), the branch of every element,
the op's value on given branches, and each element's distance from its nearest breakpoint,
all from the op's own arguments.

A row is `PIECES[aten op] = Piece(branch, value, gap, decided)`. To replay another op, add
its row: `branch(*args)` numbers each element's branch (a bool or uint8 tensor; None for
ops in OUTPUT_IS_BRANCH, whose output is the branch: comparisons, sign, rounding),
`value(branch, *args)` recomputes the op on those branches, `gap(*args)` measures how far
each element is from the breakpoint, and `decided` says which argument's side of the
breakpoint is the branch (the input of a forward op, 1 for a backward op's saved input).
Give a new row a function in tests/numerics/test_decisions.py's BRANCHING: replaying a
run's own branches must change nothing, and a flipped branch must follow the record in
values and gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

aten = torch.ops.aten

__all__ = ["OUTPUT_IS_BRANCH", "PIECES", "Piece"]

# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A piecewise op: the branch of each element, the op's value on given branches, and
    each element's distance from its nearest breakpoint (all from the op's arguments)."""

    branch: Callable[..., torch.Tensor]
    value: Callable[..., torch.Tensor]
    gap: Callable[..., torch.Tensor]
    decided: int = 0  # the argument whose side of the breakpoint is the branch (its scale)
    applies: Callable[..., bool] | None = None  # None: every call (with a floating input)
    keyed: tuple[str, ...] = ()  # keyword arguments that are part of a record's identity


def _above(x: torch.Tensor, t: Any) -> torch.Tensor:
    """x > t. A plain CPU tensor is compared by numpy, 3-5x torch's CPU comparison into
    bool (0.8 against 2.7-4.2 ms on 4M floats, one thread, measured): a ReLU's forward and
    backward each compare, and a user's loop waits for them while a step is recorded
    (timm ResNet-18 at batch 16, 128 px, its recorded training step: 1.34x the bare step
    with torch's comparison, 1.30x with numpy's, measured alternating in one process)."""
    if (
        type(x) is torch.Tensor
        and x.device.type == "cpu"
        and x.layout == torch.strided
        and x.dim() > 0  # (numpy answers a 0-d array with a scalar)
        and x.dtype in _NUMPY_FLOATS
        and not x.is_neg()
        and isinstance(t, (int, float))
    ):
        return torch.from_numpy(np.greater(x.detach().numpy(), t))
    return x > t


# (not float16: a threshold beyond its range warns in numpy's cast, not in torch's)
_NUMPY_FLOATS = (torch.float32, torch.float64)


def _u8(*masks: torch.Tensor) -> torch.Tensor:
    """Branch numbers 0..len(masks) from nested masks (`a` then `a & b` ...)."""
    out = masks[0].to(torch.uint8)
    for m in masks[1:]:
        out = out + m
    return out


def _nearest(x: torch.Tensor, *points: Any) -> torch.Tensor:
    gaps = [(x - p).abs() for p in points if p is not None]
    out = gaps[0]
    for g in gaps[1:]:
        out = torch.minimum(out, g)
    return out


def _clamp_branch(x, lo=None, hi=None):
    above_lo = x >= lo if lo is not None else torch.ones_like(x, dtype=torch.bool)
    return _u8(above_lo, x > hi) if hi is not None else _u8(above_lo)


def _clamp_value(r, x, lo=None, hi=None):
    y = x
    if lo is not None:
        y = torch.where(r == 0, lo, y)
    if hi is not None:
        y = torch.where(r == 2, hi, y)
    return y.to(x.dtype)


def _gap_x(x, *_):
    return x.abs()


def _where(r, a, b):
    return torch.where(r, a, b)


_RELU = Piece(lambda x: _above(x, 0), lambda r, x: torch.where(r, x, 0), _gap_x)
_HARDTANH = Piece(
    lambda x, lo=-1.0, hi=1.0: _clamp_branch(x, lo, hi),
    lambda r, x, lo=-1.0, hi=1.0: _clamp_value(r, x, lo, hi),
    lambda x, lo=-1.0, hi=1.0: _nearest(x, lo, hi),
)
_CLAMP = Piece(_clamp_branch, _clamp_value, _nearest)
_LEAKY = Piece(
    lambda x, slope=0.01: _above(x, 0),
    lambda r, x, slope=0.01: torch.where(r, x, x * slope),
    _gap_x,
)
_HARDSWISH = Piece(
    lambda x: _u8(x > -3, x >= 3),
    lambda r, x: torch.where(r == 0, 0, torch.where(r == 2, x, x * (x + 3) / 6)).to(x.dtype),
    lambda x: _nearest(x, -3, 3),
)
_HARDSIGMOID = Piece(
    lambda x: _u8(x > -3, x >= 3),
    lambda r, x: torch.where(r == 0, 0, torch.where(r == 2, 1, x / 6 + 0.5)).to(x.dtype),
    lambda x: _nearest(x, -3, 3),
)
_COMPARE = Piece(lambda a, b: None, lambda r, a, b: r, lambda a, b: (a - b).abs())
_SIGN = Piece(lambda x: None, lambda r, x: r, _gap_x)
# rounding to an integer: the breakpoints are the half-integers (round) or the integers
_ROUND = Piece(lambda x: None, lambda r, x: r, lambda x: (x - x.floor() - 0.5).abs())
_TO_INTEGER = Piece(lambda x: None, lambda r, x: r, lambda x: (x - x.round()).abs())


# Quotients rounded to a whole number (floor and trunc division, remainder, fmod): the
# breakpoints are where a / b is whole. mmdet's SOLOv2 finds each object's grid cell so.
def _off_multiple(a, b, **_):
    """Each element's distance from the nearest multiple of b (in a's units)."""
    return (a - b * torch.round(a / b)).abs()


def _rounds(*_, rounding_mode=None, **__) -> bool:
    return rounding_mode is not None  # plain division is continuous


_QUOTIENT = Piece(lambda a, b: None, lambda r, a, b: r, _off_multiple)
_ROUNDED_DIV = Piece(
    lambda a, b, **_: None,
    lambda r, a, b, **_: r,
    _off_multiple,
    applies=_rounds,
    keyed=("rounding_mode",),
)


# the quotient in float64: a float32 one rounds 1.0 / 0.1f up to 10, where the kernel's
# exact remainder took 9 (and a replay would create the error it is meant to remove)
def _quotient(a, b):
    return a.double() / (b.double() if torch.is_tensor(b) else b)


def _after(r, a, b):
    return (a.double() - (b.double() if torch.is_tensor(b) else b) * r).to(a.dtype)


_REMAINDER = Piece(lambda a, b: _quotient(a, b).floor(), _after, _off_multiple)
_FMOD = Piece(lambda a, b: _quotient(a, b).trunc(), _after, _off_multiple)


# A float cast to an integer dtype truncates (to bool: x != 0)
def _to_integer_dtype(x, dtype=None, **_) -> bool:
    return dtype is not None and not (dtype.is_floating_point or dtype.is_complex)


def _cast_gap(x, dtype=None, **_):
    return x.abs() if dtype is torch.bool else (x - x.round()).abs()


_CAST = Piece(
    lambda x, **_: None,
    lambda r, x, **_: r,
    _cast_gap,
    applies=_to_integer_dtype,
    keyed=("dtype",),
)


# The bucket of each value among boundaries (bucketize(x, b); searchsorted(b, x))
def _off_boundaries(boundaries, x):
    """Each value's distance from its nearest boundary (1-D boundaries, or one row per row),
    from its neighbours in the sorted boundaries (memory of x's size, not x times theirs)."""
    sides = torch.searchsorted(boundaries, x.contiguous())
    last = boundaries.shape[-1] - 1
    below, above = (sides - 1).clamp(0, last), sides.clamp(0, last)
    if boundaries.dim() == 1:
        return torch.minimum((x - boundaries[below]).abs(), (x - boundaries[above]).abs())
    return torch.minimum(
        (x - boundaries.gather(-1, below)).abs(), (x - boundaries.gather(-1, above)).abs()
    )


_SEARCH = ("out_int32", "right", "side")
_BUCKETIZE = Piece(
    lambda x, b, **_: None,
    lambda r, x, b, **_: r,
    lambda x, b, **_: _off_boundaries(b, x),
    keyed=_SEARCH,
)
_SEARCHSORTED = Piece(
    lambda b, x, **_: None,
    lambda r, b, x, **_: r,
    lambda b, x, **_: _off_boundaries(b, x),
    decided=1,
    keyed=_SEARCH,
)


def _elu_value(r, x, alpha=1.0, scale=1.0, input_scale=1.0):
    return torch.where(r, x * scale, torch.expm1(x * input_scale) * (alpha * scale)).to(x.dtype)


def _elu_grad(r, g, alpha, scale, input_scale, is_result, s):
    # the kernel's negative branch from its output (is_result) or from its input
    negative = s + alpha * scale if is_result else alpha * scale * torch.exp(s * input_scale)
    return torch.where(r, g * scale, g * input_scale * negative).to(g.dtype)


def _shrink_branch(x, lambd=0.5):
    """0 below -lambd, 1 inside [-lambd, lambd] (shrunk to 0), 2 above lambd."""
    return _u8(x >= -lambd, x > lambd)


def _softshrink_value(r, x, lambd=0.5):
    return torch.where(r == 2, x - lambd, torch.where(r == 0, x + lambd, 0)).to(x.dtype)


_ELU = Piece(lambda x, alpha=1.0, scale=1.0, input_scale=1.0: _above(x, 0), _elu_value, _gap_x)
_SHRINK_GRAD = Piece(
    lambda g, x, lambd: _shrink_branch(x, lambd),
    lambda r, g, x, lambd: torch.where(r == 1, 0, g).to(g.dtype),
    lambda g, x, lambd: _nearest(x, -lambd, lambd),
    decided=1,
)
_CLAMP_MIN = Piece(
    lambda x, lo: _clamp_branch(x, lo),
    lambda r, x, lo: _clamp_value(r, x, lo),
    lambda x, lo: _nearest(x, lo),
)
_CLAMP_MAX = Piece(
    lambda x, hi: _clamp_branch(x, None, hi),
    lambda r, x, hi: _clamp_value(r, x, None, hi),
    lambda x, hi: _nearest(x, hi),
)
# RReLU out of training: a leaky ReLU of slope (lower + upper) / 2, in RReLU's own kernel
_RRELU_EVAL = Piece(
    lambda x, noise, lower=0.125, upper=1 / 3, *_: _above(x, 0),
    lambda r, x, noise, lower=0.125, upper=1 / 3, *_: torch.where(r, x, x * ((lower + upper) / 2)),
    _gap_x,
)

# Forward ops: branch and value from the input x (then scalar arguments).
PIECES: dict[Any, Piece] = {
    aten.relu.default: _RELU,
    aten.relu_.default: _RELU,
    aten.threshold.default: Piece(
        lambda x, t, v: _above(x, t),
        lambda r, x, t, v: torch.where(r, x, v),
        lambda x, t, v: _nearest(x, t),
    ),
    aten.hardtanh.default: _HARDTANH,
    aten.hardtanh_.default: _HARDTANH,
    aten.clamp.default: _CLAMP,
    aten.clamp.Tensor: _CLAMP,
    aten.clamp_.default: _CLAMP,
    aten.clamp_.Tensor: _CLAMP,
    aten.clamp_min.default: _CLAMP_MIN,
    aten.clamp_min.Tensor: _CLAMP_MIN,
    aten.clamp_min_.default: _CLAMP_MIN,
    aten.clamp_min_.Tensor: _CLAMP_MIN,
    aten.clamp_max.default: _CLAMP_MAX,
    aten.clamp_max.Tensor: _CLAMP_MAX,
    aten.clamp_max_.default: _CLAMP_MAX,
    aten.clamp_max_.Tensor: _CLAMP_MAX,
    aten.leaky_relu.default: _LEAKY,
    aten.leaky_relu_.default: _LEAKY,
    aten.hardswish.default: _HARDSWISH,
    aten.hardswish_.default: _HARDSWISH,
    aten.hardsigmoid.default: _HARDSIGMOID,
    aten.hardsigmoid_.default: _HARDSIGMOID,
    aten.maximum.default: Piece(lambda a, b: a > b, lambda r, a, b: _where(r, a, b), _COMPARE.gap),
    aten.minimum.default: Piece(lambda a, b: a < b, lambda r, a, b: _where(r, a, b), _COMPARE.gap),
    aten._prelu_kernel.default: Piece(
        lambda x, w: _above(x, 0), lambda r, x, w: torch.where(r, x, w * x), lambda x, w: x.abs()
    ),
    aten.elu.default: _ELU,  # SELU and CELU too: elu with a scale and an input scale
    aten.elu_.default: _ELU,
    aten.hardshrink.default: Piece(
        _shrink_branch,
        lambda r, x, lambd=0.5: torch.where(r == 1, 0, x).to(x.dtype),
        lambda x, lambd=0.5: _nearest(x, -lambd, lambd),
    ),
    aten.remainder.Tensor: _REMAINDER,
    aten.remainder.Scalar: _REMAINDER,
    aten.remainder_.Tensor: _REMAINDER,
    aten.remainder_.Scalar: _REMAINDER,
    aten.fmod.Tensor: _FMOD,
    aten.fmod.Scalar: _FMOD,
    aten.fmod_.Tensor: _FMOD,
    aten.fmod_.Scalar: _FMOD,
    aten.softshrink.default: Piece(
        _shrink_branch, _softshrink_value, lambda x, lambd=0.5: _nearest(x, -lambd, lambd)
    ),
    aten.rrelu_with_noise.default: _RRELU_EVAL,  # in training, a draw: Decisions._slopes
    aten.rrelu_with_noise_.default: _RRELU_EVAL,
    # Backward ops: (grad, input, ...): the branch comes from the input
    aten.threshold_backward.default: Piece(
        lambda g, s, t: _above(s, t),
        lambda r, g, s, t: torch.where(r, g, 0),
        lambda g, s, t: _nearest(s, t),
        decided=1,
    ),
    aten.hardtanh_backward.default: Piece(
        lambda g, x, lo, hi: (x > lo) & (x < hi),
        lambda r, g, x, lo, hi: torch.where(r, g, 0),
        lambda g, x, lo, hi: _nearest(x, lo, hi),
        decided=1,
    ),
    aten.leaky_relu_backward.default: Piece(
        lambda g, x, slope, is_result: _above(x, 0),
        lambda r, g, x, slope, is_result: torch.where(r, g, g * slope),
        lambda g, x, slope, is_result: x.abs(),
        decided=1,
    ),
    aten.hardswish_backward.default: Piece(
        lambda g, x: _u8(x >= -3, x > 3),
        lambda r, g, x: torch.where(r == 0, 0, torch.where(r == 2, g, g * (x / 3 + 0.5))).to(
            g.dtype
        ),
        lambda g, x: _nearest(x, -3, 3),
        decided=1,
    ),
    aten.hardsigmoid_backward.default: Piece(
        lambda g, x: (x > -3) & (x < 3),
        lambda r, g, x: torch.where(r, g / 6, 0).to(g.dtype),
        lambda g, x: _nearest(x, -3, 3),
        decided=1,
    ),
    aten.elu_backward.default: Piece(
        lambda g, alpha, scale, input_scale, is_result, s: _above(s, 0),
        _elu_grad,
        lambda g, alpha, scale, input_scale, is_result, s: s.abs(),
        decided=5,
    ),
    aten.hardshrink_backward.default: _SHRINK_GRAD,
    aten.softshrink_backward.default: _SHRINK_GRAD,
    # out of training a leaky ReLU's mask; in training the replayed slopes (not a branch)
    aten.rrelu_with_noise_backward.default: Piece(
        lambda g, x, noise, lower, upper, *_: _above(x, 0),
        lambda r, g, x, noise, lower, upper, *_: torch.where(r, g, g * ((lower + upper) / 2)).to(
            g.dtype
        ),
        lambda g, x, *_: x.abs(),
        decided=1,
    ),
}
# Ops whose output is the branch itself (comparisons feeding `where`, sign, rounding,
# rounded division, casts to an integer dtype, bucketing): the record is the output;
# floating inputs only (integer comparisons are exact). Equality too: the backward of max /
# amax over a dim sends the gradient where `input == max`, and an honest near-tie makes
# another element the largest.
OUTPUT_IS_BRANCH = {
    aten.eq.Scalar: _COMPARE,
    aten.eq.Tensor: _COMPARE,
    aten.ne.Scalar: _COMPARE,
    aten.ne.Tensor: _COMPARE,
    aten.gt.Scalar: _COMPARE,
    aten.gt.Tensor: _COMPARE,
    aten.lt.Scalar: _COMPARE,
    aten.lt.Tensor: _COMPARE,
    aten.ge.Scalar: _COMPARE,
    aten.ge.Tensor: _COMPARE,
    aten.le.Scalar: _COMPARE,
    aten.le.Tensor: _COMPARE,
    aten.sign.default: _SIGN,
    aten.sgn.default: _SIGN,
    aten.round.default: _ROUND,
    aten.round_.default: _ROUND,
    aten.floor.default: _TO_INTEGER,
    aten.floor_.default: _TO_INTEGER,
    aten.ceil.default: _TO_INTEGER,
    aten.ceil_.default: _TO_INTEGER,
    aten.trunc.default: _TO_INTEGER,
    aten.trunc_.default: _TO_INTEGER,
    aten.div.Tensor_mode: _ROUNDED_DIV,
    aten.div.Scalar_mode: _ROUNDED_DIV,
    aten.div_.Tensor_mode: _ROUNDED_DIV,
    aten.div_.Scalar_mode: _ROUNDED_DIV,
    aten.floor_divide.default: _QUOTIENT,
    aten.floor_divide.Scalar: _QUOTIENT,
    aten.floor_divide_.Tensor: _QUOTIENT,
    aten.floor_divide_.Scalar: _QUOTIENT,
    aten._to_copy.default: _CAST,
    aten.bucketize.Tensor: _BUCKETIZE,
    aten.searchsorted.Tensor: _SEARCHSORTED,
}
PIECES.update(OUTPUT_IS_BRANCH)
