"""Honest draws of the reference: the same run with every rounding nudged at random.

A reference run's error against the float64 golden is one draw of its rounding noise.
Where that noise is dominated by a few elements or cancels (a gradient summed over a
batch, a bias gradient of an SE block), one draw can be several times smaller than the
next: a verdict scaled by it flags honest targets. `Jitter` re-runs the reference with
each operator's fresh floating result multiplied by (1 + u * N(0, 1)), u the unit
roundoff of its dtype: a Monte Carlo arithmetic draw (Parker 1997; Verificarlo, CADNA do
the same per floating-point operation). Relative noise on every input of a reduction
reproduces the reduction's cancellation error, which is the error one draw misses.
Each op is nudged by as many roundings as an honest kernel of its kind may err
(`precision.KERNEL_ACCURACY`: 1 for arithmetic, 2 for reductions, 4 for transcendental
functions), so a draw stands for another honest device, not only for the reference's own
rounding. A reduction's operands are nudged by one rounding too (ONE_ROUNDING): a sum
errs relative to its terms, not to its result, so a sum that cancels (the bias gradient of
a convolution before a BatchNorm, fed the same gradient in isolation) may honestly miss by
its own size, which nudging its result alone never shows. Nudges miss what another summation order
does to a long reduction that cancels (a BatchNorm weight gradient over 2x56x56 values),
so every other whole-network draw (and training draw) also runs in the other memory format
(`align.record.capture.honest_draw`): the device's own kernels for that layout, another
order. A normalization's statistics are moved as a one-pass kernel's are
(align.numerics.one_pass: a device that sums x and x^2 per channel, as Ascend's
BatchNorm does, errs with the input's mean over its spread, which no nudge reproduces).
The verdict scales its limits by the largest error of the reference and its draws.
What the recording copies (snapshots of tensors, a child's record replayed in isolation)
is no op of the run and is not nudged (align.record.capture.outside_modes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from align.numerics.one_pass import OnePass
from align.numerics.precision import SUMMING_OPS, op_accuracy, unit_roundoff

JITTERED = (torch.float32, torch.bfloat16, torch.float16)
# A tensor that still fails against the first draws, by less than GRAY_ZONE times its
# limit, is judged again on MORE_DRAWS times as many: as many draws as the decision needs
# (a fault is usually far beyond; an honest tensor near the limit is where one more
# sample of the honest spread decides).
MORE_DRAWS = 3
GRAY_ZONE = 3.0
# A reduction's operands are nudged by as much as one rounding to nearest errs (uniform
# within one unit roundoff: a standard deviation of u / sqrt(3)), then rounded back to their
# dtype: where the nudge crosses a rounding boundary the term is one ulp off, as a term
# another device computed may be.
ONE_ROUNDING = 3**-0.5
# arguments ops update in place without saying so in their schema
WRITTEN = frozenset({"running_mean", "running_var"})

T = TypeVar("T")


class Pool(Generic[T]):
    """Honest draws made on demand and once: round 0 wants the first `n`, round 1 the
    first MORE_DRAWS * n. `make(k)` makes draw k, or returns None when there is none
    (a dump carries only the draws it was written with)."""

    def __init__(self, make: Callable[[int], T | None], n: int):
        self.make, self.n = make, n
        self.made: list[T] = []
        self._exhausted = False

    def __call__(self, round_: int) -> list[T]:
        want = self.n * MORE_DRAWS**round_
        while len(self.made) < want and not self._exhausted:
            draw = self.make(len(self.made))
            if draw is None:
                self._exhausted = True
            else:
                self.made.append(draw)
        return self.made[:want]


class Jitter(TorchDispatchMode):
    """Perturbs every fresh floating result of an op computed from floating inputs, and
    the operands of a summing op (copies: the caller's tensors are never touched).

    Views and in-place results are left alone (perturbing them would break aliasing),
    and so are arguments an op writes (BatchNorm's running statistics), and factories
    (zeros, arange: exact, and not computed from data). float64 results are never
    touched, so a golden run under this mode stays exact.
    """

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        self.sums = OnePass(seed)  # moves a normalization's statistics; never entered

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(ret.alias_info is not None for ret in func._schema.returns):
            return func(*args, **(kwargs or {}))
        if not any(
            isinstance(a, torch.Tensor) and a.dtype in JITTERED for a in tree_flatten(args)[0]
        ):
            return func(*args, **(kwargs or {}))
        op = func.overloadpacket.__name__
        kwargs = kwargs or {}
        if op in SUMMING_OPS:  # its error is relative to its terms, not to its result
            args, kwargs = self._operands(func, args, kwargs)
        out = self.sums.moved(func, args, kwargs, func(*args, **kwargs))
        roundings = op_accuracy(op)
        return tree_map(lambda t: self._perturb(t, roundings), out)

    def _operands(self, func, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The op's arguments with the ones it only reads nudged by ONE_ROUNDING."""
        read_only = [a.alias_info is None and a.name not in WRITTEN for a in func._schema.arguments]
        args = tuple(
            self._perturb(a, ONE_ROUNDING) if i < len(read_only) and read_only[i] else a
            for i, a in enumerate(args)
        )
        names = {a.name: ok for a, ok in zip(func._schema.arguments, read_only)}
        kwargs = {
            k: self._perturb(v, ONE_ROUNDING) if names.get(k) else v for k, v in kwargs.items()
        }
        return args, kwargs

    def _perturb(self, t, roundings: float):
        if not isinstance(t, torch.Tensor):
            return t
        return perturbed(t, roundings, self.generator)


def perturbed(t: torch.Tensor, roundings: float, generator: torch.Generator) -> torch.Tensor:
    """`t` times (1 + u * roundings * N(0, 1)), u its dtype's unit roundoff (float64 and
    non-floating tensors unchanged)."""
    if t.dtype not in JITTERED or t.numel() == 0:
        return t
    noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
    factor = noise.mul_(unit_roundoff(t.dtype) * roundings).add_(1.0).to(t.device)
    return (t.float() * factor).to(t.dtype)
