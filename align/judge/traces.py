"""Judging one target trace against a reference trace (and a float64 golden trace): the
rows, the notes that qualify them, and the refusals that keep a verdict earned (a golden
that is not float64, a dump naming an unregistered case, a phase with nothing judged)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from align.errors import AlignError, MismatchError
from align.judge.comparison import compare_traces, origins
from align.judge.report import Report
from align.numerics import decisions
from align.numerics.metrics import judged_form
from align.numerics.names import parse_phases
from align.numerics.precision import get_policy
from align.numerics.verdict import (
    HEADROOM_MESSAGE,
    HEAVY_TAIL_SPREAD,
    NO_SIGNAL_MESSAGE,
    NOISY_GRADIENT_MESSAGE,
    OVERFLOW_HEADROOM,
    OVERFLOWED_MESSAGE,
    SPREAD_MESSAGE,
    Row,
    Tolerance,
    as_tolerance,
)
from align.record.trace import Trace
from align.zoo import is_case
from align.zoo.golden import case_tolerance

IDENTICAL = "the target reproduced the reference bit for bit"
ORIGINS_NOTE = (
    "a dump localizes from its tensors alone (where errors start: a module call failing on "
    "inputs that pass); isolation, which re-runs each module on the reference's inputs to "
    "name culprits, needs the model: use align.check"
)


def judge_traces(
    ref: Trace,
    tgt: Trace,
    gold: Trace | None = None,
    *,
    tolerance: Tolerance | dict | None = None,
    phases: Any = None,
    name_map: dict[str, str | None] | None = None,
    draws: Sequence[Trace] | None = None,
) -> Report:
    """The Report of `tgt` against `ref` (and `gold`), as align.compare gives for dumps;
    `draws`, honest draws of the reference (default: those its dump holds)."""
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
    phases = parse_phases(phases)
    if tolerance is None and ref.meta.get("case"):
        tolerance = case_tolerance(ref.meta["case"], phases, policy.name)
    tol = as_tolerance(tolerance, policy)
    started = time.perf_counter()
    rows = compare_traces(
        ref,
        tgt,
        gold,
        tol=tol,
        phases=phases,
        strict_dtype=policy.name == "fp32",
        name_map=name_map,
        draws=ref.draws if draws is None else draws,
    )
    require_judged(rows, phases)
    report = Report(
        rows=rows,
        notes=no_signal_notes(rows),
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
    if all(r.metrics == r.reference for r in rows) and identical(ref, tgt):
        report.notes.append(IDENTICAL)
    if gold is None:
        widened = ", and by a replayed API call's honest kernel errors" if draws else ""
        report.notes.append(
            "no golden trace: the reference stood in for it, so limits are dtype floors "
            f"(times the square root of the calls a tensor went through{widened}); dump a "
            "float64 golden (python -m align.dump MODEL --golden) for a "
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
                f"dump it with --decisions REFERENCE_DIR (align.numerics.decisions)"
            )
        elif trace is not None and trace.meta.get("decisions_differed"):
            report.notes.append(decisions.note(role, trace.meta["decisions_differed"]))
    if ref.meta.get("seed") != tgt.meta.get("seed"):
        report.notes.append(
            f"seeds differ (reference {ref.meta.get('seed')}, target {tgt.meta.get('seed')})"
        )
    report.origins = origins(
        ref,
        tgt,
        gold,
        rows,
        tol=tol,
        strict_dtype=policy.name == "fp32",
        name_map=name_map,
        draws=ref.draws,
    )
    if not report.passed:
        report.notes.append(ORIGINS_NOTE)
    return report


def identical(a: Trace, b: Trace) -> bool:
    """True when two in-memory traces hold the same records bit for bit (and `b` has no
    kernel fault hidden by replayed values)."""
    if b.faults:
        return False
    if [(c.key, len(c.outputs)) for c in a.calls] != [(c.key, len(c.outputs)) for c in b.calls]:
        return False
    for ca, cb in zip(a.calls, b.calls):
        if ca.buffer_names != cb.buffer_names:
            return False
        for slot in ("outputs", "grad_outputs", "grad_inputs", "buffers"):
            for ka, kb in zip(getattr(ca, slot), getattr(cb, slot)):
                if (ka is None) != (kb is None):
                    return False
                if ka is not None and not _same(a.tensor(ka), b.tensor(kb)):
                    return False
    if a.param_grads.keys() != b.param_grads.keys():
        return False
    return all(_same(a.tensor(a.param_grads[n]), b.tensor(b.param_grads[n])) for n in a.param_grads)


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit, in the form the metrics read (a sparse gradient dense)."""
    if (x.dtype, x.shape, x.layout) != (y.dtype, y.shape, y.layout):
        return False
    return torch.equal(judged_form(x).cpu(), judged_form(y).cpu())


def require_judged(rows: list[Row], phases: tuple[str, ...]) -> None:
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


def no_signal_notes(rows: list[Row]) -> list[str]:
    """The note on whole-network tensors left unjudged for carrying no signal."""
    notes = []
    for message, why in (
        (
            NO_SIGNAL_MESSAGE,
            "the reference misses them by half their size or more: a cancelling sum, a "
            "BatchNorm over a few values, or a discrete choice align does not replay (a "
            "float decision in numpy or a C++ extension's loops)",
        ),
        (OVERFLOWED_MESSAGE, "an honest draw of the reference overflowed there"),
        (
            NOISY_GRADIENT_MESSAGE,
            "an optimizer's state and parameters that took a gradient carrying no signal, "
            "in that step or one before",
        ),
        (
            SPREAD_MESSAGE,
            f"the reference and its honest draws miss them by amounts {HEAVY_TAIL_SPREAD:g}x "
            "or more apart, so "
            "no few runs bound an honest device's error: a BatchNorm over a few values "
            "whose sign a rounding decides (align.check judges their modules in isolation)",
        ),
        (
            HEADROOM_MESSAGE,
            "the target overflowed float16 where the reference's unscaled gradients come "
            f"within {OVERFLOW_HEADROOM:g}x of its largest value or an honest draw overflowed",
        ),
    ):
        quiet = [r for r in rows if r.message == message]
        shown = ", ".join(f"{r.module or '<model>'} {r.phase} {r.tensor}" for r in quiet[:3])
        if quiet:
            notes.append(
                f"{len(quiet)} whole-network tensor(s) carry no signal at this precision "
                f"({why}), reported, not judged: {shown}{' ...' if len(quiet) > 3 else ''}"
            )
    return notes


def _require_registered_case(role: str, case: Any) -> None:
    """AlignError unless a dump's case is None or a registered case: the name picks the
    golden file of tolerances, so a free string could pick any file on disk."""
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
