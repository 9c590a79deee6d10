"""Judging align.Recorder dumps (align.record.loop) step by step: per step, rank by rank,
every module's tensors, parameter gradients, parameters and optimizer state after the step,
the loss scaler's scale and skipped steps; the report names the first failing step."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import nn

from align.errors import AlignError, MismatchError
from align.judge.comparison import _param_name, compare_traces, origins
from align.judge.report import Report
from align.judge.step_isolation import isolate_step
from align.judge.traces import no_signal_notes
from align.numerics import decisions, metrics
from align.numerics.decisions import WHOLE_RUN_CHOICE_FLOOR, far_choice_row
from align.numerics.precision import UNIT_ROUNDOFF, error_floor, get_policy
from align.numerics.verdict import (
    NOISE_DOMINATED,
    NOISY_ELEMENTS_MESSAGE,
    NOISY_GRADIENT_MESSAGE,
    SPREAD_METRICS,
    Divergence,
    Row,
    Tolerance,
    as_tolerance,
    carries_no_signal,
    judge_robustly,
)
from align.record.loop_dump import BEFORE, CARRIED, DRAW_ENV, DRAWS_DIR, LoopDump, Step
from align.record.trace import Call, Trace

# param group entries that choose an implementation, not the arithmetic
IMPLEMENTATION = {"foreach", "fused", "capturable", "differentiable"}
# Within a step, rows are ordered across ranks by when their tensors are made.
ORDER = {
    "weights": 0,  # what a step starts from, where the step before it is not recorded
    "input": 0,
    "forward": 1,
    "loss": 2,
    "buffer": 2,
    "backward": 3,
    "param_grad": 3,
    "scaler": 4,
    "optimizer": 5,
    "param": 6,
}


def compare(
    reference: str | os.PathLike,
    target: str | os.PathLike,
    golden: str | os.PathLike | None = None,
    *,
    tolerance: Tolerance | dict | None = None,
    name_map: dict[str, str | None] | None = None,
    model: nn.Module | None = None,
) -> Report:
    """Judge a target loop dump against a reference (and a float64 golden) step by step;
    with the `model` the script trains, the module calls of the first failing step (else
    of each step until one names a culprit: a kernel fault that the whole network's noise
    hides shows alone) are re-run alone to name the culprits (align.judge.step_isolation)."""
    started = time.perf_counter()
    ref, tgt = LoopDump(reference), LoopDump(target)
    gold = None if golden is None else LoopDump(golden)
    drawn = ref.draws() if gold is not None else []  # without a golden, nothing to scale
    ranks = sorted(ref.ranks)
    for role, dump in (("target", tgt), ("golden", gold)):
        if dump is not None and sorted(dump.ranks) != ranks:
            raise MismatchError(
                f"the reference has ranks {ranks}, the {role} {sorted(dump.ranks)}: run both "
                "with the same number of processes"
            )
    steps = sorted(set(ref.steps(ranks[0])) & set(tgt.steps(ranks[0])))
    if not steps:
        raise MismatchError(
            f"no step recorded on both sides (reference {ref.steps(ranks[0])}, target "
            f"{tgt.steps(ranks[0])}): give both Recorders the same steps="
        )
    first = ref.load(ranks[0], steps[0])
    policy = get_policy(_precision(first.info.get("output_dtypes", [])))
    tol = as_tolerance(tolerance, policy)
    strict = policy.name == "fp32"
    notes: list[str] = []
    rows: list[Row] = []
    table: list[dict[str, Any]] = []
    started_at: list[Divergence] = []
    isolated_step = steps[0]  # the first failing step, once one fails
    failed_before = False
    # per rank and parameter: the elements that took a gradient without signal
    noisy: dict[int, dict[str, torch.Tensor]] = {}
    judged_refs: dict[tuple[int, int], Step] = {}  # skipped steps, their overflow left out
    for n in steps:
        ordered = []
        for rank in ranks:
            sides = [ref.load(rank, n), tgt.load(rank, n)]
            sides[0], overflowed = _without_overflow(*sides)
            if overflowed:
                judged_refs[rank, n] = sides[0]  # (isolation re-runs it: read once)
                scale = sides[0].info["scaler"].get("scale")
                notes.append(
                    f"step {n}: the reference's loss scaler skipped the optimizer step (its "
                    f"gradients overflowed at scale {scale:g}): {overflowed} gradient tensor(s) "
                    "holding NaN/Inf there (on the target too, where its scaler skipped it) were "
                    "not judged; the golden and the draws skip it too (Recorder(..., replay=)), "
                    "the target's scaler is judged on its own"
                )
            if gold is not None:
                if n not in gold.steps(rank):
                    raise MismatchError(
                        f"the golden dump has no step {n} of rank {rank}: record the same steps"
                    )
                sides.append(gold.load(rank, n))
            draws = [d.load(rank, n) for d in drawn if rank in d.ranks and n in d.steps(rank)]
            step_rows = _judge_step(
                *sides,
                tol=tol,
                strict=strict,
                name_map=name_map or {},
                draws=draws,
                noisy=noisy.setdefault(rank, {}),
            )
            label = f"rank {rank} step {n}" if len(ranks) > 1 else f"step {n}"
            if not failed_before and any(r.failed for r in step_rows):
                # where errors start, in the first failing step only: later steps compute
                # from parameters that earlier steps' errors already moved
                started_at += [
                    replace(d, tensor=f"{label} {d.tensor}")
                    for d in origins(
                        *(side.trace for side in sides[:2]),
                        sides[2].trace if gold is not None else None,
                        step_rows,
                        tol=tol,
                        strict_dtype=strict,
                        name_map=name_map,
                        draws=[d.trace for d in draws],
                    )
                ]
                isolated_step = n
            for row in step_rows:
                row.tensor = f"{label} {row.tensor}"
            ordered += [(ORDER.get(r.phase, 1), rank, i, r) for i, r in enumerate(step_rows)]
            table.append(_step_entry(n, rank, sides, step_rows))
            notes += _step_notes(*sides)
        rows += [r for *_, r in sorted(ordered, key=lambda x: x[:3])]
        failed_before = failed_before or any(r.failed for r in rows)
    # what the model computed backward (the loss's gradient into it is not the model's)
    computed = [r for r in rows if r.phase == "param_grad" or "grad_input" in r.tensor]
    if judged_refs and not computed:
        raise AlignError(
            "no gradient could be judged: every gradient the model computed overflowed on the "
            "reference, "
            f"whose loss scaler skipped step(s) {sorted({n for _, n in judged_refs})} (a "
            "GradScaler halves its scale at each overflow, from 65536: an fp16 run's first "
            "steps are often skipped); record steps after its scale has settled "
            "(Recorder(..., steps=[...]))"
        )
    local_rows, culprits = [], []
    # the first failing step; where none fails, each step in turn until one names a
    # culprit: a fault the whole network's noise hides may only act in a later step (a
    # gradient through a BatchNorm whose weight starts at zero, as timm's last one in a
    # residual block does, is zero in the first)
    isolated = [] if model is None else [isolated_step] if failed_before else steps
    for n in isolated:
        for rank in ranks:
            label = f"rank {rank} step {n}" if len(ranks) > 1 else f"step {n}"
            sides = [judged_refs.get((rank, n)) or ref.load(rank, n), tgt.load(rank, n)]
            weights = [dump.weights_before(rank, n) for dump in (ref, tgt)]
            found = isolate_step(model, *sides, weights, tol, strict_dtype=strict, policy=policy)
            local_rows += found[0]
            culprits += [replace(d, tensor=f"{label} {d.tensor}") for d in found[1]]
            notes += found[2]
        if culprits:
            break
    notes += [
        f"the {role}'s model is compiled (torch.compile): its recorded steps ran eagerly (align's "
        "hooks need eager ops), so its compiled kernels were not judged: compare the compiled "
        "run's loss curve with the eager one's to see what compiling changes"
        for role, dump in (("reference", ref), ("target", tgt))
        if dump.ranks[ranks[0]].get("compiled")
    ]
    notes += no_signal_notes(rows)
    if partly := [r for r in rows if r.message == NOISY_ELEMENTS_MESSAGE]:
        notes.append(
            f"{len(partly)} optimizer state or parameter tensor(s) judged without their elements "
            "that took a gradient carrying no signal (an adaptive optimizer moves those by up "
            f"to its learning rate, whatever their sign): {partly[0].module} {partly[0].tensor}"
            + (" ..." if len(partly) > 1 else "")
        )
    failing = next((r for r in rows if r.failed), None)
    summary = _summary(table)
    report = Report(
        rows=rows,
        meta={
            "model": ref.ranks[ranks[0]].get("model", ""),
            "phases": ["forward", "backward", "optimizer"],
            "precision": policy.name,
            "reference": ref.ranks[ranks[0]].get("device", "?"),
            "target": tgt.ranks[ranks[0]].get("device", "?"),
            "tolerance": vars(tol),
            "timings": {"compare": time.perf_counter() - started},
            "environment": {
                "reference": ref.ranks[ranks[0]].get("environment"),
                "target": tgt.ranks[ranks[0]].get("environment"),
            },
        },
        train={
            "passed": failing is None,
            "steps": table,
            "first_divergence": None if failing is None else vars(failing.divergence()),
            "summary": summary,
            "steps_run": len(steps),
        },
    )
    report.origins, report.culprits, report.local_rows = started_at, culprits, local_rows
    skipped = sorted(set(ref.steps(ranks[0])) ^ set(tgt.steps(ranks[0])))
    if skipped:
        notes.append(f"steps {skipped} were recorded on one side only and not judged")
    if gold is None:
        notes.append(
            "no golden dump: the reference stood in for it, so limits are dtype floors only; "
            "record a float64 golden (Recorder(..., golden=True) on a CPU run of the script)"
        )
    elif drawn:
        notes.append(
            f"the reference's error is the largest of its own and {len(drawn)} honest "
            f"draws' ({ref.root / DRAWS_DIR}) where a tensor fails against its own alone"
        )
    else:
        notes.append(
            "the reference's error is a single draw: a small or cancelling gradient can "
            f"flag an honest target; run the reference script again with {DRAW_ENV}=1 and "
            f"{DRAW_ENV}=2 for two honest draws (align.record.loop)"
        )
    report.notes = list(dict.fromkeys(notes))
    return report


def _summary(table: list[dict[str, Any]]) -> str:
    """Failing tensors per step (all ranks together), after the verdict's headline."""
    counts: dict[int, list[int]] = {}
    for entry in table:
        c = counts.setdefault(entry["step"], [0, 0])
        c[0], c[1] = c[0] + entry["failing"], c[1] + entry["tensors"]
    bad = [n for n, (failing, _) in counts.items() if failing]
    head = f"first failing step {bad[0]}" if bad else "every step agrees"
    return (
        head
        + "; failing tensors "
        + ", ".join(f"step {n} {failing}/{total}" for n, (failing, total) in counts.items())
    )


def _precision(dtypes: list[str]) -> str:
    """The precision policy a run's module outputs show: autocast leaves half dtypes."""
    if "torch.bfloat16" in dtypes:
        return "amp-bf16"
    return "amp-fp16" if "torch.float16" in dtypes else "fp32"


def _judge_step(
    ref: Step,
    tgt: Step,
    gold: Step | None = None,
    *,
    tol: Tolerance,
    strict: bool,
    name_map: dict[str, str | None],
    draws: Sequence[Step] = (),
    noisy: dict[str, torch.Tensor] | None = None,
) -> list[Row]:
    """Rows of one step of one rank: data, module tensors, loss, scaler, optimizer, params;
    `draws`, the reference's honest draws of this step, widen the limits of failing ones.
    `noisy` (updated): per parameter, the elements that took a gradient carrying no
    signal, in this step or a recorded one before, on which its optimizer state and
    values are not judged (`_took_noise`)."""
    g = gold or ref
    rows = _input_rows(ref.trace, tgt.trace, g.trace, tol, strict)
    rows += compare_traces(
        ref.trace,
        tgt.trace,
        None if gold is None else gold.trace,
        tol=tol,
        strict_dtype=strict,
        name_map=name_map,
        draws=[d.trace for d in draws],
    )
    rows += _choice_rows(tgt, [s for s in (gold, *draws) if s is not None])
    noisy = {} if noisy is None else noisy
    _took_noise(ref, tgt, gold, draws, rows, name_map, noisy)
    judged = partial(_state_row, ref, tgt, g, draws, tol, strict, noisy=noisy)
    if "loss" in ref.state:
        rows.append(judged("", "loss", "loss", "loss", "loss"))
    rows += _scaler_rows(ref.info.get("scaler"), tgt.info.get("scaler"))
    optimizer_rows = partial(_optimizer_rows, ref, tgt, judged, name_map)
    rows += optimizer_rows("optimizer", "")
    # what the step started from, where the target did not take the reference's after
    # unrecorded steps (what it carried then is a note: honest runs part there)
    if not (tgt.info.get("start") or {}).get("adopted"):
        for key in (k for k in ref.state if k.startswith(BEFORE) and k in g.state):
            kind, name = key[len(BEFORE) :].split("/", 1)
            tname = _param_name(name, name_map)
            if tname is not None and kind != "optim":
                label = f"{name} before the step"
                rows.append(judged(_owner(name), "weights", label, key, f"{BEFORE}{kind}/{tname}"))
        rows += optimizer_rows("weights", BEFORE)
    group_of = {n: gi for gi, g in enumerate(ref.info.get("groups", [])) for n in g["params"]}
    for kind in ("param", "buffer"):
        for key in (k for k in ref.state if k.startswith(f"{kind}/")):
            name = key[len(kind) + 1 :]
            tname = _param_name(name, name_map)
            if tname is not None:
                group = f"group {group_of[name]} " if name in group_of else ""
                label = f"{group}{name} after the step"
                rows.append(judged(_owner(name), kind, label, key, f"{kind}/{tname}"))
    return rows


def _choice_rows(tgt: Step, honest: Sequence[Step]) -> list[Row]:
    """A failing row per index op (sort, top-k, max, a max-pool, NMS) whose own choices
    in the target's run sat far from any tie where it took the reference's: beyond
    decisions.FAR_CHOICE times the farthest of the runs that stand for the reference (`honest`: the
    golden, the draws: their inputs differ from the reference's as an honest target's
    do) and WHOLE_RUN_CHOICE_FLOOR unit roundoffs of the step's precision. Without them, none: an
    honest whole run's inputs to a choice carry its upstream error."""
    gaps = _choice_gaps(tgt)
    # (a golden or draw recorded before the gaps were: no reach to measure against)
    if not honest or not gaps or any("choice_gaps" not in h.trace.meta for h in honest):
        return []
    dtypes = [
        getattr(torch, str(d).rpartition(".")[2], None) for d in tgt.info.get("output_dtypes", [])
    ]
    unit = max([UNIT_ROUNDOFF[d] for d in dtypes if d in UNIT_ROUNDOFF], default=2.0**-24)
    reached = [_choice_gaps(h) for h in honest]
    rows = []
    for op, s in sorted(gaps.items()):
        reach = max(h.get(op, {}).get("gap", 0.0) for h in reached)
        call = s.get("call")
        where = (str(s.get("module", "")), call if isinstance(call, int) else 0)
        whose = "the golden's and honest draws'"
        row = far_choice_row(where, op, s, reach, WHOLE_RUN_CHOICE_FLOOR * unit, whose, False)
        if row is not None:
            rows.append(row)
    return rows


def _choice_gaps(step: Step) -> dict[str, dict[str, Any]]:
    """A step's `choice_gaps` meta (align.record.loop), each op's entry with a number for
    its gap; {} from a dump without it (written before) or with one that is not."""
    gaps = step.trace.meta.get("choice_gaps")
    if not isinstance(gaps, dict):
        return {}
    return {
        str(op): s
        for op, s in gaps.items()
        if isinstance(s, dict)
        and all(isinstance(s.get(k), (int, float)) for k in ("gap", "differed", "choices"))
        and math.isfinite(s["gap"])
    }


def _took_noise(
    ref: Step,
    tgt: Step,
    gold: Step | None,
    draws: Sequence[Step],
    rows: Sequence[Row],
    name_map: dict[str, str | None],
    noisy: dict[str, torch.Tensor],
) -> None:
    """Add to `noisy` each parameter's elements whose gradient carried no signal in this
    step (NOISY_ELEMENTS_MESSAGE): all of a gradient reported as carrying none, else those
    an honest run misses by half the golden's size or more. The honest runs are the
    reference, its draws and the target where its gradient passed: one run's luck decides
    an element's sign, and a draw or the target sees the flips the reference escaped."""
    grad_rows = {
        f"{r.module}.{r.tensor}" if r.module else r.tensor: r
        for r in rows
        if r.phase == "param_grad"
    }
    for name, key in ref.trace.param_grads.items():
        row = grad_rows.get(name)
        gkey = None if gold is None else gold.trace.param_grads.get(name)
        if row is not None and carries_no_signal(row):
            mask = torch.ones(ref.trace.tensor(key).shape, dtype=torch.bool)
        elif gkey is None:
            continue  # without a golden, no element's signal is known
        else:
            g = metrics.as_f64(gold.trace.tensor(gkey))
            runs = [ref.trace.tensor(key)]
            runs += [
                d.trace.tensor(d.trace.param_grads[name])
                for d in draws
                if name in d.trace.param_grads
            ]
            tkey = tgt.trace.param_grads.get(_param_name(name, name_map) or "")
            if tkey is not None and row is not None and row.passed:
                runs.append(tgt.trace.tensor(tkey))
            off = torch.zeros_like(g)
            for h in (h for h in runs if h.shape == g.shape):
                off = torch.maximum(off, metrics.as_f64(h).sub(g).abs_())
            mask = off > NOISE_DOMINATED * g.abs()
        if bool(mask.any()):
            noisy[name] = mask | noisy[name] if name in noisy else mask


def _optimizer_rows(
    ref: Step,
    tgt: Step,
    judged: Callable[..., Row],
    name_map,
    phase: str,
    prefix: str,
) -> list[Row]:
    """Rows of the optimizer's state by param group and parameter: after the step
    (`prefix` ""), or what the step started from (BEFORE: a resumed optimizer's state)."""
    rows = []
    for gi, group in enumerate(ref.info.get("groups", [])):
        for name in group["params"]:
            tname = _param_name(name, name_map)
            if tname is None:
                continue
            start = f"{prefix}optim/{gi}/{name}/"
            for key in sorted(k for k in ref.state if k.startswith(start)):
                leaf = key[len(start) :]
                label = f"group {gi} {name} {leaf}" + (" before the step" if prefix else "")
                tkey = f"{prefix}optim/{gi}/{tname}/{leaf}"
                if leaf == "step":
                    rows.append(_exact_row(_owner(name), phase, label, ref, tgt, key, tkey))
                else:
                    rows.append(judged(_owner(name), phase, label, key, tkey))
    return rows


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _input_rows(ref: Trace, tgt: Trace, gold: Trace, tol: Tolerance, strict: bool) -> list[Row]:
    """The data: floating inputs of each top-level call of the model."""
    rows = []
    tcalls, gcalls = tgt.by_key(), gold.by_key()
    for call in (c for c in ref.calls if c.parent is None):
        tcall, gcall = tcalls.get(call.key), gcalls.get(call.key)
        for i, key in enumerate(call.inputs):
            if key is None or not ref.tensor(key).is_floating_point():
                continue
            row = Row(call.module, call.index, "input", f"input[{i}]", "", [])
            tkey = tcall.inputs[i] if tcall and i < len(tcall.inputs) else None
            gkey = gcall.inputs[i] if gcall and i < len(gcall.inputs) else None
            if tkey is None or gkey is None:
                row.failed.append("missing")
                row.message = f"model input {i} exists on the reference only"
                rows.append(row)
                continue
            rows.append(
                _judged(ref.tensor(key), tgt.tensor(tkey), gold.tensor(gkey), tol, strict, row)
            )
    return rows


def _state_row(
    ref: Step,
    tgt: Step,
    gold: Step,
    draws: Sequence[Step],
    tol,
    strict,
    module: str,
    phase: str,
    label,
    key,
    tkey,
    noisy: dict[str, torch.Tensor] | None = None,
) -> Row:
    """`key` of the reference judged against the target's `tkey`. The optimizer state
    and value of a parameter are judged without its elements in `noisy` where they fail
    on a spread metric only (NOISY_ELEMENTS_MESSAGE; NOISY_GRADIENT_MESSAGE: all of them)."""
    row = Row(module, 0, phase, label, "", [])
    if tkey not in tgt.state:
        row.failed.append("missing")
        row.message = f"{key} is recorded on the reference, not on the target"
        return row
    if key not in gold.state:
        raise MismatchError(f"the golden dump has no {key}: record it with the same optimizer")
    drawn = [d.state[key] for d in draws if key in d.state]
    row = _judged(ref.state[key], tgt.state[tkey], gold.state[key], tol, strict, row, drawn)
    parts = key.split("/")
    took = parts[2] if parts[0] == "optim" else parts[1] if parts[0] == "param" else None
    mask = (noisy or {}).get(took)
    if mask is None or not row.failed or not set(row.failed) <= SPREAD_METRICS:
        return row
    if bool(mask.all()):
        row.failed, row.message = [], NOISY_GRADIENT_MESSAGE
    elif mask.shape == ref.state[key].shape:
        keep = ~mask
        row = _judged(
            ref.state[key][keep],
            tgt.state[tkey][keep],
            gold.state[key][keep],
            tol,
            strict,
            Row(module, 0, phase, label, "", []),
            [d[keep] for d in drawn],
        )
        row.shape = list(ref.state[key].shape)
        row.message = row.message or NOISY_ELEMENTS_MESSAGE
    return row


def _judged(
    r: torch.Tensor,
    t: torch.Tensor,
    g: torch.Tensor,
    tol,
    strict,
    row: Row,
    draws: Sequence[torch.Tensor] = (),
) -> Row:
    if t.shape != r.shape or g.shape != r.shape:
        raise MismatchError(
            f"{row.module or '<model>'} {row.phase} {row.tensor}: shape {tuple(r.shape)} on the "
            f"reference, {tuple(t.shape)} on the target, {tuple(g.shape)} in the golden run; "
            "the runs did not train the same model on the same batches"
        )
    return judge_robustly(
        t, r, g, tol, strict_dtype=strict, local=False, row=row, draws=lambda _: draws
    )


def _exact_row(module: str, phase: str, label: str, ref: Step, tgt: Step, key, tkey) -> Row:
    """A count (an optimizer's step): equal or wrong."""
    r = float(ref.state[key])
    t = float(tgt.state[tkey]) if tkey in tgt.state else math.nan
    return _differs(module, phase, label, r, t)


def _differs(module: str, phase: str, label: str, r: Any, t: Any) -> Row:
    row = Row(module, 0, phase, label, "", [])
    row.metrics["differs"], row.limits["differs"] = float(r != t), 0.0
    if r != t:
        row.failed.append("differs")
        row.message = f"{r} on the reference, {t} on the target"
    return row


def _scaler_rows(ref: dict | None, tgt: dict | None) -> list[Row]:
    if ref is None and tgt is None:
        return []
    ref, tgt = ref or {}, tgt or {}
    return [
        _differs("", "scaler", what, ref.get(what), tgt.get(what)) for what in ("scale", "skipped")
    ]


def _step_entry(n: int, rank: int, sides: list[Step], rows: list[Row]) -> dict[str, Any]:
    """One line of the report's per-step table."""
    losses = [float(s.state["loss"]) if "loss" in s.state else None for s in sides]
    failing = next((r for r in rows if r.failed), None)
    return {
        "step": n,
        "rank": rank,
        "tensors": len(rows),
        "failing": sum(not r.passed for r in rows),
        "loss": dict(zip(("reference", "target", "golden"), losses)),
        "scaler": sides[1].info.get("scaler"),
        "first_divergence": None if failing is None else str(failing.divergence()),
    }


def _without_overflow(ref: Step, tgt: Step) -> tuple[Step, int]:
    """The reference's step without the gradients that overflowed where its loss scaler
    skipped the step (NaN/Inf: nothing to measure a target by), on its side or, where the
    target's scaler skipped it too, on the target's (two honest runs at the edge of fp16's
    range overflow in other elements); and how many were left out. Every tensor of a step
    the reference's scaler did not skip is kept: NaN/Inf there is an error."""
    skipped = [bool((side.info.get("scaler") or {}).get("skipped")) for side in (ref, tgt)]
    if not skipped[0]:
        return ref, 0
    overflowed: set[tuple] = set()  # (module, call index, slot, i), or a parameter's name
    for side in (ref, tgt)[: 1 + skipped[1]]:
        trace = side.trace

        def bad(key: Any, trace: Trace = trace) -> bool:
            return isinstance(key, str) and not metrics.all_finite(trace.tensor(key).double())

        for call in trace.calls:
            for slot in ("grad_outputs", "grad_inputs"):
                keys = getattr(call, slot)
                overflowed |= {(*call.key, slot, i) for i, k in enumerate(keys) if bad(k)}
        own = trace.meta.get("backward_grads")
        for grads in (trace.param_grads, own if isinstance(own, dict) else {}):
            overflowed |= {name for name, key in grads.items() if bad(key)}

    def kept(call: Call, slot: str) -> list[str | None]:
        keys = getattr(call, slot)
        return [None if (*call.key, slot, i) in overflowed else k for i, k in enumerate(keys)]

    trace = ref.trace
    calls = [
        replace(c, grad_outputs=kept(c, "grad_outputs"), grad_inputs=kept(c, "grad_inputs"))
        for c in trace.calls
    ]
    grads = {n: k for n, k in trace.param_grads.items() if n not in overflowed}
    meta = dict(trace.meta)
    if isinstance(meta.get("backward_grads"), dict):
        meta["backward_grads"] = {
            n: k for n, k in meta["backward_grads"].items() if n not in overflowed
        }
    filtered = replace(trace, calls=calls, param_grads=grads, meta=meta)
    return replace(ref, trace=filtered), len(overflowed)


def _step_notes(ref: Step, tgt: Step, gold: Step | None = None) -> list[str]:
    """Hyperparameters that differ and discrete choices not replayed, as the report's notes."""
    notes = []
    for gi, (rg, tg) in enumerate(zip(ref.info.get("groups", []), tgt.info.get("groups", []))):
        for key, value in rg["hyper"].items():
            if key not in IMPLEMENTATION and tg["hyper"].get(key, value) != value:
                notes.append(
                    f"param group {gi}: {key} is {value} on the reference, "
                    f"{tg['hyper'][key]} on the target"
                )
    for role, side in (("target", tgt), ("golden", gold)):
        if side is None:
            continue
        if ref.trace.decisions and side.trace.meta.get("decisions") != "replayed":
            notes.append(
                f"the {role} made its own discrete choices (sort, max-pool indices): record "
                "it with Recorder(..., replay=REFERENCE_DIR) (align.numerics.decisions)"
            )
        elif side.trace.meta.get("decisions_differed"):
            notes.append(decisions.note(role, side.trace.meta["decisions_differed"]))
    start = tgt.info.get("start") or {}
    if start.get("adopted"):
        notes.append(_carried_note(ref, tgt, gold, start))
    return notes


def _carried_note(ref: Step, tgt: Step, gold: Step | None, start: dict[str, Any]) -> str:
    """What the target carried into a step after unrecorded steps, before it took the
    reference's state (align.record.loop `Recorder._start_state`): reported, not judged.
    Names the parameter most out of line: its error against the golden's own carried
    state, in units of the reference's (of the dtype's floor, at least)."""
    worst, where, errors = 0.0, "", (0.0, 0.0)
    for key, t in tgt.state.items():
        if not key.startswith(f"{CARRIED}param/"):
            continue
        rest = key[len(CARRIED) :]
        r = ref.state.get(BEFORE + rest)
        g = r if gold is None else gold.state.get(key, gold.state.get(BEFORE + rest))
        if r is None or g is None or not r.shape == t.shape == g.shape:
            continue
        against = metrics.Against(metrics.as_f64(g))
        own, theirs = (against.partial(metrics.as_f64(x))[0]["rel_rmse"] for x in (t, r))
        ratio = own / max(theirs, error_floor(r.dtype))
        if ratio > worst:
            worst, where, errors = ratio, rest[len("param/") :], (own, theirs)
    whose = "the golden's" if gold is not None else "the reference's"
    moved = (
        f"; most out of line, {where}: {errors[0]:.3g} off {whose} own, the reference "
        f"{errors[1]:.3g}"
        if where
        else ""
    )
    missing = start.get("not_adopted") or []
    return (
        f"step {tgt.number}: the target started it from the reference's state (replay=) after "
        f"{start.get('unrecorded_before')} unrecorded steps, whose choices are not replayed "
        f"and where honest runs part; what it carried there is reported, not judged (record "
        f"the run's first step to judge how it starts){moved}"
        + (
            f"; {len(missing)} entries it could not take, by name and shape: {missing[:3]}"
            if missing
            else ""
        )
    )
