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

`Slices.gains` measures scale_err per slice of a tensor (one channel, one row, one spatial
position), with its standard error: a fault confined to a slice (one wrong channel) is
diluted in the whole tensor's metrics by the number of slices.
"""

from __future__ import annotations

import math

import torch

NAMES = ("rel_rmse", "cos_err", "max_rel", "share", "mean_err", "scale_err")
SIGNED = ("mean_err", "scale_err")


def as_f64(t: torch.Tensor) -> torch.Tensor:
    """Flattened float64 CPU copy of `t` (the common ground for every comparison), in its
    `judged_form`."""
    return judged_form(t).detach().to(device="cpu", dtype=torch.float64).reshape(-1)


def judged_form(t: torch.Tensor) -> torch.Tensor:
    """`t` as its metrics read it: a sparse tensor (an nn.Embedding(sparse=True)'s weight
    gradient) dense, a complex one (a spectrum, an FNO's complex weights) as its real and
    imaginary parts (`view_as_real`: one more dim of 2); any other as it is."""
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    return t


def flat(t: torch.Tensor) -> torch.Tensor:
    """Flattened CPU view of `t` in its own dtype: arithmetic with a float64 golden promotes
    it element by element, with no float64 copy of its own; in its `judged_form`."""
    return judged_form(t).detach().to("cpu").reshape(-1)


def nonfinite(x: torch.Tensor, *finite_in: torch.Tensor) -> int:
    """Elements of x that are NaN/Inf where every tensor in `finite_in` is finite."""
    if all_finite(x):
        return 0
    bad = ~torch.isfinite(x)
    for other in finite_in:
        bad &= torch.isfinite(other)
    return int(bad.sum())


def shared_infinities(*sides: torch.Tensor) -> torch.Tensor:
    """Elements that are the same infinity on every side (flat): a mask built with -inf,
    the log of an exact 0, a float64 golden included. An overflow is not one: where a
    float32 run overflows, the float64 golden stays finite."""
    first = flat(sides[0])
    shared = torch.isinf(first)
    for other in sides[1:]:
        shared &= flat(other) == first
    return shared


def all_finite(x: torch.Tensor) -> bool:
    """True when no element is NaN/Inf, known from one sum (a fast path: a NaN or an Inf
    makes the sum non-finite; a sum that overflows only sends the caller to the mask)."""
    return math.isfinite(float(x.sum()))


MIN_SLICE = 16  # elements a slice needs for its gain's standard error to mean something


class Slices:
    """The slices of a golden `g` (flat float64, of `shape`) along `dim`: one channel, one
    row, one spatial position each, for the gains of errors on them."""

    def __init__(self, g: torch.Tensor, shape: tuple[int, ...], dim: int):
        self.shape, self.dim = shape, dim
        self.g = self.rows(g)
        self.norm = self.g.square().sum(1)
        self._safe = torch.where(self.norm > 0, self.norm, torch.ones_like(self.norm))

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (flat, of `shape`) as one row per slice."""
        return x.reshape(self.shape).movedim(self.dim, 0).reshape(self.shape[self.dim], -1)

    def gains(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slice: the least-squares gain of the error `d` (flat float64) on the golden,
        and its standard error from the slice's own residual (the sandwich estimator:
        rounding noise is heteroscedastic, |error| grows with |g|). Slices where g is 0
        get gain 0, standard error inf."""
        dd = self.rows(d.to(torch.float64))
        gain = (dd * self.g).sum(1) / self._safe
        resid = (dd - gain[:, None] * self.g).mul_(self.g)
        se = resid.square_().sum(1).sqrt() / self._safe
        zero = self.norm == 0
        return gain.masked_fill(zero, 0.0), se.masked_fill(zero, math.inf)

    def concentration(self, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Per slice: 1 / sqrt of its effective number of independent roundings,
        (sum over cells of (sum g^2)^2)^(1/2) / sum g^2. A gain weighs each element by g^2:
        a slice with a few large values is measured by those few (1 for one nonzero value,
        1/sqrt(n) for n equal ones in n cells), and elements of one `rounding_cells` cell
        (flat, as g) round alike, so they count once (1 for a slice of one repeated value:
        a weight gradient whose grad_output holds six distinct values). Slices where g is 0
        get 1."""
        weight = self.g.square()
        if cells is None:
            fourth = weight.square().sum(1)
        else:  # the weights summed per (slice, cell) pair, then squared
            rows, width = self.rows(cells), cells.max() + 1
            pairs = (torch.arange(len(rows))[:, None] * width + rows).flatten()
            keys, inverse = torch.unique(pairs, return_inverse=True)
            summed = torch.zeros(len(keys), dtype=weight.dtype).index_add_(
                0, inverse, weight.flatten()
            )
            fourth = torch.zeros(len(rows), dtype=weight.dtype).index_add_(
                0, keys // width, summed.square_()
            )
        return (fourth.sqrt_() / self._safe).masked_fill(self.norm == 0, 1.0)


SHARED_ROUNDING = 32  # golden values within 1/32 ulp of each other share their rounding
DESIGN_SAMPLE = 1 << 16  # elements enough to measure how they share their roundings


def rounding_cells(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each element's cell of the `dtype` rounding grid, 1/SHARED_ROUNDING ulp wide, as
    an index (flat float64 golden `g`): elements in one cell round alike in any kernel
    that is accurate to a fraction of an ulp, so their errors are one draw, not several."""
    bits = 1 - round(math.log2(torch.finfo(dtype).eps)) if dtype.is_floating_point else 53
    mantissa, exponent = torch.frexp(g)
    step = 2.0 ** (bits + SHARED_ROUNDING.bit_length() - 1)  # ulps of a [0.5, 1) mantissa
    key = (exponent.to(torch.int64) + 1100) * 2**40 + (mantissa.abs() * step).to(torch.int64)
    key = torch.where(torch.signbit(g), -key, key)  # (-0.0 apart from 0.0, as its sign is)
    return torch.unique(key, return_inverse=True)[1]


def design_effects_of(g: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """`design_effects` of the golden `g` in `dtype`'s rounding cells, from a sample of
    DESIGN_SAMPLE elements where g has more (seeded, without replacement): a cell's
    excess, sum(n_c^2) / n - 1, grows with the sample's size, so it is scaled up to g's."""
    n = g.numel()
    if n <= DESIGN_SAMPLE:
        return design_effects(g, rounding_cells(g, dtype))
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:DESIGN_SAMPLE]
    sample = g[pick]
    return tuple(  # type: ignore[return-value]
        math.sqrt(1 + (e * e - 1) * n / DESIGN_SAMPLE)
        for e in design_effects(sample, rounding_cells(sample, dtype))
    )


def effective_counts(g: torch.Tensor) -> tuple[float, float]:
    """How many elements mean_err and scale_err are measured from, in effect (Kish's
    (sum w)^2 / sum w^2): a rounding error is proportional to |g|, and mean_err sums the
    errors alike, so its weights are |g|; scale_err weighs each by g again, so its weights
    are g^2. n for equal magnitudes; 1 where one element dominates; for normal values,
    2n/pi and n/3."""
    magnitude = g.abs()
    square = magnitude.square()
    sum_abs, sum_sq, sum_fourth = (float(x.sum()) for x in (magnitude, square, square.square()))
    if sum_sq == 0:
        return float(g.numel()), float(g.numel())
    return sum_abs * sum_abs / sum_sq, sum_sq * sum_sq / sum_fourth


def design_effects(g: torch.Tensor, cells: torch.Tensor) -> tuple[float, float]:
    """How many times wider the standard errors of mean_err and scale_err are than the
    independent-element ones when every element of a cell (`rounding_cells`) carries the
    same rounding (Kish's design effect of a cluster sample, with rounding errors of size
    |g|): 1 where every golden value sits alone in its cell, sqrt(n) where all share one.
    A train-mode BatchNorm over two values outputs about +-1 in every channel: thousands
    of elements, a handful of roundings."""
    effects = []
    for w in (g.abs(), g.square()):  # mean_err weighs errors by 1, scale_err by g
        alone = float(w.square().sum())
        size = int(cells.max()) + 1 if cells.numel() else 0
        shared = float(torch.zeros(size, dtype=w.dtype).index_add_(0, cells, w).square().sum())
        effects.append(math.sqrt(shared / alone) if alone > 0 else 1.0)
    return effects[0], effects[1]


def _ratio(num: float, den: float) -> float:
    if den > 0 or math.isnan(num):
        return num / den if den > 0 else math.nan
    return 0.0 if num == 0 else math.copysign(math.inf, num)


class Against:
    """The golden side of a comparison, computed once for every tensor judged against it."""

    def __init__(self, g: torch.Tensor):
        self.g = g
        self.gg = float(torch.dot(g, g))
        self.abs_g = g.abs()
        self.max_g = float(self.abs_g.max()) if g.numel() else 0.0

    def errors(self, x: torch.Tensor, tau: float | torch.Tensor = math.inf) -> dict[str, float]:
        """All metrics of x against this golden (both finite, flat float64, same size)."""
        found, abs_d, _ = self.partial(x)
        found["share"] = self.share(abs_d, tau)
        return found

    def partial(self, x: torch.Tensor) -> tuple[dict[str, float], torch.Tensor, float]:
        """Every metric but `share`; |x - g| to count `share` with once tau is known; and
        the RMS of x - g."""
        n, gg = x.numel(), self.gg
        if n == 0:
            return {m: 0.0 for m in NAMES if m != "share"}, x.new_zeros(0), 0.0
        d = x - self.g
        dd = float(torch.dot(d, d))
        dg = float(torch.dot(d, self.g))
        xg = dg + gg
        if dd < 1e-4 * gg:  # errors under 1%: |x|^2 from d and g loses nothing
            xx = dd + 2 * dg + gg
        else:  # large errors cancel in dd + 2<d,g> + gg: measure |x|^2 and <x,g> themselves
            # (<d,g> + gg leaves <x,g> a rounding of gg: x = 0.001 against g = 90 read a
            # cos_err of 1e-11 for two vectors of one element, found by hypothesis)
            x64 = x.to(torch.float64)
            xx = float(torch.dot(x64, x64))
            xg = float(torch.dot(x64, self.g))
        if xx > 0 and gg > 0:
            # 1 - cos = G / (|x||g| (|x||g| + <x,g>)), G = |x|^2|g|^2 - <x,g>^2 = |d|^2|g|^2
            # - <d,g>^2 (Gram determinant), from the smaller of d and x: no cancellation
            # for small errors, where 1 - <x,g>/(|x||g|) keeps only a digit or two
            norms = math.sqrt(xx * gg)
            den = norms * (norms + xg)
            gram = dd * gg - dg * dg if dd <= xx else xx * gg - xg * xg
            # (an obtuse angle has no cancellation in 1 - cos, and den ~ 0 near cos = -1)
            cos_err = max(0.0, gram) / den if xg > 0 and den > 0 else 1.0 - xg / norms
        else:
            cos_err = 0.0 if xx == gg else 1.0  # both zero: same direction; one zero: none
        mean = float(d.sum()) / n
        abs_d = d.abs_()
        return (
            {
                "rel_rmse": math.sqrt(_ratio(dd, gg)),
                "cos_err": min(2.0, max(0.0, cos_err)),
                "max_rel": _ratio(float(abs_d.max()), self.max_g),
                "mean_err": _ratio(mean, math.sqrt(gg / n)),
                "scale_err": _ratio(dg, gg),
            },
            abs_d,
            math.sqrt(dd / n),
        )

    @staticmethod
    def share(abs_d: torch.Tensor, tau: float | torch.Tensor) -> float:
        """Fraction of elements whose |x - g| exceeds tau."""
        return float((abs_d > tau).sum()) / abs_d.numel() if abs_d.numel() else 0.0


def errors(
    x: torch.Tensor, g: torch.Tensor, tau: float | torch.Tensor = math.inf
) -> dict[str, float]:
    """All metrics of x against g; x and g are flat float64 tensors of the same size.

    `tau` is the absolute error bound for `share` (a number, or one per element). Elements
    where x or g is not finite are left out (count them with `nonfinite`).
    """
    if x.shape != g.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(g.shape)}")
    if not (all_finite(x) and all_finite(g)):
        keep = torch.isfinite(x) & torch.isfinite(g)
        if not bool(keep.all()):
            x, g = x[keep], g[keep]
            tau = tau[keep] if isinstance(tau, torch.Tensor) else tau
    return Against(g).errors(x, tau)
