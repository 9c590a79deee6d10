"""Judge two statistics-only dumps (msprobe task "statistics"): Max/Min/Mean/Norm per tensor.

A statistics dump keeps four numbers per tensor, so a target tensor is judged by how far
each of its statistics is from the reference's, relative to the scale that statistic
lives on:

    fail if |s_target - s_reference| / scale_s > bound(u) = 8 u + 2.5e-4

    scale_Max = scale_Min = max(|Max|, |Min|) of the reference (the tensor's range),
    scale_Mean = Norm / sqrt(numel) (its RMS: a mean that cancels to ~0 is not divided
    by ~0), scale_Norm = |Norm|; u = the unit roundoff of the coarsest floating dtype of
    the tensor on either side *and of the run* (a bf16 run's fp32 tensors, e.g. weight
    gradients, carry bf16 error).

8 u is the storage rounding of low-precision results (msprobe also computes the
statistics in the tensor's own dtype); 2.5e-4 is the accumulated rounding of fp32
arithmetic through a network. Measured (this repo, 2026-11, ResNet-18 from timm, batch 4
at 64 px, train mode, CPU contiguous vs channels_last, per leaf module): fp32 honest
deviations reach 262 fp32 ulps (1.6e-5, Norm of conv1's output gradient; forward 17
ulps, weight gradients 51 ulps), so the fp32 bound is 16x that; under bf16 autocast
they reach 2.1 bf16 ulps on bf16 tensors and 2.5 bf16 ulps (1e-2) on fp32 weight
gradients, within 8 u = 3.1e-2. The bounds: fp32 2.5e-4, fp16 4.2e-3, bf16 3.2e-2.
An NPU running fp32 convolutions in HF32 (torch_npu's default for convolutions) differs by
~1e-3 and fails the fp32 bound: dump it with HF32 off, or widen the bound (`tolerance`).

How much weaker this is than a tensor comparison (the report says so in a note): four
numbers per tensor, no golden run and no reference error to scale by. A fault that
keeps each tensor's extremes, mean and norm within the bound is invisible: a wrong
permutation or transposition, a sign error or a wrong value in a few elements that are
not the extremes, any gain below the bound (at bf16: below 3%). What fails is named:
the first failing tensor in execution order, with both values of the statistic.
Statistics msprobe writes as null (empty tensors) or booleans (bool tensors) are skipped.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from align.judge.comparison import LABELS, backward_events, param_order
from align.judge.report import Report
from align.numerics.precision import unit_roundoff
from align.numerics.verdict import Row
from align.record.trace import Trace

STATS = ("Max", "Min", "Mean", "Norm")
SPREAD = {f"{s.lower()}_dev" for s in STATS}  # what a tensor without signal may excuse
# An input gradient that sums rounding only (a BatchNorm's bias gradient where what follows
# cancels it: exactly 0 in exact arithmetic) has statistics of noise, which no relative
# bound holds (measured: mobilenetv3_small_050's last BatchNorm at 64 px, Max 1.9e-8 on an
# honest half-ulp target, 3.7e-8 on the reference). It is reported, not judged, where on
# both sides its RMS is within what the rounding of the gradient its call received adds
# up to (`_sum_noise`).
NO_SIGNAL = "no signal at this precision (it sums the rounding of the gradient it came from)"
STORAGE_ULPS = 8.0  # rounding of a low-precision result, and of its statistics
ACCUMULATION = 2.5e-4  # fp32 arithmetic through a network: 16x the worst measured (1.6e-5)
_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


def bound(dtype: torch.dtype, scale: float = 1.0) -> float:
    """Largest honest relative deviation of a statistic for results rounded to `dtype`."""
    u = unit_roundoff(dtype) if dtype.is_floating_point else 0.0
    return scale * (STORAGE_ULPS * u + ACCUMULATION)


def compare_statistics(
    reference: Trace,
    target: Trace,
    *,
    phases: Any = None,
    tolerance: float | None = None,
) -> Report:
    """Judge every tensor's statistics of `target` against `reference` (aligned traces).

    Both traces' `tensors` carry `stats` (key -> dtype, shape, Max, Min, Mean, Norm), as
    align.record.msprobe's do; calls pair by (module, index). `tolerance` multiplies the bound.
    """
    scale = 1.0 if tolerance is None else float(tolerance)
    if isinstance(phases, str):
        phases = tuple(phases.split(","))
    phases = tuple(
        phases or (("forward", "backward") if reference.backward_order else ("forward",))
    )
    run_dtype = _coarsest(reference, target)
    by_key = target.by_key()
    rows: list[Row] = []
    for phase, call, slot, i in _records(reference, phases):
        tcall = by_key[call.key]
        tkeys = getattr(tcall, slot)
        r = reference.tensors.stats.get(getattr(call, slot)[i])
        t = target.tensors.stats.get(tkeys[i]) if i < len(tkeys) and tkeys[i] else None
        row = Row(call.module, call.index, phase, f"{LABELS[slot]}[{i}]", "", [])
        row = _judged(r, t, row, run_dtype, scale)
        if slot == "grad_inputs" and row is not None and row.failed and set(row.failed) <= SPREAD:
            arriving = [reference.tensors.stats.get(k) for k in call.grad_outputs if k]
            floor = _sum_noise(r, [a for a in arriving if a], bound(run_dtype, scale))
            if all(_rms(s) < floor for s in (r, t)):
                row.failed, row.message = [], NO_SIGNAL
        rows.append(row)
    if "backward" in phases:
        for name in param_order(reference):
            owner, _, leaf = name.rpartition(".")
            tkey = target.param_grads.get(name)
            rows.append(
                _judged(
                    reference.tensors.stats.get(reference.param_grads[name]),
                    target.tensors.stats.get(tkey) if tkey else None,
                    Row(owner, 0, "param_grad", leaf, "", []),
                    run_dtype,
                    scale,
                )
            )
    rows = [r for r in rows if r is not None]
    limits = {str(d): f"{bound(d, scale):.2g}" for d in (torch.float32, run_dtype)}
    report = Report(
        rows=rows,
        meta={
            "model": "msprobe statistics",
            "phases": list(phases),
            "precision": reference.meta.get("precision") or "fp32",
            "reference": reference.meta.get("path", "?"),
            "target": target.meta.get("path", "?"),
            "tolerance": {"statistics_bound": limits},
        },
    )
    report.notes.append(
        "statistics only: each tensor was judged on 4 numbers (Max, Min, Mean, Norm) "
        f"against the reference's, within {' / '.join(f'{v} ({k})' for k, v in limits.items())} "
        "relative, not element by element and with no golden run. That is much weaker "
        "evidence than a tensor comparison: a fault that keeps every tensor's extremes, "
        "mean and norm within that bound is invisible (a permutation, a few wrong "
        "elements that are not the extremes, a gain below the bound). For layer-by-layer "
        'evidence dump with "task": "tensor" and compare again'
    )
    return report


def _records(ref: Trace, phases: tuple[str, ...]):
    """(phase, call, slot, i) of each output and gradient, in execution order."""
    if "forward" in phases:
        for call in (ref.calls[p] for p in ref.forward_order or range(len(ref.calls))):
            for i, key in enumerate(call.outputs):
                if key is not None:
                    yield "forward", call, "outputs", i
    if "backward" in phases:
        for pos, slot, i in backward_events(ref):
            if getattr(ref.calls[pos], slot)[i] is not None:
                yield "backward", ref.calls[pos], slot, i


def _coarsest(*traces: Trace) -> torch.dtype:
    """The lowest-precision floating dtype any tensor of the traces has (fp32 if none)."""
    found = {
        _DTYPES[s["dtype"]]
        for t in traces
        for s in t.tensors.stats.values()
        if s["dtype"] in _DTYPES
    }
    return max(found | {torch.float32}, key=unit_roundoff)


def _judged(
    r: dict | None, t: dict | None, row: Row, run_dtype: torch.dtype, scale: float
) -> Row | None:
    """The row of one tensor: each statistic's deviation against the bound."""
    if r is None:
        return None
    if t is None:
        row.failed.append("missing")
        row.message = "on the reference, not on the target"
        return row
    row.dtype, row.shape = t["dtype"], list(t["shape"])
    if list(r["shape"]) != list(t["shape"]):
        row.failed.append("shape")
        row.message = f"shape {r['shape']} on the reference, {t['shape']} on the target"
        return row
    dtypes = [_DTYPES.get(d["dtype"], torch.float32) for d in (r, t)] + [run_dtype]
    limit = max(bound(d, scale) for d in dtypes)
    numel = max(math.prod(r["shape"]), 1)
    for stat in STATS:
        rv, tv = r[stat], t[stat]
        if not _number(rv) or not _number(tv):
            continue
        metric = f"{stat.lower()}_dev"
        row.metrics[metric] = _deviation(rv, tv, _scale(stat, r, numel))
        row.limits[metric] = limit
        if row.metrics[metric] > limit:
            row.failed.append(metric)
    if row.failed:
        stat = STATS[[f"{s.lower()}_dev" for s in STATS].index(row.worst())]
        row.message = f"{stat} {t[stat]:.7g} on the target, {r[stat]:.7g} on the reference"
    return row


def _rms(stats: dict) -> float:
    """A tensor's RMS from its statistics (inf where its norm is not a number)."""
    norm = stats["Norm"]
    return abs(norm) / math.sqrt(max(math.prod(stats["shape"]), 1)) if _number(norm) else math.inf


def _sum_noise(stats: dict, arriving: list[dict], relative: float) -> float:
    """The RMS an input gradient has when all it holds is the rounding of the gradient that
    arrived at its call: each of the m arriving elements it sums (m = their count over its
    own) errs by `relative` of their RMS, and m errors add as a random walk."""
    if not arriving:
        return 0.0
    sigma = max(_rms(a) for a in arriving)
    m = sum(math.prod(a["shape"]) for a in arriving) / max(math.prod(stats["shape"]), 1)
    return relative * sigma * math.sqrt(max(m, 1.0)) if math.isfinite(sigma) else 0.0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scale(stat: str, r: dict, numel: int) -> float:
    """What a deviation of `stat` is relative to: range, RMS or norm of the reference."""
    norm = abs(r["Norm"]) if _number(r["Norm"]) else None
    if stat == "Norm":
        return norm
    if stat == "Mean" and norm is not None:
        return norm / math.sqrt(numel)
    values = [abs(r[s]) for s in ("Max", "Min", "Mean") if _number(r[s])]
    return max(values)


def _deviation(rv: float, tv: float, scale: float) -> float:
    if not (math.isfinite(rv) and math.isfinite(tv)):
        same = rv == tv or (math.isnan(rv) and math.isnan(tv))
        return 0.0 if same else math.inf
    if tv == rv:
        return 0.0
    return abs(tv - rv) / scale if scale > 0 else math.inf
