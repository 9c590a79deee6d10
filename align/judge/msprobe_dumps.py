"""Comparing two msprobe dumps (read by align.record.msprobe) step by step and rank by rank.

Every `step*/rank*` dump of the reference is paired with the same step/rank of the target
(one dump on each side pairs as is); steps/ranks on one side only are listed in a note, no
pair in common is an error. Per pair, the API calls of each module call are aligned by
name and output shapes (difflib's longest matching blocks, so an op fused on one side or
an extra cast on the other leaves the rest aligned); what matches is judged, what does not
is listed in a note. Tensor dumps are judged as align traces (align.judge.traces);
statistics-only dumps by align.judge.statistics, which says how much weaker that evidence
is. Rows of several pairs are prefixed `[step0/rank1]`, and the report says which pair
failed first.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from align.errors import TraceError
from align.judge import loss_scales
from align.judge.replay import replay_calls, replay_draws
from align.judge.report import Report
from align.judge.statistics import compare_statistics
from align.judge.traces import judge_traces
from align.numerics.names import call_label
from align.numerics.precision import get_policy
from align.numerics.verdict import as_tolerance
from align.record.msprobe import keyed_dumps, load_dump, natural_key, statistics_only
from align.record.trace import Call, Trace

__all__ = ["align_calls", "compare_dumps"]


def compare_dumps(
    reference: str | os.PathLike,
    target: str | os.PathLike,
    golden: str | os.PathLike | None = None,
    **options: Any,
) -> Report:
    """Judge two msprobe dumps step by step and rank by rank (options as align.compare)."""
    refs, tgts = keyed_dumps(Path(reference)), keyed_dumps(Path(target))
    golds = keyed_dumps(Path(golden)) if golden is not None else {}
    notes: list[str] = []
    if len(refs) == 1 and len(tgts) == 1:
        keys = [next(iter(refs))]
        tgts = {keys[0]: next(iter(tgts.values()))}
    else:
        keys = sorted(refs.keys() & tgts.keys(), key=natural_key)
        for side, have, other in (("reference", refs, tgts), ("target", tgts, refs)):
            only = sorted(have.keys() - other.keys(), key=natural_key)
            if only:
                notes.append(
                    f"only in the {side} dump, not compared: {', '.join(only)} (dump the same "
                    "steps and ranks on both devices to compare them)"
                )
        if not keys:
            raise TraceError(
                f"{reference} ({', '.join(refs)}) and {target} ({', '.join(tgts)}) have no "
                "step/rank in common: pass the dump directories of the same run steps"
            )
    if golds and len(golds) == 1 and len(keys) == 1:
        golds = {keys[0]: next(iter(golds.values()))}
    missing_gold = [k for k in keys if golds and k not in golds]
    if missing_gold:
        raise TraceError(f"{golden}: has no dump for {', '.join(missing_gold)}")
    reports = []
    for key in keys:
        gold = load_dump(golds[key]) if golds else None
        reports.append(_compare_pair(load_dump(refs[key]), load_dump(tgts[key]), gold, options))
    return _merged(keys, reports, notes, {"reference": str(reference), "target": str(target)})


def _compare_pair(ref: Trace, tgt: Trace, gold: Trace | None, options: dict) -> Report:
    """One step/rank: align the calls, then judge tensors or statistics."""

    others = [tgt] if gold is None else [tgt, gold]
    original = ref
    ref, aligned, unmatched = align_calls(ref, others)
    ref, reshaped = _same_shapes(ref, aligned)
    if not ref.calls:
        raise TraceError(
            f"{ref.meta['path']} and {tgt.meta['path']}: no call of one dump matches a call "
            "of the other (different models, or dumped with different levels or scopes)"
        )
    scaled = []
    for n, role in enumerate(("target", "golden")[: len(aligned)]):
        k = loss_scales.scale_exponent(ref, aligned[n])
        if k:
            aligned[n] = loss_scales.rescaled(aligned[n], k)
            scaled.append(loss_scales.note(role, k))
    if statistics_only(ref) or statistics_only(tgt):
        tol = options.get("tolerance")  # a number widens the statistics bound
        report = compare_statistics(
            ref,
            aligned[0],
            phases=options.get("phases"),
            tolerance=tol if isinstance(tol, (int, float)) else None,
        )
        if gold is not None:
            report.notes.append("statistics comparison: the golden dump was not used")
    else:
        draws = None if gold is not None else replay_draws(original, ref)
        report = judge_traces(ref, aligned[0], aligned[1] if gold else None, draws=draws, **options)
        tol = as_tolerance(options.get("tolerance"), get_policy(report.meta["precision"]))
        rows, culprits, notes = replay_calls(original, tgt, _match(original, tgt), tol)
        report.local_rows += rows
        report.culprits += culprits
        report.notes += notes
    report.notes += scaled
    if reshaped:
        report.notes.append(
            f"{len(reshaped)} tensor(s) of matched calls have other shapes on each side and "
            "were not judged (msprobe hooks a call's backward where autograd's graph of it "
            "differs by device or layout, as a channels_last adaptive_avg_pool2d's does): "
            + "; ".join(reshaped[:6])
            + (" ..." if len(reshaped) > 6 else "")
        )
    if unmatched:
        shown = "; ".join(unmatched[:12]) + (" ..." if len(unmatched) > 12 else "")
        report.notes.append(
            f"{len(unmatched)} call(s) have no counterpart on the other side and were not "
            f"judged (an op fused, added or dropped by one device): {shown}"
        )
    where = ref.meta.get("where", {})
    for row in report.rows:
        label = call_label(row.module, row.call)
        if row.failed and label in where and "called at" not in row.message:
            row.message = "; ".join(filter(None, [row.message, f"called at {where[label]}"]))
    return report


def _merged(
    keys: list[str], reports: list[Report], notes: list[str], paths: dict[str, str]
) -> Report:
    """One report of several step/rank pairs; rows prefixed with their pair when several."""
    if len(reports) == 1:
        reports[0].notes[:0] = notes
        reports[0].meta.update(paths, dumps=keys)
        return reports[0]
    common = [n for n in reports[0].notes if all(n in r.notes for r in reports)]
    rows, summary = [], []
    for key, report in zip(keys, reports):
        rows += [replace(r, module=f"[{key}] {r.module}") for r in report.rows]
        failing = sum(not r.passed for r in report.rows)
        summary.append(
            f"{key}: {'ok' if report.passed else 'FAIL'}, {len(report.rows)} tensors, "
            f"{failing} failing"
        )
        notes += [f"[{key}] {n}" for n in report.notes if n not in common]
    first = next((k for k, r in zip(keys, reports) if not r.passed), None)
    head = f"{len(keys)} step/rank dumps compared: " + "; ".join(summary)
    if first is not None:
        head += f". First failing: {first}"
    meta = {**reports[0].meta, **paths, "dumps": keys, "first_failing_dump": first}
    return Report(rows=rows, meta=meta, notes=[head, *notes, *common])


def align_calls(ref: Trace, others: list[Trace]) -> tuple[Trace, list[Trace], list[str]]:
    """The calls of `ref` matched in every trace of `others`, re-keyed to ref's keys.

    Module calls match by (name, index); the API calls inside each module call match by
    name and output shapes, in order (difflib's longest matching blocks). Returns the
    restricted reference, the others restricted and renamed alike, and the labels of
    calls left unmatched.
    """
    unmatched: list[str] = []
    matches = []
    for role, other in zip(("target", "golden"), others):
        found = _match(ref, other)
        matches.append(found)
        taken = set(found.values())
        unmatched += [
            f"{role} only: {c.label}" for n, c in enumerate(other.calls) if n not in taken
        ]
    keep = [n for n in range(len(ref.calls)) if all(n in m for m in matches)]
    unmatched = [
        f"reference only: {ref.calls[n].label}"
        for n in range(len(ref.calls))
        if not all(n in m for m in matches)
    ] + unmatched
    restricted = _restricted(ref, ref, keep, {n: n for n in keep})
    return restricted, [_restricted(o, ref, keep, m) for o, m in zip(others, matches)], unmatched


def _same_shapes(ref: Trace, others: list[Trace]) -> tuple[Trace, list[str]]:
    """`ref` (aligned with `others`) without the tensors whose dumped shape differs in one
    of `others`, and their labels: a call whose tensors differ so is still the same call
    (its name and output shapes matched), recorded otherwise by msprobe's hooks."""
    shapes = [getattr(t.tensors, "stats", {}) for t in (ref, *others)]
    dropped: list[str] = []
    calls = []
    for n, call in enumerate(ref.calls):
        changed = {}
        for slot in ("inputs", "outputs", "grad_outputs", "grad_inputs"):
            keys = list(getattr(call, slot))
            for i, key in enumerate(keys):
                found = [(getattr(t.calls[n], slot) + [None] * (i + 1))[i] for t in (ref, *others)]
                seen = {
                    tuple(s[k]["shape"])
                    for s, k in zip(shapes, found)
                    if k in s and "shape" in s[k]
                }
                if key is not None and len(seen) > 1:
                    keys[i] = None
                    changed[slot] = keys
                    dropped.append(f"{call.label} {slot}[{i}] {' vs '.join(map(str, seen))}")
        calls.append(replace(call, **changed) if changed else call)
    return (replace(ref, calls=calls) if dropped else ref), dropped


def _match(ref: Trace, other: Trace) -> dict[int, int]:
    """Reference call position -> position of its counterpart in `other`."""
    found: dict[int, int] = {}
    by_key = {c.key: n for n, c in enumerate(other.calls) if c.cls != "api"}
    for n, call in enumerate(ref.calls):
        if call.cls != "api" and call.key in by_key:
            found[n] = by_key[call.key]
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for side, trace in ((0, ref), (1, other)):
        for n, call in enumerate(trace.calls):
            if call.cls == "api":
                owner = call.module.rpartition("/")[0]
                groups.setdefault(owner, ([], []))[side].append(n)
    for left, right in groups.values():
        a = [_signature(ref, ref.calls[n]) for n in left]
        b = [_signature(other, other.calls[n]) for n in right]
        blocks = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
        for block in blocks:
            for i in range(block.size):
                found[left[block.a + i]] = right[block.b + i]
    return found


def _signature(trace: Trace, call: Call) -> tuple:
    """What must agree for two API calls to be the same: name and output shapes."""
    stats = getattr(trace.tensors, "stats", {})
    shapes = tuple(
        tuple(stats[k]["shape"]) if k in stats else None for k in call.outputs if k is not None
    )
    return (call.module.rpartition("/")[2], shapes)


def _restricted(trace: Trace, ref: Trace, keep: list[int], positions: dict[int, int]) -> Trace:
    """Only the calls at positions[n] for n in keep, in ref's order and under ref's keys."""
    new_pos = {positions[n]: i for i, n in enumerate(keep)}
    calls = [
        replace(
            trace.calls[positions[n]],
            module=ref.calls[n].module,
            index=ref.calls[n].index,
            parent=new_pos.get(trace.calls[positions[n]].parent),
        )
        for n in keep
    ]
    return replace(
        trace,
        calls=calls,
        backward_order=[new_pos[p] for p in trace.backward_order if p in new_pos],
        forward_order=[new_pos[p] for p in trace.forward_order if p in new_pos],
    )
