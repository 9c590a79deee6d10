"""The public entry points: align.check, align.capture, align.compare."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align import decisions, environment
from align.capture import LossFn, Run, capture, honest_draw, run_model
from align.comparison import compare_traces
from align.devices import resolve
from align.errors import AlignError, MismatchError
from align.isolation import isolate
from align.jitter import Pool
from align.precision import Policy, get_policy
from align.result import Report
from align.trace import Trace, load_trace
from align.verdict import NO_SIGNAL_MESSAGE, Row, Tolerance

PHASES = ("forward", "backward", "train")
IDENTICAL = "the target reproduced the reference bit for bit"

__all__ = ["check", "capture", "compare"]

log = logging.getLogger(__name__)  # stage lines; the command line shows them on stderr


def _phases(phases: Any) -> tuple[str, ...]:
    if isinstance(phases, str):
        phases = [p for p in phases.split(",") if p]
    phases = tuple(phases)
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise AlignError(f"unknown phase(s) {unknown or phases}: choose from {', '.join(PHASES)}")
    return phases


def _tolerance(tolerance: Any, policy: Policy) -> Tolerance:
    if isinstance(tolerance, Tolerance):
        return tolerance
    unknown = sorted(set(tolerance or {}) - {"k", "floor"})
    if unknown:
        raise AlignError(f"unknown tolerance key(s) {', '.join(map(str, unknown))}: known k, floor")
    return Tolerance(**{"k": policy.default_k, **(tolerance or {})})


def _device_numerics(device: torch.device, policy: Policy) -> str | None:
    """The reduced-precision math a real device applies in fp32 (HF32/TF32), as switches."""
    if policy.name != "fp32":
        return None
    flags = environment.numerics_flags()
    switches = []
    if device.type == "npu":
        switches += ["hf32-conv"] if flags.get("npu.conv.allow_hf32") else []
        switches += ["hf32-matmul"] if flags.get("npu.matmul.allow_hf32") else []
    elif device.type == "cuda":
        switches += ["tf32-conv"] if flags["cudnn.allow_tf32"] else []
        switches += ["tf32-matmul"] if flags["cuda.matmul.allow_tf32"] else []
    return ",".join(switches) or None


def _identical(a: Trace, b: Trace) -> bool:
    """True when two in-memory traces hold the same records bit for bit."""
    if [(c.key, len(c.outputs)) for c in a.calls] != [(c.key, len(c.outputs)) for c in b.calls]:
        return False
    for ca, cb in zip(a.calls, b.calls):
        for slot in ("outputs", "grad_outputs", "grad_inputs"):
            for ka, kb in zip(getattr(ca, slot), getattr(cb, slot)):
                if (ka is None) != (kb is None):
                    return False
                if ka is not None and not _same(a.tensor(ka), b.tensor(kb)):
                    return False
    if a.param_grads.keys() != b.param_grads.keys():
        return False
    return all(_same(a.tensor(a.param_grads[n]), b.tensor(b.param_grads[n])) for n in a.param_grads)


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.cpu(), y.cpu())


def _require_judged(rows: list[Row], phases: tuple[str, ...]) -> None:
    """AlignError when a forward or backward phase judged no tensor: nothing compared must
    never read as aligned."""
    judged = {"backward" if r.phase == "param_grad" else r.phase for r in rows}
    for phase in phases:
        if phase != "train" and phase not in judged:
            raise AlignError(
                f"no tensor of phase {phase} was judged: the reference records none (or "
                f"name_map maps every module away); dump the runs with that phase, or leave "
                f"it out of phases"
            )


def _no_signal_notes(rows: list[Row]) -> list[str]:
    """The note on whole-network tensors left unjudged for carrying no signal."""
    quiet = [r for r in rows if r.message == NO_SIGNAL_MESSAGE]
    if not quiet:
        return []
    shown = ", ".join(f"{r.module or '<model>'} {r.phase} {r.tensor}" for r in quiet[:3])
    return [
        f"{len(quiet)} whole-network tensor(s) carry no signal at this precision (the "
        f"reference misses them by more than their size: a cancelling sum, a BatchNorm over "
        f"a few values), reported, not judged: {shown}{' ...' if len(quiet) > 3 else ''}"
    ]


def _require_registered_case(role: str, case: Any) -> None:
    """AlignError unless a dump's case is None or a registered case: the name picks the
    golden file of tolerances, so a free string could pick any file on disk."""
    from align.cases import is_case

    if case is not None and not (isinstance(case, str) and is_case(case)):
        raise AlignError(
            f"the {role} dump names case {case!r}, which is not a registered case "
            f"(python -m align.list): dump it again with python -m align.dump"
        )


def _float64_only(gold: Trace) -> Trace:
    """The golden trace, refused unless it is a float64 run: its meta precision now, each
    floating tensor as it is read (a float32 'golden' would make any target pass)."""
    precision = gold.meta.get("precision")
    if precision != "fp64":
        raise AlignError(
            f"the golden trace must be a float64 run (precision fp64), not precision "
            f"{precision}: dump it with python -m align.dump MODEL --golden"
        )
    return dataclasses.replace(gold, tensors=_Float64Tensors(gold.tensors))


class _Float64Tensors:
    """A golden trace's tensors, each refused as it is read unless float64 (or integer)."""

    def __init__(self, tensors: Any):
        self.tensors = tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self.tensors[key]
        if tensor.is_floating_point() and tensor.dtype != torch.float64:
            raise AlignError(
                f"golden tensor {key} is {str(tensor.dtype).replace('torch.', '')}, not "
                f"float64: a golden run must be float64 throughout (python -m align.dump "
                f"MODEL --golden)"
            )
        return tensor

    def __contains__(self, key: str) -> bool:
        return key in self.tensors


def check(
    model: nn.Module | str,
    inputs: Any = None,
    *,
    target_model: nn.Module | None = None,
    reference: str = "cpu",
    target: str = "auto",
    precision: str = "fp32",
    phases: Any = ("forward", "backward"),
    loss_fn: LossFn | None = None,
    seed: int = 0,
    steps: int = 5,
    emulate: str | None = None,
    tolerance: Tolerance | dict | None = None,
    name_map: dict[str, str | None] | None = None,
    isolate_modules: bool = True,
    sensitivity: bool = False,
    draws: int = 2,
    batch: int | None = None,
    image_size: int | None = None,
    train_options: Any = None,
    target_train_options: Any = None,
) -> Report:
    """Run `model` on the reference, the target and a float64 golden, and judge the target.

    `model` is an nn.Module or a registered case / timm model name (then `inputs`, the
    loss and the tolerances come from the case). `emulate` makes a CPU target emulate a
    device's number formats (align.emulate); the reference then runs at the same
    precision and the target with oneDNN off (ATen's own kernels), so it differs as a
    device's kernels would.
    `draws` honest draws of the reference (align.jitter) set how much its error varies;
    0 judges against the reference's single draw.
    `train_options` / `target_train_options` (align.training.TrainOptions) set how the
    "train" phase trains; the target's default to the reference's.
    """
    from align.models import resolve_model

    started = time.perf_counter()
    phases = _phases(phases)
    if "train" in phases:
        from align.training import require_steps

        require_steps(steps)
    policy = get_policy(precision)
    resolved = resolve_model(model, inputs, loss_fn, seed, batch, image_size)
    tol = _tolerance(
        tolerance if tolerance is not None else resolved.tolerance(phases, policy.name), policy
    )
    ref_dev, tgt_dev = resolve(reference), resolve(target)
    target_numerics = emulate
    if emulate and tgt_dev.type != "cpu":
        raise AlignError(f"--emulate is for a CPU target; the target here is {tgt_dev}")
    if not emulate:
        target_numerics = _device_numerics(tgt_dev, policy)
    emulation = _parse(target_numerics)
    meta: dict[str, Any] = {
        "case": resolved.case,
        "model": resolved.label,
        "phases": list(phases),
        "precision": policy.name,
        "reference": str(ref_dev),
        "target": str(tgt_dev),
        "emulate": emulate or None,
        "reference_numerics": target_numerics,
        "seed": seed,
        "tolerance": vars(tol),
    }
    report = Report(meta=meta)
    if emulation is not None:
        report.notes.append(f"the reference runs at the target's precision: {emulation.describe()}")
    timings: dict[str, float] = {}
    grad = "backward" in phases
    if grad or "forward" in phases:
        common = dict(
            policy=policy,
            backward=grad,
            loss_fn=resolved.loss_fn,
            seed=seed,
            loss_scale=policy.check_loss_scale,
            emulation=emulation,
            grad_inputs=resolved.grad_inputs,
        )
        t0 = time.perf_counter()
        log.info("reference run: %s on %s at %s", resolved.label, ref_dev, policy.name)
        ref_run = run_model(resolved.model, resolved.inputs, device=ref_dev, **common)
        timings["reference"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        log.info("target run on %s%s", tgt_dev, f" emulating {emulate}" if emulate else "")
        tgt_run = run_model(
            target_model if target_model is not None else resolved.model,
            resolved.inputs,
            device=tgt_dev,
            native_kernels=bool(emulate),
            replay=ref_run.decisions.choices,
            **common,
        )
        timings["target"] = time.perf_counter() - t0
        report.rows += [fault.row(isolated=False) for fault in tgt_run.decisions.faults]
        if _identical(ref_run.trace, tgt_run.trace):
            report.notes.append(IDENTICAL)
        else:
            _judge_runs(
                report,
                resolved,
                ref_run,
                tgt_run,
                phases,
                tol,
                policy,
                name_map,
                isolate_modules,
                sensitivity,
                draws,
                timings,
            )
    if "train" in phases:
        from align.training import short_train

        t0 = time.perf_counter()
        log.info("short training: %d steps on the reference, the target and the golden", steps)
        report.train = short_train(
            resolved,
            target_model=target_model,
            reference=ref_dev,
            target=tgt_dev,
            policy=policy,
            steps=steps,
            seed=seed,
            tol=tol,
            emulation=emulation,
            native_kernels=bool(emulate),
            options=train_options,
            target_options=target_train_options,
        )
        timings["train"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    log.info("done in %.0f s", timings["total"])
    meta["timings"] = timings
    meta["environment"] = environment.record(
        {"reference": str(ref_dev), "target": str(tgt_dev), "golden": "cpu float64"}
    )
    meta["command"] = resolved.command(phases, policy.name, reference, target, emulate)
    return report


def _judge_runs(
    report,
    resolved,
    ref_run: Run,
    tgt_run: Run,
    phases,
    tol,
    policy,
    name_map,
    isolate_modules,
    sensitivity,
    draws: int,
    timings,
) -> None:
    backward = "backward" in phases
    t0 = time.perf_counter()
    log.info("golden run: float64 on cpu")
    gold_run = run_model(
        resolved.model,
        resolved.inputs,
        device=torch.device("cpu"),
        policy=get_policy("fp64"),
        backward=backward,
        loss_fn=resolved.loss_fn,
        seed=ref_run.seed,
        loss_scale=ref_run.loss_scale,
        grad_inputs=resolved.grad_inputs,
        replay=ref_run.decisions.choices,
    )
    timings["golden"] = time.perf_counter() - t0
    for who, run in (("target", tgt_run), ("golden", gold_run)):
        if summary := run.decisions.summary():
            report.notes.append(decisions.note(who, summary))

    def draw_trace(k: int) -> Trace:
        t0 = time.perf_counter()
        log.info("honest draw %d of the reference (tensors fail against its error)", k + 1)
        made = honest_draw(
            resolved.model,
            resolved.inputs,
            ref_run,
            k,
            loss_fn=resolved.loss_fn,
            grad_inputs=resolved.grad_inputs,
        )
        timings["draws"] = timings.get("draws", 0.0) + time.perf_counter() - t0
        return made

    draw_traces = Pool(draw_trace, draws)
    strict = policy.name == "fp32"
    t0 = time.perf_counter()
    log.info("comparison of the target with the golden, relative to the reference")
    report.rows += compare_traces(
        ref_run.trace,
        tgt_run.trace,
        gold_run.trace,
        tol=tol,
        phases=phases,
        strict_dtype=strict,
        name_map=name_map,
        draws=draw_traces,
    )
    _require_judged(report.rows, phases)
    timings["compare"] = time.perf_counter() - t0 - timings.get("draws", 0.0)
    report.notes += _no_signal_notes(report.rows)
    if "draws" in timings:
        report.notes.append(
            f"tensors failing against the reference's error were judged again against the "
            f"largest of the reference's and {len(draw_traces.made)} honest draws' "
            f"(align.jitter)"
        )
    if isolate_modules:
        t0 = time.perf_counter()
        log.info("isolation: %d module calls re-run alone", len(ref_run.trace.calls))
        report.local_rows, report.culprits, notes = isolate(
            ref_run,
            tgt_run,
            gold_run,
            tol=tol,
            backward=backward,
            strict_dtype=strict,
            name_map=name_map,
            draws=draws,
        )
        report.notes += notes
        timings["isolation"] = time.perf_counter() - t0
        if not report.culprits and any(r.failed for r in report.rows):
            report.notes.append(
                "the whole network diverges but every isolated module is right on the "
                "reference's inputs: look for a discontinuity at the first divergence (a ReLU "
                "input or a max-pool tie that honest rounding put on the other side) or for "
                "errors that only add up across modules"
            )
    if sensitivity and ref_run.emulation is not None:
        from align.sensitivity import emulation_sensitivity

        report.sensitivity = emulation_sensitivity(ref_run, gold_run)


def _parse(spec: str | None):
    if not spec:
        return None
    from align.emulate import parse_emulation

    return parse_emulation(spec)


def compare(
    reference: Trace | str | Path,
    target: Trace | str | Path,
    golden: Trace | str | Path | None = None,
    *,
    tolerance: Tolerance | dict | None = None,
    phases: Any = None,
    name_map: dict[str, str | None] | None = None,
) -> Report:
    """Judge a target trace against a reference trace (and a float64 golden trace).

    Traces may be directories written by `Trace.save` or msprobe dumps. Without a
    golden the reference stands in for it and only dtype floors remain as limits.
    Dumps of align.Recorder (a training loop) are judged step by step (align.loop).
    """
    from align import loop

    if loop.is_dump(reference):
        return loop.compare(reference, target, golden, tolerance=tolerance, name_map=name_map)
    from align import msprobe

    if not isinstance(reference, Trace) and not isinstance(target, Trace):
        if msprobe.is_msprobe_dump(reference) and msprobe.is_msprobe_dump(target):
            # steps/ranks paired, API calls aligned, statistics-only dumps judged as such
            return msprobe.compare_dumps(
                reference, target, golden, tolerance=tolerance, phases=phases, name_map=name_map
            )
    traces = [
        t if isinstance(t, Trace) or t is None else load_trace(t)
        for t in (reference, target, golden)
    ]
    ref, tgt, gold = traces
    for role, trace in (("reference", ref), ("target", tgt), ("golden", gold)):
        if trace is not None:
            _require_registered_case(role, trace.meta.get("case"))
    if gold is not None:
        gold = _float64_only(gold)
    precision = ref.meta.get("precision") or "fp32"
    policy = get_policy(precision) if precision != "unknown" else get_policy("fp32")
    if tgt.meta.get("precision") not in (None, precision):
        raise MismatchError(
            f"the reference was dumped at {precision}, the target at "
            f"{tgt.meta.get('precision')}: dump both at the same precision"
        )
    if phases is None:
        phases = ("forward", "backward") if ref.backward_order else ("forward",)
    phases = _phases(phases)
    if tolerance is None and ref.meta.get("case"):
        from align.golden import case_tolerance

        tolerance = case_tolerance(ref.meta["case"], phases, policy.name)
    tol = _tolerance(tolerance, policy)
    started = time.perf_counter()
    rows = compare_traces(
        ref,
        tgt,
        gold,
        tol=tol,
        phases=phases,
        strict_dtype=policy.name == "fp32",
        name_map=name_map,
        draws=ref.draws,
    )
    _require_judged(rows, phases)
    report = Report(
        rows=rows,
        notes=_no_signal_notes(rows),
        meta={
            "case": ref.meta.get("case"),
            "model": ref.meta.get("model", ""),
            "phases": list(phases),
            "precision": policy.name,
            "reference": ref.meta.get("device", "?"),
            "target": tgt.meta.get("device", "?"),
            "emulate": tgt.meta.get("emulate"),
            "tolerance": vars(tol),
            "timings": {"compare": time.perf_counter() - started},
            "environment": {
                "reference": ref.meta.get("environment"),
                "target": tgt.meta.get("environment"),
            },
        },
    )
    # a dump reads its tensors from disk: confirm bit for bit only where every judged
    # tensor already measured exactly as the reference did (no second read otherwise)
    if all(r.metrics == r.reference for r in rows) and _identical(ref, tgt):
        report.notes.append(IDENTICAL)
    if gold is None:
        report.notes.append(
            "no golden trace: the reference stood in for it, so limits are dtype floors "
            "only; dump a float64 golden (python -m align.dump MODEL --golden) for a "
            "verdict relative to the reference's own error"
        )
    if gold is not None and not ref.draws:
        report.notes.append(
            "the reference's error is a single draw (its dump has no honest draws): on "
            "small or cancelling gradients that can flag an honest target; dump the "
            "reference with --draws 2"
        )
    for role, trace in (("target", tgt), ("golden", gold)):
        if ref.decisions and trace is not None and trace.meta.get("decisions") != "replayed":
            report.notes.append(
                f"the {role} dump made its own discrete choices (sort, max-pool indices): "
                f"where honest rounding breaks a near-tie otherwise, it shows as a jump; "
                f"dump it with --decisions REFERENCE_DIR (align.decisions)"
            )
        elif trace is not None and trace.meta.get("decisions_differed"):
            report.notes.append(decisions.note(role, trace.meta["decisions_differed"]))
    if ref.meta.get("seed") != tgt.meta.get("seed"):
        report.notes.append(
            f"seeds differ (reference {ref.meta.get('seed')}, target {tgt.meta.get('seed')})"
        )
    report.notes.append("localization by isolation needs the model: use align.check")
    return report
