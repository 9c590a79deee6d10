"""Error metrics of a tensor `x` against a golden `g` (both compared in float64).

Every metric is 0 for identical tensors, invariant under a joint permutation of the
elements of x and g, and invariant under a joint positive scaling (x, g) -> (c x, c g):
they measure relative error. Empty tensors are perfect. Non-finite elements are not
metrics' business: `nonfinite` counts them and the others ignore them.

rel_rmse   ||x - g|| / ||g||                      overall relative error
cos_err    1 - cos(x, g)                           direction error (~ rel_rmse^2 / 2)
max_rel    max |x - g| / max |g|                   worst element, relative to the range
share      fraction of elements with |x - g| > tau  how widespread large errors are
mean_err   mean(x - g) / rms(g)                    signed: systematic offset
scale_err  <x - g, g> / <g, g>                     signed: systematic gain (x ~ (1+s) g)
"""

from __future__ import annotations

import math

import torch

NAMES = ("rel_rmse", "cos_err", "max_rel", "share", "mean_err", "scale_err")
SIGNED = ("mean_err", "scale_err")


def as_f64(t: torch.Tensor) -> torch.Tensor:
    """Flattened float64 CPU copy of `t` (the common ground for every comparison)."""
    return t.detach().to(device="cpu", dtype=torch.float64).reshape(-1)


def nonfinite(x: torch.Tensor, *finite_in: torch.Tensor) -> int:
    """Elements of x that are NaN/Inf where every tensor in `finite_in` is finite."""
    if _all_finite(x):
        return 0
    bad = ~torch.isfinite(x)
    for other in finite_in:
        bad &= torch.isfinite(other)
    return int(bad.sum())


def _all_finite(x: torch.Tensor) -> bool:
    """True when no element is NaN/Inf, known from one sum (a fast path: a NaN or an Inf
    makes the sum non-finite; a sum that overflows only sends the caller to the mask)."""
    return math.isfinite(float(x.sum()))


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def errors(
    x: torch.Tensor, g: torch.Tensor, tau: float | torch.Tensor = math.inf
) -> dict[str, float]:
    """All metrics of x against g; x and g are flat float64 tensors of the same size.

    `tau` is the absolute error bound for `share` (a number, or one per element). Elements
    where x or g is not finite are left out (count them with `nonfinite`).
    """
    if x.shape != g.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(g.shape)}")
    if not (_all_finite(x) and _all_finite(g)):
        keep = torch.isfinite(x) & torch.isfinite(g)
        if not bool(keep.all()):
            x, g = x[keep], g[keep]
            tau = tau[keep] if isinstance(tau, torch.Tensor) else tau
    n = x.numel()
    if n == 0:
        return dict.fromkeys(NAMES, 0.0)
    d = x - g
    gg = float(torch.dot(g, g))
    dd = float(torch.dot(d, d))
    xx = float(torch.dot(x, x))
    dg = float(torch.dot(d, g))
    xg = dg + gg
    if xx > 0 and gg > 0:
        cos = xg / math.sqrt(xx * gg)
    else:
        cos = 1.0 if xx == gg else 0.0  # both zero: same direction; one zero: none
    abs_d = d.abs()
    max_g = float(g.abs().max())
    return {
        "rel_rmse": math.sqrt(_ratio(dd, gg)),
        "cos_err": max(0.0, 1.0 - cos),
        "max_rel": _ratio(float(abs_d.max()), max_g),
        "share": float((abs_d > tau).sum()) / n,
        "mean_err": _ratio(float(d.sum()) / n, math.sqrt(gg / n)),
        "scale_err": _ratio(dg, gg),
    }
