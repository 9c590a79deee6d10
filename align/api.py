"""The public entry points: align.check, align.capture, align.compare."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align.errors import AlignError
from align.judge import msprobe_dumps
from align.judge import steps as loop_steps
from align.judge.comparison import compare_traces
from align.judge.isolation import choice_floor, isolate
from align.judge.report import Report
from align.judge.sensitivity import emulation_sensitivity
from align.judge.traces import IDENTICAL, identical, judge_traces, no_signal_notes, require_judged
from align.judge.training import TrainOptions, require_steps, short_train
from align.numerics import decisions, metrics
from align.numerics.emulate import parse_emulation
from align.numerics.jitter import Pool
from align.numerics.names import parse_phases
from align.numerics.precision import Policy, get_policy
from align.numerics.verdict import HEADROOM_MESSAGE, OVERFLOW_HEADROOM, Tolerance, as_tolerance
from align.record.capture import (
    LossFn,
    Run,
    all_inputs_but,
    capture,
    honest_draw,
    run_model,
    undifferentiable_inputs,
)
from align.record.loop_dump import is_dump as is_loop_dump
from align.record.msprobe import is_msprobe_dump
from align.record.readers import load_trace
from align.record.trace import BACKWARD_SLOTS, Call, Trace
from align.runtime import environment
from align.runtime.devices import resolve
from align.runtime.wrappers import wrapped
from align.zoo.models import resolve_model

__all__ = ["check", "capture", "compare"]

log = logging.getLogger(__name__)  # stage lines; the command line shows them on stderr


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


@dataclass(frozen=True)
class CheckOptions:
    """How `align.check` runs, beyond the model, its inputs, the devices, the precision,
    the phases and the tolerance. Each field can also be passed to `check` by name."""

    steps: int = 5  # optimizer steps of the "train" phase
    emulate: str | None = None  # a CPU target emulating a device's numerics (npu-fp32, ...)
    name_map: dict[str, str | None] | None = None  # target module -> reference's (None: skip)
    isolate_modules: bool = True  # re-run failing modules alone to name the culprits
    sensitivity: bool = False  # with emulate: rank layers by the harm of the emulated format
    draws: int = 2  # most honest draws of the reference made when a tensor fails (0: none)
    batch: int | None = None  # batch size of a named case's inputs (its default otherwise)
    image_size: int | None = None  # image size of a named case's inputs
    train_options: TrainOptions | None = None  # how the "train" phase trains (recipe's SGD)
    target_train_options: TrainOptions | None = None  # the target's (default: the same)
    # which inputs backward differentiates: grad_inputs(inputs) returns them (None: every
    # floating one, less those whose gradient the model itself makes NaN or infinite)
    grad_inputs: Callable[[Any], Any] | None = None


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
    tolerance: Tolerance | dict | None = None,
    options: CheckOptions | None = None,
    **option_fields: Any,
) -> Report:
    """Run `model` on the reference, the target and a float64 golden, and judge the target.

    Args:
        model: an nn.Module, or a registered case / timm model name (then `inputs`, the
            loss and the tolerances come from the case), or MODULE:FUNCTION, the user's
            builder of a model, (model, inputs) or (model, inputs, loss_fn).
        inputs: a tensor, a tuple or a dict of them (None for a named case).
        target_model: a second implementation (a ported model) run on the target instead
            of a copy of `model`, compared module by module.
        reference, target: devices ("cpu", "cuda", "npu:1", "auto": the best present).
        precision: fp32, amp-fp16, amp-bf16, o2-fp16 (aliases O1, O2, bf16).
        phases: any of "forward", "backward", "train" (a short training), or a comma list.
        loss_fn: loss(output, inputs) for backward and training; None: align's default.
        seed: seeds the runs (and a named case's inputs).
        tolerance: a Tolerance or {"k", "floor"}; None: the case's golden file, else the
            precision's default k.
        options: a CheckOptions for the rest; its fields may also be given by name
            (`check(model, x, steps=3)` is `check(model, x, options=CheckOptions(steps=3))`).

    A CPU target with `emulate` emulates a device's number formats (align.numerics.emulate);
    the reference then runs at the same precision and the target with oneDNN off, so it
    differs as a device's kernels would.
    """
    options = _options(options, option_fields)
    started = time.perf_counter()
    phases = parse_phases(phases)
    if "train" in phases:
        require_steps(options.steps)
    policy = get_policy(precision)
    compiled = []  # align's hooks run a compiled model eagerly: its own names, its eager ops
    if isinstance(model, nn.Module):
        model, was = wrapped(model)
        compiled += ["model"] * was
    if target_model is not None:
        target_model, was = wrapped(target_model)
        compiled += ["target_model"] * was
    resolved = resolve_model(model, inputs, loss_fn, seed, options.batch, options.image_size)
    if options.grad_inputs is not None:
        resolved = dataclasses.replace(resolved, grad_inputs=options.grad_inputs)
    tol = as_tolerance(
        tolerance if tolerance is not None else resolved.tolerance(phases, policy.name), policy
    )
    ref_dev, tgt_dev = resolve(reference), resolve(target)
    target_numerics = options.emulate
    if options.emulate and tgt_dev.type != "cpu":
        raise AlignError(f"--emulate is for a CPU target; the target here is {tgt_dev}")
    if not options.emulate:
        target_numerics = _device_numerics(tgt_dev, policy)
    emulation = _parse(target_numerics)
    meta: dict[str, Any] = {
        "case": resolved.case,
        "model": resolved.label,
        "phases": list(phases),
        "precision": policy.name,
        "reference": str(ref_dev),
        "target": str(tgt_dev),
        "emulate": options.emulate or None,
        "reference_numerics": target_numerics,
        "seed": seed,
        "tolerance": vars(tol),
    }
    report = Report(meta=meta)
    report.notes += [
        f"{name} is compiled (torch.compile): align runs it eagerly (its hooks need eager "
        "ops), so its compiled kernels are not what is judged"
        for name in compiled
    ]
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
        log.info("reference run: %s on %s at %s", resolved.label, ref_dev, policy.name)
        ref_run, tgt_run = _runs(
            resolved,
            target_model if target_model is not None else resolved.model,
            (ref_dev, tgt_dev),
            options.emulate,
            common,
            timings,
        )
        if common["grad_inputs"] is not resolved.grad_inputs:
            resolved = dataclasses.replace(resolved, grad_inputs=common["grad_inputs"])
            report.notes.append(UNDIFFERENTIATED_NOTE)
        if ref_run.loss_scale != common["loss_scale"]:
            report.notes.append(
                f"gradients overflowed {policy.low_precision} at loss scale "
                f"{common['loss_scale']:g} (the reference's, or came within "
                f"{OVERFLOW_HEADROOM:g}x of its largest value; or the target's): every run "
                f"used {ref_run.loss_scale:g}, as a GradScaler backs off"
            )
        meta["loss_scale"] = ref_run.loss_scale
        # (a target whose own index choices sat off a tie where it took the replayed ones
        # is isolated: the replay made its values the reference's, not its kernel)
        floor = choice_floor(tgt_run)
        chose = any(s.gap > floor for s in tgt_run.decisions.choice_gaps().values())
        if identical(ref_run.trace, tgt_run.trace) and not chose:
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
                options,
                timings,
            )
    if "train" in phases:
        t0 = time.perf_counter()
        log.info(
            "short training: %d steps on the reference, the target and the golden", options.steps
        )
        report.train = short_train(
            resolved,
            target_model=target_model,
            reference=ref_dev,
            target=tgt_dev,
            policy=policy,
            steps=options.steps,
            seed=seed,
            tol=tol,
            emulation=emulation,
            native_kernels=bool(options.emulate),
            options=options.train_options,
            target_options=options.target_train_options,
            draws=options.draws,
        )
        timings["train"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    log.info("done in %.0f s", timings["total"])
    meta["timings"] = timings
    meta["environment"] = environment.record(
        {"reference": str(ref_dev), "target": str(tgt_dev), "golden": "cpu float64"}
    )
    meta["command"] = resolved.command(phases, policy.name, reference, target, options.emulate)
    return report


def _runs(
    resolved: Any,
    target_model: nn.Module,
    devices: tuple[torch.device, torch.device],
    emulate: str | None,
    common: dict,
    timings: dict[str, float],
) -> tuple[Run, Run]:
    """The reference and target runs at the check loss scale; where scaled gradients
    overflow fp16 (amp-fp16 and o2-fp16 scale the loss by 2^12) on the target, or on the
    reference come within OVERFLOW_HEADROOM of it, both again at a scale 16x lower, as each
    device's GradScaler backs off (down to 1: what overflows then is the target's own)."""
    largest = torch.finfo(common["policy"].low_precision).max / OVERFLOW_HEADROOM
    scale, backward = common["loss_scale"], common["backward"]
    while True:
        t0 = time.perf_counter()
        run = {**common, "loss_scale": scale}
        ref_run = run_model(resolved.model, resolved.inputs, device=devices[0], **run)
        timings["reference"] = time.perf_counter() - t0
        last = not backward or scale <= 1
        if last and backward and not _gradients_fit(ref_run.trace, math.inf):
            if common["grad_inputs"] is None and (inputs := undifferentiable_inputs(ref_run)):
                log.info("the gradient by input(s) %s is not finite: not differentiated", inputs)
                common["grad_inputs"] = all_inputs_but(inputs)
                continue
            raise AlignError(_not_finite(ref_run, resolved.label))
        if last or _gradients_fit(ref_run.trace, largest):
            t0 = time.perf_counter()
            log.info("target run on %s%s", devices[1], f" emulating {emulate}" if emulate else "")
            tgt_run = run_model(
                target_model,
                resolved.inputs,
                device=devices[1],
                native_kernels=bool(emulate),
                replay=ref_run.decisions.choices,
                **run,
            )
            timings["target"] = time.perf_counter() - t0
            if last or _gradients_fit(tgt_run.trace, math.inf):
                return ref_run, tgt_run
        scale = max(1.0, scale / 16)
        log.info("scaled gradients overflow: both runs again at loss scale %g", scale)


UNDIFFERENTIATED_NOTE = (
    "the reference's gradient by some of the model's inputs held NaN or infinity (its own "
    "arithmetic: a detector's loss by its target boxes); backward did not differentiate "
    "them (CheckOptions.grad_inputs chooses the inputs it differentiates)"
)


def _not_finite(run: Run, label: str) -> str:
    """Why `run`'s non-finite gradients stop the check, naming the first of them; under bf16,
    where the call that made it had finite inputs and gradients arriving, that its kernel
    made them (measured: the CPU's bf16 Conv3d weight gradient, NaN from finite values in
    timm's lambda_resnet26t, where the message had blamed an overflow)."""
    name, key, call = _first_not_finite(run.trace)
    low = run.policy.low_precision
    nan = key is not None and bool(torch.isnan(metrics.judged_form(run.trace.tensors[key])).any())
    if low == torch.bfloat16 and nan and call is not None and _finite_around(run.trace, call):
        return (  # no overflow: bfloat16 has float32's range
            f"the reference made NaN at {run.policy.name} from finite values in {name} (the "
            "call's inputs and the gradients arriving at it are finite, and bfloat16 has "
            "float32's range): its kernel fails at this precision; check "
            f"{label} at fp32, or against another reference device"
        )
    if low in (torch.float16, torch.bfloat16):
        wider = "amp-bf16 or fp32" if low == torch.float16 else "fp32"
        return (
            f"the reference's gradients overflow {low} even unscaled (loss scale 1; first: "
            f"{name}): {label} cannot be checked at {run.policy.name} on these inputs (a "
            f"BatchNorm over very few values amplifies its gradient); check it at {wider}, "
            "or on larger inputs"
        )
    return (
        f"the reference's gradients hold NaN or infinity at {run.policy.name} (first: "
        f"{name}): the model's own arithmetic makes them (a square root or a division at "
        "0), and no error can be bounded there; fix the model, or check the forward phase"
    )


def _first_not_finite(trace: Trace) -> tuple[str, str | None, Call | None]:
    """The first non-finite gradient backward made (a module's gradient, else a parameter's):
    its name, its key and the call that made it (None where that is not known)."""
    calls, tensors = trace.calls, trace.tensors

    def bad(key: str | None) -> bool:
        return bool(key) and not metrics.all_finite(metrics.judged_form(tensors[key]))

    for pos, slot, i in trace.backward_events:  # in the order backward made them
        if bad(key := getattr(calls[pos], slot)[i]):
            maker = calls[pos] if slot == "grad_inputs" else None  # a grad_output comes in
            return f"{calls[pos].module or '(model)'} {slot[:-1]}[{i}]", key, maker
    for param, key in trace.param_grads.items():
        if bad(key):
            owner = param.rpartition(".")[0]
            made = [c for c in calls if c.module == owner]
            return f"the gradient of parameter {param}", key, made[0] if len(made) == 1 else None
    return "a gradient", None, None


def _finite_around(trace: Trace, call: Call) -> bool:
    """Whether `call`'s floating inputs and the gradients arriving at it are all finite."""
    keys = [k for k in (*call.inputs, *call.grad_outputs) if k]
    floating = [trace.tensors[k] for k in keys if trace.tensors[k].is_floating_point()]
    return any(call.grad_outputs) and all(
        metrics.all_finite(metrics.judged_form(t)) for t in floating
    )


def _near_overflow(run: Run, draws: list[Trace]) -> bool:
    """True when `run` is unscaled fp16 whose gradients come within OVERFLOW_HEADROOM of
    float16's largest value (`_runs` backed off to loss scale 1 and could not do better),
    or one of its honest `draws` overflowed (measured: ghostnet_050 at 32 px, amp-fp16,
    the reference 4096x below float16's largest value, its draws overflowing in 431
    tensors, an honest half-ulp target in 2)."""
    low = run.policy.low_precision
    if low != torch.float16 or run.loss_scale > 1 or not run.trace.meta.get("backward"):
        return False
    largest = torch.finfo(low).max
    return not _gradients_fit(run.trace, largest / OVERFLOW_HEADROOM) or any(
        _gradients(draw, lambda t: bool(torch.isinf(t).any())) for draw in draws
    )


def _excuse_overflow(rows: list) -> set[tuple]:
    """Gradient rows failing only by the target's NaN/Inf, judged as without signal (see
    `_near_overflow`); returns where they are."""
    excused = set()
    for row in rows:
        if row.phase in ("backward", "param_grad") and row.failed == ["nonfinite"]:
            row.failed, row.message = [], HEADROOM_MESSAGE
            excused.add(_where(row))
    return excused


def _where(row: Any) -> tuple:
    return (row.module, row.call, row.phase, row.tensor)


def _gradients_fit(trace: Trace, largest: float) -> bool:
    """Every gradient of `trace` finite and at most `largest` in magnitude."""
    return not _gradients(
        trace,
        lambda t: not metrics.all_finite(t) or (t.numel() > 0 and float(t.abs().max()) > largest),
    )


def _gradients(trace: Trace, test: Callable[[torch.Tensor], bool]) -> bool:
    """Whether any gradient of `trace` passes `test`."""
    keys = {k for c in trace.calls for slot in BACKWARD_SLOTS for k in getattr(c, slot) if k}
    keys |= set(trace.param_grads.values())
    return any(test(metrics.judged_form(trace.tensors[k])) for k in keys)


def _judge_runs(
    report: Report,
    resolved: Any,
    ref_run: Run,
    tgt_run: Run,
    phases: tuple[str, ...],
    tol: Tolerance,
    policy: Policy,
    options: CheckOptions,
    timings: dict[str, float],
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

    draw_traces = Pool(draw_trace, options.draws)
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
        name_map=options.name_map,
        draws=draw_traces,
        state=not options.isolate_modules,  # judged per call in isolation
    )
    require_judged(report.rows, phases)
    timings["compare"] = time.perf_counter() - t0 - timings.get("draws", 0.0)
    near_overflow = _near_overflow(ref_run, draw_traces.made)
    if near_overflow:
        _excuse_overflow(report.rows)
    report.notes += no_signal_notes(report.rows)
    if "draws" in timings:
        report.notes.append(
            f"tensors failing against the reference's error were judged again against the "
            f"largest of the reference's and {len(draw_traces.made)} honest draws' "
            f"(align.numerics.jitter)"
        )
    if options.isolate_modules:
        t0 = time.perf_counter()
        log.info("isolation: %d module calls re-run alone", len(ref_run.trace.calls))
        report.local_rows, report.culprits, notes = isolate(
            ref_run,
            tgt_run,
            gold_run,
            tol=tol,
            backward=backward,
            strict_dtype=strict,
            name_map=options.name_map,
            draws=options.draws,
        )
        report.notes += notes
        if near_overflow:
            excused = _excuse_overflow(report.local_rows)
            report.culprits = [c for c in report.culprits if _where(c) not in excused]
        timings["isolation"] = time.perf_counter() - t0
        if not report.culprits and any(r.failed for r in report.rows):
            report.notes.append(
                "the whole network diverges but every isolated module is right on the "
                "reference's inputs: look for a discontinuity at the first divergence (a ReLU "
                "input or a max-pool tie that honest rounding put on the other side) or for "
                "errors that only add up across modules"
            )
    if options.sensitivity and ref_run.emulation is not None:
        report.sensitivity = emulation_sensitivity(ref_run, gold_run)


def _parse(spec: str | None):
    if not spec:
        return None

    return parse_emulation(spec)


def compare(
    reference: Trace | str | Path,
    target: Trace | str | Path,
    golden: Trace | str | Path | None = None,
    *,
    tolerance: Tolerance | dict | None = None,
    phases: Any = None,
    name_map: dict[str, str | None] | None = None,
    model: nn.Module | None = None,
) -> Report:
    """Judge a target trace against a reference trace (and a float64 golden trace).

    Traces may be directories written by `Trace.save` or msprobe dumps. Without a
    golden the reference stands in for it and only dtype floors remain as limits.
    Dumps of align.Recorder (a training loop) are judged step by step (align.judge.steps);
    given `model`, the model the script trains, the first failing (else first) step's calls
    are re-run alone from the dumps to name the culprits (align.judge.step_isolation).
    Two msprobe dump trees are judged step by step and rank by rank
    (align.judge.msprobe_dumps).
    """
    if is_loop_dump(reference):
        return loop_steps.compare(
            reference, target, golden, tolerance=tolerance, name_map=name_map, model=model
        )
    if model is not None:
        raise AlignError(
            "model= names culprits in align.Recorder dumps only; align.check isolates the "
            "modules of a model it runs itself"
        )
    if not isinstance(reference, Trace) and not isinstance(target, Trace):
        if is_msprobe_dump(reference) and is_msprobe_dump(target):
            return msprobe_dumps.compare_dumps(
                reference, target, golden, tolerance=tolerance, phases=phases, name_map=name_map
            )
    ref, tgt, gold = (
        t if isinstance(t, Trace) or t is None else load_trace(t)
        for t in (reference, target, golden)
    )
    return judge_traces(ref, tgt, gold, tolerance=tolerance, phases=phases, name_map=name_map)


def _options(options: CheckOptions | None, fields: dict[str, Any]) -> CheckOptions:
    """`options` with `fields` (CheckOptions fields passed to check by name) applied."""
    known = {f.name for f in dataclasses.fields(CheckOptions)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(
            f"check() got unknown argument(s) {', '.join(unknown)}; its options are "
            f"{', '.join(sorted(known))} (align.CheckOptions)"
        )
    return dataclasses.replace(options or CheckOptions(), **fields)
