"""Which module computes wrong in a step of a Recorder dump (align.judge.steps picks the
first failing step, else the first): every recorded module call re-run alone on the CPU in
float64, from each side's own recorded inputs, weights and random draws, with the model
the script trains.

A Recorder dump (align.record.loop) holds each module call's tensor inputs, outputs and
gradients, its other arguments and its mode (align.record.arguments), and its random draws;
the weights of step n are the parameters recorded after step n-1, or the `before/` state
of a step whose predecessor was not recorded. It does not hold the modules' code:
`align.compare(..., model=model)` gives it (the model as the script builds it; its own
weights are not used). Each call then runs as align.judge.isolation runs one (its children
replaced by replays of their records) on each side's own record, in float64: that side's
exact result for the call. The target's recorded tensors are judged against it relative
to the reference's against its own (verdict.judge_on_replays): a module wrong given its
own inputs is a culprit, whatever happened upstream.

A call is not re-run when one of its arguments was neither a tensor, a plain value, a
dtype nor a device, in tuples, lists, dicts, OrderedDicts or namedtuples
(align.record.arguments; the dump says which; a device reads as the CPU the call re-runs on),
when the model has no module of its name, or when its weights are not in the dump; each
is counted in a note. A parameter gradient is judged alone where it
is its call's alone: no other module holds the parameter, and the module is called once
in the step and the step's one backward wrote the gradient into an empty `.grad`, or (a
loop accumulating micro-batches) the first call's backward wrote it into an empty `.grad`
before the second call; recorded as written, before any clipping, unscaling or
all-reduce (align.record.backward_grads). Where the step's one backward summed several
calls' gradients into an empty `.grad` (a recurrent cell, a block applied several times),
it is judged against the sum of those calls' replays, named by the first. Others are left
to the step's own rows.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from align.judge.isolation import (
    Isolator,
    LocalRun,
    culprit_positions,
    statistics_span,
)
from align.numerics.decisions import Decisions
from align.numerics.names import BUFFER, judged_locally
from align.numerics.precision import Policy, get_policy, kernel_accuracy
from align.numerics.verdict import Divergence, Row, Tolerance, judge_on_replays
from align.record.arguments import spec_from_json
from align.record.capture import CallSpec, Run
from align.record.loop_dump import Step
from align.record.trace import Call, Trace
from align.runtime.wrappers import unwrapped

__all__ = ["isolate_step"]


class _NotIsolable(Exception):
    """No call of this step can be re-run (why: the message)."""


def isolate_step(
    model: nn.Module,
    ref: Step,
    tgt: Step,
    weights: Sequence[dict[str, torch.Tensor]],
    tol: Tolerance,
    *,
    strict_dtype: bool,
    policy: Policy | None = None,
) -> tuple[list[Row], list[Divergence], list[str]]:
    """Judge every module call of one step alone; `weights` are the reference's and the
    target's parameters and floating buffers at the step's start, by name; `policy`, the
    precision the dumps ran at (the CPU re-runs a call failing alone at it, on the target's
    inputs: an honest kernel's error where the target's inputs are its own). Returns
    (rows, culprits most upstream first, notes)."""
    structure = [[(c.module, c.index, c.parent) for c in s.trace.calls] for s in (ref, tgt)]
    if structure[0] != structure[1]:
        return [], [], [f"modules not isolated in step {ref.number}: the sides called others"]
    try:
        runs = [_run(model, side, w) for side, w in zip((ref, tgt), weights)]
    except _NotIsolable as exc:
        return [], [], [f"modules not isolated in step {ref.number}: {exc}"]
    # each side's calls re-run as they ran: with the branches, indices and draws they took
    # (a target that replayed the reference's branches computed with those on its inputs)
    isolators = [Isolator(run, run, run, backward=True, replays=_every) for run in runs]
    tied = _tied(runs[0].model)
    own = [_own_grads(side.trace, tied) for side in (ref, tgt)]
    summed = _summed_grads(ref.trace, tgt.trace, tied)
    # per summed module: each side's running sum of its calls' replayed parameter
    # gradients, the calls added, and the ops the first ran (its kernels' accuracy)
    of_call = {p: m for m, (positions, _) in summed.items() for p in positions}
    sums = {m: _Sum() for m in summed}
    honest = _HonestKernel(model, tgt, weights[1], policy)
    rows: list[Row] = []
    failing: dict[int, Row] = {}
    skipped: dict[str, int] = {}
    for pos in range(len(ref.trace.calls)):
        # (a call whose records are the reference's bit for bit has the reference's error)
        same = _same_records(ref.trace, tgt.trace, pos, [o.get(pos, {}) for o in own])
        if same and pos not in of_call:
            continue
        try:
            replays = [_alone(iso, run, pos) for iso, run in zip(isolators, runs)]
            judged = (
                []
                if same
                else list(
                    _judged(ref, tgt, pos, replays, tol, strict_dtype, own, partial(honest, pos))
                )
            )
        except Exception as exc:  # a module that cannot run or be judged alone is counted
            why = str(exc).split("\n")[0][:160]
            skipped[why] = skipped.get(why, 0) + 1
            continue
        if pos in of_call:
            sums[of_call[pos]].add(replays)
        rows += judged
        if any(r.failed for r in judged):
            failing[pos] = max((r for r in judged if r.failed), key=lambda r: r.ratio(r.worst()))
    for module, (positions, keys) in summed.items():
        if sums[module].calls == len(positions):
            judged = list(
                _judged_sums(ref, tgt, positions, keys, sums[module], tol, strict_dtype, honest)
            )
            rows += judged
            for r in judged:
                worst = failing.get(positions[0])
                if r.failed and (worst is None or r.ratio(r.worst()) > worst.ratio(worst.worst())):
                    failing[positions[0]] = r
    notes = []
    if rows:
        notes.append(
            f"step {ref.number}: module calls re-run alone in float64 from each side's own "
            "recorded inputs and weights (align.judge.step_isolation): a culprit computes "
            "wrong given its own inputs"
        )
    if skipped:
        shown = "; ".join(f"{n} x {why}" for why, n in sorted(skipped.items())[:6])
        notes.append(f"step {ref.number}: module calls not re-run alone: {shown}")
    culprits = [failing[p].divergence() for p in culprit_positions(ref.trace.calls, failing)]
    return rows, culprits, notes


def _judged(
    ref: Step,
    tgt: Step,
    pos: int,
    replays: list[LocalRun],
    tol: Tolerance,
    strict_dtype: bool,
    own: list[dict[int, dict[str, str]]],
    honest: Callable[[str, str], torch.Tensor | None],
) -> Iterator[Row]:
    """The target's recorded tensors of call `pos` against its replay, relative to the
    reference's against its own; `own`, each side's `_own_grads`; `honest(phase, label)`,
    an honest kernel's tensor on the target's inputs."""
    call = ref.trace.calls[pos]
    golds = [{(p, n): x for p, n, x in replay.items()} for replay in replays]
    ran = replays[0].decisions.ran  # the aten ops the call ran
    for (phase, label), gold_t in golds[1].items():
        gold_r = golds[0].get((phase, label))
        if gold_r is None:
            continue
        if phase == "param_grad":
            keys = [grads.get(pos, {}).get(label) for grads in own]
        else:
            keys = [_recorded(side.trace, pos, phase, label) for side in (ref, tgt)]
        if None in keys:
            continue
        row = _on_replays(
            ref,
            tgt,
            keys,
            (gold_r, gold_t),
            call,
            phase,
            label,
            ran,
            tol,
            strict_dtype,
            partial(honest, phase, label),
        )
        if row is not None:
            yield row


def _on_replays(
    ref: Step,
    tgt: Step,
    keys: Sequence[str],
    golds: tuple[torch.Tensor, torch.Tensor],
    call: Call,
    phase: str,
    label: str,
    ran: set[str],
    tol: Tolerance,
    strict_dtype: bool,
    honest: Callable[[], torch.Tensor | None],
) -> Row | None:
    """The target's recorded tensor (`keys`: each side's) against its replay, relative to
    the reference's against its own (`golds`: the reference's replay, the target's); None
    where they cannot be compared (not floating, shapes apart)."""
    r, t = ref.trace.tensor(keys[0]), tgt.trace.tensor(keys[1])
    gold_r, gold_t = golds
    if not r.is_floating_point() or r.shape != t.shape or t.shape != gold_t.shape:
        return None
    return judge_on_replays(
        t,
        r,
        gold_t,
        gold_r,
        tol,
        strict_dtype=strict_dtype,
        row=Row(call.module, call.index, phase, label, "", [], isolated=True),
        accuracy=kernel_accuracy(ran),
        statistics=statistics_span(ran, ref.trace, call, label, gold_r),
        local=judged_locally(label),
        honest=honest,
    )


class _Sum:
    """Each side's running sum of a module's calls' replayed parameter gradients (by
    local name): no call's replay is kept past its turn."""

    def __init__(self) -> None:
        self.sides: list[dict[str, torch.Tensor]] = [{}, {}]
        self.calls = 0
        self.ran: set[str] = set()  # the ops the calls ran

    def add(self, replays: Sequence[LocalRun]) -> None:
        for side, replay in zip(self.sides, replays):
            for label, grad in replay.params.items():
                side[label] = grad.clone() if label not in side else side[label].add_(grad)
        self.ran |= replays[0].decisions.ran
        self.calls += 1


def _judged_sums(
    ref: Step,
    tgt: Step,
    positions: list[int],
    keys: dict[str, tuple[str, str]],
    summed: _Sum,
    tol: Tolerance,
    strict_dtype: bool,
    honest: Callable[[int, str, str], torch.Tensor | None],
) -> Iterator[Row]:
    """The recorded gradients of a module's parameters (`keys`: local name -> each side's
    key) where one backward summed its calls' (`positions`), against the sum of those
    calls' replays, relative to the reference's against its own (a recurrent cell, a block
    a model applies several times, a siamese branch)."""
    call = ref.trace.calls[positions[0]]
    for label, pair in keys.items():
        gold_r, gold_t = (side.get(label) for side in summed.sides)
        if gold_r is None or gold_t is None:
            continue

        def honest_sum(label: str = label) -> torch.Tensor | None:
            terms = [honest(p, "param_grad", label) for p in positions]
            return None if any(x is None for x in terms) else torch.stack(terms).sum(0)

        row = _on_replays(
            ref,
            tgt,
            pair,
            (gold_r, gold_t),
            call,
            "param_grad",
            label,
            summed.ran,
            tol,
            strict_dtype,
            honest_sum,
        )
        if row is not None:
            yield row


class _HonestKernel:
    """The target's calls re-run alone at the dumps' precision on the CPU, from the target's
    own inputs, weights and decisions, with their normalizations' statistics summed as in
    one pass (align.numerics.one_pass): what an honest kernel computes where the target's
    inputs are unlike the reference's (a training that took another path), an honest draw
    for its replay (made only for a tensor that fails without it)."""

    def __init__(
        self, model: nn.Module, tgt: Step, weights: dict[str, torch.Tensor], policy: Policy | None
    ):
        self.model, self.tgt, self.weights, self.policy = model, tgt, weights, policy
        self.isolator: Isolator | None = None
        self.runs: dict[int, dict[tuple[str, str], torch.Tensor]] = {}

    def __call__(self, pos: int, phase: str, label: str) -> torch.Tensor | None:
        if self.policy is None or self.policy.name == "fp64":
            return None
        if pos not in self.runs:
            self.runs[pos] = {}
            try:
                if self.isolator is None:
                    run = _run(self.model, self.tgt, self.weights, self.policy).one_pass_draw()
                    scale = (self.tgt.info.get("scaler") or {}).get("scale", 1.0)
                    run = dataclasses.replace(run, grad_scale=float(scale))  # as the loop ran
                    self.isolator = Isolator(run, run, run, backward=True, replays=_every)
                local = _alone(self.isolator, self.isolator.ref, pos)
                self.runs[pos] = {(p, n): t for p, n, t in local.items()}
            except Exception:  # (a call that cannot run at that precision: no such draw)
                pass
        return self.runs[pos].get((phase, label))


def _run(
    model: nn.Module, step: Step, weights: dict[str, torch.Tensor], policy: Policy | None = None
) -> Run:
    """`model` with one side's weights and record of the step, as an isolation run: in
    float64, or at `policy` in the model's own dtype."""
    calls = step.trace.calls
    where = f"step {step.number} of rank {step.rank}"
    if not weights:
        raise _NotIsolable(
            f"the dump has no weights the step started from: record step {step.number - 1} "
            "too (or record again: Recorder writes them when the step before is not recorded)"
        )
    policy = policy or get_policy("fp64")
    dtype = torch.float64 if policy.name == "fp64" else None
    copied = copy.deepcopy(unwrapped(model)).to(device="cpu", dtype=dtype)
    try:
        loaded = copied.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a shape that differs
        raise _NotIsolable(f"the model given is not the one recorded: {exc}") from exc
    params = {name for name, _ in copied.named_parameters()}
    unmatched = sorted(params & set(loaded.missing_keys)) + sorted(loaded.unexpected_keys)
    unmatched += sorted({c.module for c in calls} - {n for n, _ in copied.named_modules()})
    if unmatched:
        raise _NotIsolable(
            f"the model given is not the one recorded ({', '.join(unmatched[:3])}: in one of "
            "them only): give align.compare the model the script trains"
        )
    meta = step.trace.meta
    entries, owners = meta.get("calls"), meta.get("decision_owners")
    if not isinstance(entries, list) or len(entries) != len(calls):
        raise _NotIsolable(
            f"{where} does not hold its calls' arguments: record it again with this version"
        )
    specs: dict[int, CallSpec] = {}
    for pos, entry in enumerate(entries):
        spec = spec_from_json(entry, f"{where}, call {calls[pos].label}", torch.device("cpu"))
        if isinstance(spec, CallSpec):
            specs[pos] = spec
    decisions = Decisions()
    decisions.log = list(step.trace.decisions)
    if not _owners_valid(owners, len(decisions.log), len(calls)):
        raise _NotIsolable(f"{where}: its decisions' owners are missing or malformed")
    decisions.owners = list(owners)
    return Run(
        model=copied,
        device=torch.device("cpu"),
        policy=policy,
        trace=step.trace,
        specs=specs,
        decisions=decisions,
    )


def _owners_valid(owners: Any, n: int, calls: int) -> bool:
    return (
        isinstance(owners, list)
        and len(owners) == n
        and all(o is None or (type(o) is int and 0 <= o < calls) for o in owners)
    )


def _alone(iso: Isolator, run: Run, pos: int) -> LocalRun:
    """The call at `pos` re-run alone on `run`, in the mode it was recorded in."""
    call = run.trace.calls[pos]
    for p in (pos, *iso.children[pos]):  # the call and the children it replays
        if p not in run.specs:
            why = run.trace.meta["calls"][p]["not_recorded"]
            raise ValueError(why if p == pos else f"calls {run.trace.calls[p].label}, with {why}")
    module = iso.modules[id(run.model)][call.module]
    module.training = run.specs[pos].training
    return iso.run(run, pos)


def _same_records(ref: Trace, tgt: Trace, pos: int, own: list[dict[str, str]]) -> bool:
    """Whether every tensor the call recorded, and the gradients of its own parameters
    (`own`, each side's), are bit for bit the same on both sides."""
    rc, tc = ref.calls[pos], tgt.calls[pos]
    if rc.buffer_names != tc.buffer_names:
        return False
    slots = ("inputs", "outputs", "grad_outputs", "grad_inputs", "buffers_in", "buffers")
    pairs = [zip(getattr(rc, slot), getattr(tc, slot), strict=False) for slot in slots]
    if own[0].keys() != own[1].keys():
        return False
    pairs.append((own[0][name], own[1][name]) for name in own[0])
    for pair in pairs:
        for rk, tk in pair:
            if (rk is None) != (tk is None):
                return False
            if rk is not None:
                r, t = ref.tensor(rk), tgt.tensor(tk)
                if r.dtype != t.dtype or r.shape != t.shape or not torch.equal(r, t):
                    return False
    return True


def _every(op: str) -> bool:
    return True


def _tied(model: nn.Module) -> set[str]:
    """Names of parameters that more than one module holds (a tied embedding and head)."""
    holders: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(name)
    return {name for names in holders.values() if len(names) > 1 for name in names}


def _own_grads(trace: Trace, tied: set[str]) -> dict[int, dict[str, str]]:
    """By call position, the keys of the recorded gradients of the call's module's own
    parameters, by local name, where they are that call's alone: the module holds the
    parameter alone (not `tied`), and either it is called once in the step and the step's
    one backward wrote the gradient (align.record.backward_grads), or the gradient was
    taken as its first call's backward wrote it, before its second call (micro-batches
    accumulating: `first_call_grads`). Only calls that took gradients count: a call under
    no_grad, and an activation checkpoint's forward run again in backward or first under
    no_grad (reentrant), wrote none."""
    grads = trace.meta.get("backward_grads")
    if not isinstance(grads, dict):
        return {}
    first_call = trace.meta.get("first_call_grads")
    first_call = set(first_call) if isinstance(first_call, list) else set()
    graded = _graded(trace)
    calls = Counter(c.module for _, c in graded)
    once = {c.module: pos for pos, c in graded if calls[c.module] == 1}
    first: dict[str, int] = {}
    for pos, c in graded:
        first.setdefault(c.module, pos)
    found: dict[int, dict[str, str]] = defaultdict(dict)
    for name, key in grads.items():
        module, _, local = name.rpartition(".")
        pos = first.get(module) if name in first_call else once.get(module)
        if pos is not None and name not in tied and isinstance(key, str) and key in trace.tensors:
            found[pos][local] = key
    return found


def _summed_grads(
    ref: Trace, tgt: Trace, tied: set[str]
) -> dict[str, tuple[list[int], dict[str, tuple[str, str]]]]:
    """By module called more than once with gradients in the step, the positions of those
    calls and the keys (each side's, by local name) of the gradients of its own parameters
    that the step's one backward wrote into an empty `.grad` and took every call's
    gradient in (`summed_grads`, align.record.loop): the sum of those calls'."""
    found: dict[str, tuple[list[int], dict[str, tuple[str, str]]]] = {}
    sides = [t.meta.get("backward_grads") for t in (ref, tgt)]
    listed = [t.meta.get("summed_grads") for t in (ref, tgt)]
    if not all(isinstance(g, dict) for g in sides) or not all(isinstance(n, list) for n in listed):
        return found
    summable = set(listed[0]) & set(listed[1])
    calls = defaultdict(list)
    for pos, c in _graded(ref):
        calls[c.module].append(pos)
    for name, r_key in sides[0].items():
        module, _, local = name.rpartition(".")
        t_key = sides[1].get(name)
        positions = calls.get(module, [])
        if (
            len(positions) > 1
            and name in summable - tied
            and isinstance(r_key, str)
            and isinstance(t_key, str)
            and r_key in ref.tensors
            and t_key in tgt.tensors
        ):
            found.setdefault(module, (positions, {}))[1][local] = (r_key, t_key)
    return found


def _graded(trace: Trace) -> list[tuple[int, Call]]:
    """The calls that took gradients (not one under no_grad, nor an activation checkpoint's
    forward run again in backward, or first under no_grad when reentrant), with positions."""
    return [
        (pos, c)
        for pos, c in enumerate(trace.calls)
        if any(k is not None for k in c.grad_outputs + c.grad_inputs)
    ]


def _recorded(trace: Trace, pos: int, phase: str, label: str) -> str | None:
    """The key of the recorded tensor an isolated run's `label` reproduces (Isolator's
    labels: output[i], feed:<child>[j], grad_input[j], grad_to:<child>[m], buffer <name>)."""
    call = trace.calls[pos]
    if label.startswith(BUFFER):  # a buffer of the call's module, by name
        written = call.buffer_index(label)
        return None if written is None else call.buffers[written]
    name, _, index = label.rpartition("[")
    i = int(index.rstrip("]"))
    if name == "output":
        keys = [k for k in call.outputs if k is not None]
    elif name == "grad_input":
        keys = call.grad_inputs
    else:
        kind, _, child_label = name.partition(":")
        child = next((c for c in trace.children(pos) if c.label == child_label), None)
        if child is None or kind not in ("feed", "grad_to"):
            return None
        if kind == "feed":
            keys = [k for k in child.inputs if k is not None]
        else:  # the gradients of the child's floating outputs
            keys = [
                g
                for k, g in zip(child.outputs, child.grad_outputs)
                if k is not None and trace.tensor(k).is_floating_point()
            ]
    return keys[i] if i < len(keys) else None
