"""Honest draws of the reference: the same run with every rounding nudged at random.

A reference run's error against the float64 golden is one draw of its rounding noise.
Where that noise is dominated by a few elements or cancels (a gradient summed over a
batch, a bias gradient of an SE block), one draw can be several times smaller than the
next: a verdict scaled by it flags honest targets. `Jitter` re-runs the reference with
each operator's fresh floating result multiplied by (1 + u * N(0, 1)), u the unit
roundoff of its dtype: a Monte Carlo arithmetic draw (Parker 1997; Verificarlo, CADNA do
the same per floating-point operation). Relative noise on every input of a reduction
reproduces the reduction's cancellation error, which is the error one draw misses.
The verdict scales its limits by the largest error of the reference and its draws.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


class Jitter(TorchDispatchMode):
    """Perturbs every fresh floating result of an op computed from floating inputs.

    Views and in-place results are left alone (perturbing them would break aliasing),
    and so are factories (zeros, arange: exact, and not computed from data). float64
    results are never touched, so a golden run under this mode stays exact.
    """

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(ret.alias_info is not None for ret in func._schema.returns):
            return out
        if not any(
            isinstance(a, torch.Tensor) and a.dtype in UNIT_ROUNDOFF for a in tree_flatten(args)[0]
        ):
            return out
        return tree_map(self._perturb, out)

    def _perturb(self, t):
        if not isinstance(t, torch.Tensor) or t.dtype not in UNIT_ROUNDOFF or t.numel() == 0:
            return t
        noise = torch.randn(t.shape, generator=self.generator, dtype=torch.float32)
        factor = noise.mul_(UNIT_ROUNDOFF[t.dtype]).add_(1.0).to(t.device)
        return (t.float() * factor).to(t.dtype)
