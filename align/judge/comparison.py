"""Whole-network comparison of a target trace with a reference trace and a golden trace.

Tensors are judged in execution order: forward outputs in call order, then gradients in
the order backward produced them, then parameter gradients. A tensor shared by several
records (a container's output is its last child's) is judged once, under the innermost
module. Structural differences (missing modules, shapes) are errors, never a pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import partial

import torch

from align.errors import MismatchError
from align.numerics.decisions import Fault
from align.numerics.jitter import Pool
from align.numerics.names import BUFFER
from align.numerics.verdict import Divergence, Row, Tolerance, judge_robustly
from align.record.trace import STATE_SLOTS, Call, Trace


def _target_index(ref: Trace, tgt: Trace, name_map: dict[str, str | None]) -> dict:
    """Target calls keyed by the reference's (module, index); names mapped by name_map."""
    by_key = tgt.by_key()
    index = {}
    missing = []
    for call in ref.calls:
        name = name_map.get(call.module, call.module)
        if name is None:
            continue  # the user said this reference module has no counterpart
        hit = by_key.get((name, call.index))
        if hit is None:
            missing.append(call.label)
        else:
            index[call.key] = hit
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise MismatchError(
            f"{len(missing)} module call(s) of the reference are missing in the target: "
            f"{shown}. If the target is a port with renamed or fused modules, pass "
            "name_map={reference_name: target_name or None}."
        )
    return index


def _pairs(ref: Trace, phases: tuple[str, ...]) -> Iterator[tuple[str, Call, str, int]]:
    """(phase, call, slot, i) for every recorded tensor, in execution order."""
    if "forward" in phases:
        # in the order calls returned: a child's output is judged before its container's
        order = ref.forward_order or range(len(ref.calls))
        for call in (ref.calls[pos] for pos in order):
            for i in range(len(call.outputs)):
                yield "forward", call, "outputs", i
            for i in range(len(call.buffers)):
                yield "forward", call, "buffers", i
    if "backward" in phases:
        for pos, slot, i in backward_events(ref):
            yield "backward", ref.calls[pos], slot, i


def backward_events(ref: Trace) -> list[tuple[int, str, int]]:
    """(call position, slot, index) of every gradient, in the order backward made them.

    Traces without recorded events (msprobe dumps, older traces) fall back to each call's
    output gradients then input gradients, in the order backward first reached the call.
    """
    if ref.backward_events:
        return list(ref.backward_events)
    return [
        (pos, slot, i)
        for pos in ref.backward_order
        for slot in ("grad_outputs", "grad_inputs")
        for i in range(len(getattr(ref.calls[pos], slot)))
    ]


LABELS = {"outputs": "output", "grad_outputs": "grad_output", "grad_inputs": "grad_input"}


def tensor_label(call: Call, slot: str, i: int) -> str:
    """How a row names tensor `i` of a call's `slot`: "output[0]", "buffer running_var"."""
    if slot in STATE_SLOTS:
        return BUFFER + call.buffer_names[i]
    return f"{LABELS[slot]}[{i}]"


def index_in(call: Call, other: Call, slot: str, i: int) -> int:
    """Tensor `i` of `slot` of `call` as `other`, the same call on another run, numbers
    it: buffers by name (len of the slot where `other` wrote no such buffer)."""
    if slot not in STATE_SLOTS:
        return i
    name = call.buffer_names[i]
    return other.buffer_names.index(name) if name in other.buffer_names else len(other.buffers)


_SLOTS = {**{label: slot for slot, label in LABELS.items()}, "input": "inputs"}  # + loop dumps
_TENSOR = re.compile(r"(\w+)\[(\d+)\]$")  # "output[0]", or "step 3 output[0]" in loop dumps
# What a row's tensor is computed from: a call's output from its inputs; its input
# gradients and its parameters' gradients from its output gradients and its inputs.
_SOURCES = {
    "outputs": ("inputs",),
    "grad_inputs": ("grad_outputs", "inputs"),
    "param_grad": ("grad_outputs", "inputs"),
    "buffers": ("inputs", "buffers_in"),  # a running statistic: of its inputs and its past
}


def origins(
    ref: Trace,
    tgt: Trace,
    golden: Trace | None,
    rows: Sequence[Row],
    *,
    tol: Tolerance,
    strict_dtype: bool = True,
    name_map: dict[str, str | None] | None = None,
    draws: Sequence[Trace] | Pool[Trace] = (),
) -> list[Divergence]:
    """Where errors start, read from the tensors alone (no module is re-run): each module
    call whose output, input gradient or parameter gradient fails while every recorded
    tensor it was computed from passes, in the order of `rows` (compare_traces' rows of
    these traces), innermost call first (a container is not named for its child's error).
    A source no row judged (an input computed by the parent's own code between calls) is
    judged here; a call is named only when its sources pass."""
    calls = {c.key: (pos, c) for pos, c in enumerate(ref.calls)}
    passed: dict[str, bool] = {}
    for row in rows:
        if (found := _row_key(ref, calls, row)) is not None:
            passed.setdefault(found[1], row.passed)
    tgt_calls = _target_index(ref, tgt, name_map or {})
    gold_calls = _target_index(ref, golden, {}) if golden is not None else None
    judge = _Judge(ref, tgt, golden or ref, tol, strict_dtype, _Draws(ref, draws))

    def source_passes(call: Call, slot: str, i: int, key: str) -> bool:
        if key not in passed:
            tcall = tgt_calls[call.key]
            ti, tkeys = index_in(call, tcall, slot, i), getattr(tcall, slot)
            gkey = _golden_key(call, gold_calls, slot, i) if gold_calls else key
            row = Row(call.module, call.index, "source", f"{slot}[{i}]", "", [])
            if ti >= len(tkeys) or tkeys[ti] is None or gkey is None:
                passed[key] = False
            else:
                judged = judge.call_tensor(call, slot, i, tkeys[ti], gkey, row)
                passed[key] = judged.passed
        return passed[key]

    named: list[int] = []
    found: list[Divergence] = []
    for row in rows:
        where = _row_key(ref, calls, row)
        slot = where[0] if where else "param_grad" if row.phase == "param_grad" else None
        if not row.failed or slot not in _SOURCES or (row.module, row.call) not in calls:
            continue
        pos, call = calls[(row.module, row.call)]
        owners = [call]
        if slot == "param_grad":  # every call of the module added to its gradient
            owners = [c for c in ref.calls if c.module == row.module]
        sources = [
            (c, source, i, k)
            for c in owners
            for source in _SOURCES[slot]
            for i, k in enumerate(getattr(c, source))
            if k is not None and c.key in tgt_calls
        ]
        if any(_encloses(ref, pos, other) for other in named):
            continue
        if all(source_passes(*s) for s in sources):
            named.append(pos)
            found.append(row.divergence())
    return found


def _golden_key(call: Call, gold_calls: dict, slot: str, i: int) -> str | None:
    gcall = gold_calls[call.key]
    gi, gkeys = index_in(call, gcall, slot, i), getattr(gcall, slot)
    return gkeys[gi] if gi < len(gkeys) else None


def _row_key(ref: Trace, calls: dict, row: Row) -> tuple[str, str] | None:
    """(slot, reference tensor key) a module tensor's row judged, or None."""
    if (row.module, row.call) not in calls:
        return None
    call = calls[(row.module, row.call)][1]
    if (written := call.buffer_index(row.tensor)) is not None:
        slot, i = "buffers", written
    else:
        match = _TENSOR.search(row.tensor)
        slot = _SLOTS.get(match[1]) if match else None
        if slot is None:
            return None
        i = int(match[2])
    keys = getattr(call, slot)
    return (slot, keys[i]) if i < len(keys) and keys[i] is not None else None


def _encloses(ref: Trace, outer: int, inner: int) -> bool:
    """True when call `inner` is `outer` or runs inside it."""
    pos: int | None = inner
    while pos is not None:
        if pos == outer:
            return True
        pos = ref.calls[pos].parent
    return False


def param_order(ref: Trace) -> list[str]:
    """Parameter names ordered by when backward reached their module."""
    rank: dict[str, int] = {}
    for n, pos in enumerate(ref.backward_order):
        rank.setdefault(ref.calls[pos].module, n)
    owner = {name: name.rsplit(".", 1)[0] if "." in name else "" for name in ref.param_grads}
    return sorted(ref.param_grads, key=lambda p: (rank.get(owner[p], len(rank)), p))


def compare_traces(
    ref: Trace,
    tgt: Trace,
    golden: Trace | None,
    *,
    tol: Tolerance,
    phases: tuple[str, ...] = ("forward", "backward"),
    strict_dtype: bool = True,
    name_map: dict[str, str | None] | None = None,
    draws: Sequence[Trace] | Pool[Trace] = (),
    state: bool = True,
) -> list[Row]:
    """Judge every tensor of `tgt` against `golden` relative to `ref`, in execution order.

    `state`: judge the buffers calls changed (running statistics) here too. align.check
    leaves them to isolation, which judges each call's update on the reference's inputs:
    across the whole network a running variance over two values per channel weighs each
    channel's upstream error by how far apart the two are, so a few channels decide it
    and an honest target's error there strays past k times the reference's (measured at
    32 px: ghostnet_050 under amp-fp16, mobilenetv3_large_100 in fp32, 1.1-1.9x the limit).

    `draws` are honest draws of the reference run (align.numerics.jitter), or a `jitter.Pool`
    making them, drawn from only if a tensor fails against the reference alone: that
    tensor is then judged again with the reference's error as the largest of theirs.
    Without a golden trace the reference stands in for it, so only dtype floors remain
    as limits.
    """
    name_map = name_map or {}
    tgt_calls = _target_index(ref, tgt, name_map)
    gold_calls = _target_index(ref, golden, {}) if golden is not None else None
    gold = golden if golden is not None else ref
    judge = _Judge(ref, tgt, gold, tol, strict_dtype, _Draws(ref, draws), golden is None)
    rows: list[Row] = []
    seen: set[tuple] = set()
    for phase, call, slot, i in _pairs(ref, phases):
        judge.reached.add((phase, call.key))
        if call.key not in tgt_calls:
            continue
        rkey = getattr(call, slot)[i]
        tcall = tgt_calls[call.key]
        label = tensor_label(call, slot, i)
        ti, tkeys = index_in(call, tcall, slot, i), getattr(tcall, slot)
        tkey = tkeys[ti] if ti < len(tkeys) else None
        if slot == "buffers" and not (
            state and (call.wrote(i) or ti < len(tkeys) and tcall.wrote(ti))
        ):
            continue  # a buffer neither side's call changed (BatchNorm in eval mode)
        if rkey is None or (rkey, tkey) in seen:
            continue  # the same tensor on both sides, already judged under an inner module
        seen.add((rkey, tkey))
        gkey = _golden_key(call, gold_calls, slot, i) if gold_calls else rkey
        row = Row(call.module, call.index, phase, label, "", [])
        if tkey is None or gkey is None:
            where = "the target" if tkey is None else "the golden run"
            row.failed.append("missing")
            row.message = f"{call.label} {label} exists on the reference but not on {where}"
            rows.append(row)
            continue
        row = judge.call_tensor(call, slot, i, tkey, gkey, row)
        rows.append(row)
    if "backward" in phases:
        param_rows: list[Row] = []
        for name in param_order(ref):
            tname = _param_name(name, name_map)
            if tname is None:
                continue
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            row = Row(owner, 0, "param_grad", name.rsplit(".", 1)[-1], "", [])
            if tname not in tgt.param_grads:
                row.failed.append("missing")
                row.message = (
                    f"parameter {name} has a gradient on the reference, none on the target"
                )
                param_rows.append(row)
                continue
            param_rows.append(judge.param(name, tname, row))
        rows = _with_param_grads(rows, param_rows)
    return _with_faults(rows, tgt.faults, {t: r for r, t in name_map.items() if t})


def _with_faults(rows: list[Row], faults: list[Fault], renamed: dict[str, str]) -> list[Row]:
    """A failing row per kernel fault of the target (its replayed values hide it), placed
    before the first row of its module (`renamed`: target name -> reference name)."""
    for fault in faults:
        module = renamed.get(fault.module, fault.module)
        at = next((n for n, r in enumerate(rows) if r.module == module), len(rows))
        rows.insert(at, replace(fault, module=module).row(isolated=False))
    return rows


def _with_param_grads(rows: list[Row], param_rows: list[Row]) -> list[Row]:
    """Each parameter gradient placed right after its module's last backward tensor: where
    backward computed it (a leaf's weight gradient comes with its input gradient)."""
    last = {r.module: n for n, r in enumerate(rows) if r.phase == "backward"}
    after: dict[int, list[Row]] = {}
    tail = []
    for row in param_rows:
        if row.module in last:
            after.setdefault(last[row.module], []).append(row)
        else:
            tail.append(row)
    merged = []
    for n, row in enumerate(rows):
        merged.append(row)
        merged += after.get(n, [])
    return merged + tail


class _Draws:
    """The reference's honest draws per tensor, made or loaded when a tensor needs them
    (`round_` as in verdict.judge_robustly)."""

    def __init__(self, ref: Trace, source: Sequence[Trace] | Pool[Trace]):
        self.ref = ref
        if not isinstance(source, Pool):  # a dump's draws: what it has, all at once
            given = list(source)
            source = Pool(lambda k: given[k] if k < len(given) else None, len(given))
        self.pool = source
        self._index: dict[int, dict] = {}

    def _traces(self, round_: int) -> list[tuple[Trace, dict]]:
        traces = self.pool(round_)
        for n, d in enumerate(traces):
            if n not in self._index:
                self._index[n] = _target_index(self.ref, d, {})
        return [(d, self._index[n]) for n, d in enumerate(traces)]

    def of_call(self, key: tuple[str, int], slot: str, i: int, round_: int) -> list[torch.Tensor]:
        found = []
        for draw, calls in self._traces(round_):
            keys = getattr(calls[key], slot)
            if i < len(keys) and keys[i] is not None:
                found.append(draw.tensor(keys[i]))
        return found

    def of_param(self, name: str, round_: int) -> list[torch.Tensor]:
        traces = self._traces(round_)
        return [d.tensor(d.param_grads[name]) for d, _ in traces if name in d.param_grads]


def _param_name(name: str, name_map: dict[str, str | None]) -> str | None:
    owner, _, leaf = name.rpartition(".")
    if owner in name_map:
        mapped = name_map[owner]
        return None if mapped is None else f"{mapped}.{leaf}" if mapped else leaf
    return name


class _Judge:
    """Judges the tensors of one comparison: its traces, tolerance and honest draws.

    Without a golden (`guessed`: the reference stands in for it), a tensor's floor is
    widened by the square root of the calls it was computed through (`reached`, in
    execution order, forward then backward): each adds its roundings to what the reference
    and the target both carry, and rounding errors accumulate as a random walk (Higham and
    Mary's probabilistic bound, sqrt(n) u; measured: an honest half-ulp mobilenetv3_small_050
    in msprobe dumps, 47 calls into its backward, a conv's input gradient 1.2x the plain
    fp32 floor off the reference)."""

    def __init__(
        self, ref: Trace, tgt: Trace, gold: Trace, tol, strict_dtype: bool, honest, guessed=False
    ):
        self.ref, self.tgt, self.gold, self.honest = ref, tgt, gold, honest
        self.tol, self.strict_dtype, self.guessed = tol, strict_dtype, guessed
        self.reached: set[tuple[str, tuple[str, int]]] = set()

    def call_tensor(self, call: Call, slot: str, i: int, tkey: str, gkey: str, row: Row) -> Row:
        """Tensor `i` of `slot` of a reference call against the target's `tkey`."""
        draws = partial(self.honest.of_call, call.key, slot, i)
        return self._judged(getattr(call, slot)[i], tkey, gkey, row, draws)

    def param(self, name: str, tname: str, row: Row) -> Row:
        """The gradient of parameter `name` against the target's `tname`."""
        ref, tgt, gold = self.ref, self.tgt, self.gold
        draws = partial(self.honest.of_param, name)
        return self._judged(
            ref.param_grads[name], tgt.param_grads[tname], gold.param_grads[name], row, draws
        )

    def _judged(self, rkey: str, tkey: str, gkey: str, row: Row, draws) -> Row:
        r, t, g = self.ref.tensor(rkey), self.tgt.tensor(tkey), self.gold.tensor(gkey)
        if tuple(t.shape) != tuple(r.shape) or tuple(g.shape) != tuple(r.shape):
            raise MismatchError(
                f"{row.module or '<model>'} {row.tensor}: shape {tuple(r.shape)} on the "
                f"reference, {tuple(t.shape)} on the target, {tuple(g.shape)} in the golden "
                "run; the runs did not compute the same thing (same model, inputs and batch?)"
                + (COUNTED if _counted(r.shape, t.shape, g.shape) else "")
            )
        return judge_robustly(
            t,
            r,
            g,
            self.tol,
            strict_dtype=self.strict_dtype,
            local=False,
            row=row,
            draws=draws,
            accuracy=math.sqrt(max(len(self.reached), 1)) if self.guessed else 1.0,
        )


COUNTED = (
    ". If that dimension is a count the run decides (boxes NMS keeps, elements over a"
    " threshold): align replays the decisions PyTorch's dispatcher sees"
    " (align.numerics.decisions) and those align.numerics.outside lists, not those of"
    " other code that bypasses it (a C++ extension's loops, numpy): check the outputs"
    " before that step"
)


def _counted(*shapes: torch.Size) -> bool:
    """True when the shapes have one rank and differ in one dimension only."""
    if len({len(s) for s in shapes}) != 1:
        return False
    return sum(len({s[d] for s in shapes}) > 1 for d in range(len(shapes[0]))) == 1
