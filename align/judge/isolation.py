"""Localization by isolation (teacher forcing).

Errors propagate, so the first failing tensor of a whole-network run is often downstream
of the real fault. Here every recorded module call is re-run alone on the reference, the
target and the float64 golden, fed the *reference's* recorded inputs (and, for backward,
the reference's gradient of its output), and its local error is judged like any tensor.

A module with children is run with its children replaced by replays of their recorded
calls (`_Replay`: forward returns the child's recorded outputs, backward the child's
recorded input gradients), so what is judged is the module's *own* computation: what it
feeds its children and returns, and the gradients it passes back. The culprit is a
module that fails alone while none of its descendants does; culprits are listed most
upstream first. Where target and reference agree bit for bit the golden is not run.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from align.errors import AlignError
from align.numerics.decisions import (
    CHOICE_FLOOR,
    Choices,
    Decisions,
    choice_gaps_record,
    far_choice_row,
    is_random,
)
from align.numerics.jitter import Pool
from align.numerics.names import BUFFER, judged_locally
from align.numerics.precision import (
    UNIT_ROUNDOFF,
    kernel_accuracy,
    shares_statistics,
    unscaled_dtype,
)
from align.numerics.trees import flatten, unflatten
from align.numerics.verdict import (
    Divergence,
    Row,
    Tolerance,
    judge_robustly,
)
from align.record.capture import (
    Run,
    autocast_as_called,
    in_draw_layout,
    inputs_laid_out,
    outside_modes,
)
from align.record.trace import Call, Trace


@dataclass
class _Payload:
    outputs: list[torch.Tensor]
    grad_inputs: list[torch.Tensor | None]
    # per output: whether it required grad in the recorded run (a detector's transform
    # passes the target boxes on, which no backward differentiates: 0 * inf in its loss)
    differentiable: list[bool]
    received: tuple = ()


class _Replay(torch.autograd.Function):
    """A child call replayed from the record: constant outputs, recorded input grads;
    an output that did not require grad in the recorded run does not here either."""

    @staticmethod
    def forward(ctx, payload: _Payload, *feeds: torch.Tensor):
        ctx.payload = payload
        with outside_modes(*payload.outputs):  # a record, not an op of the run: not nudged
            outs = tuple(o.clone() for o in payload.outputs)
        ctx.mark_non_differentiable(*(o for o, d in zip(outs, payload.differentiable) if not d))
        return outs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        differentiable = ctx.payload.differentiable
        ctx.payload.received = tuple(g if d else None for g, d in zip(grads, differentiable))
        return (None, *ctx.payload.grad_inputs)


@dataclass
class LocalRun:
    """What one isolated run of a module produced, by label."""

    forward: dict[str, torch.Tensor] = field(default_factory=dict)
    backward: dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    decisions: Decisions | None = None

    def items(self):
        for phase, tensors in (
            ("forward", self.forward),
            ("backward", self.backward),
            ("param_grad", self.params),
        ):
            for label, t in tensors.items():
                yield phase, label, t


class Isolator:
    """Re-runs recorded calls of `ref` on the reference, target and golden runs."""

    def __init__(
        self,
        ref: Run,
        tgt: Run,
        gold: Run,
        backward: bool,
        name_map=None,
        replays: Callable[[str], bool] = is_random,
    ):
        """`replays`: which of the reference run's decisions (by op) a call alone replays:
        its random draws, by default, its branches and indices being its own on the
        reference's inputs; every one where a run re-runs its own calls from its own
        inputs (align.judge.step_isolation: each call as it ran)."""
        self.ref, self.tgt, self.gold = ref, tgt, gold
        self.backward = backward
        self.name_map = name_map or {}
        self.children: dict[int, list[int]] = defaultdict(list)
        for pos, call in enumerate(ref.trace.calls):
            if call.parent is not None:
                self.children[call.parent].append(pos)
        self.modules = {id(run.model): dict(run.model.named_modules()) for run in (ref, tgt, gold)}
        # each call's decisions in the whole reference run it replays when it runs alone
        self.replayed_of: dict[int, Choices] = defaultdict(list)
        if ref.decisions is not None:
            for (key, t), owner in zip(ref.decisions.log, ref.decisions.owners):
                if owner is not None and replays(key):
                    self.replayed_of[owner].append((key, t))
        self.decided: dict[int, Choices] = {}  # the reference's decisions in isolation

    def _decisions(self, run: Run, pos: int) -> Decisions:
        """The reference alone replays its whole run's decisions of this call that it
        `replays` and records its own others; every other run replays what it decided."""
        call = self.ref.trace.calls[pos]
        here = (call.module, call.index, pos)
        if run is self.ref:
            return Decisions(self.replayed_of.get(pos, []), where=lambda: here)
        return Decisions(self.decided.get(pos, []), where=lambda: here)

    def _module_name(self, run: Run, name: str) -> str | None:
        return self.name_map.get(name, name) if run is self.tgt else name

    def run(self, run: Run, pos: int) -> LocalRun:
        """One isolated call of the recorded call at `pos` on `run`."""
        trace, spec = self.ref.trace, self.ref.specs[pos]
        call = trace.calls[pos]
        modules = self.modules[id(run.model)]
        module = modules[self._module_name(run, call.module)]
        want_grad = self.backward and any(k is not None for k in call.grad_outputs)

        def attempt(memory_format: torch.memory_format | None) -> LocalRun:
            # inputs of its own each attempt: a module may write one before it raises
            leaves: list[Any] = []
            grad_leaves: list[tuple[int, torch.Tensor]] = []
            for j, key in enumerate(call.inputs):
                if key is None:
                    leaves.append(spec.in_leaves[j])
                    continue
                t = run.place(trace.tensor(key))
                if want_grad and call.grad_inputs[j] is not None and t.is_floating_point():
                    grad_leaves.append((j, t.requires_grad_(True)))
                    t = t.clone()  # a non-leaf, so in-place modules (ReLU(inplace)) may run
                leaves.append(t)
            if memory_format is not None:
                leaves = inputs_laid_out(leaves, memory_format)
            args, kwargs = unflatten(leaves, spec.in_spec)
            with _weights_laid_out(module, memory_format):
                return self._call(run, pos, module, args, kwargs, grad_leaves, want_grad)

        return in_draw_layout(attempt, run.memory_format)

    def _call(
        self, run: Run, pos: int, module, args, kwargs, grad_leaves, want_grad: bool
    ) -> LocalRun:
        """The isolated call itself, forward and (where `want_grad`) backward, on its
        prepared arguments."""
        trace, call = self.ref.trace, self.ref.trace.calls[pos]
        modules = self.modules[id(run.model)]
        local = LocalRun(decisions=self._decisions(run, pos))
        replaced: list[tuple[torch.nn.Module, Any]] = []
        buffers = self._load_buffers(run, module, call)
        try:
            self._install_replays(run, pos, modules, local, replaced)
            _seed(run)
            with (
                local.decisions,
                run.numerics(),
                autocast_as_called(self.ref.specs[pos], run.device),
            ):
                out = module(*args, **kwargs)
            for name in call.buffer_names:
                if (written := module._buffers.get(name)) is not None:
                    local.forward[BUFFER + name] = written.detach().clone()
        finally:
            for child, previous in replaced:  # restore a forward the user set on the instance
                if previous is None:
                    del child.forward
                else:
                    child.forward = previous
            module._buffers.update(buffers)  # the buffers the whole run left
        outs = [o for o in flatten(out)[0] if isinstance(o, torch.Tensor)]
        for i, o in enumerate(outs):
            local.forward[f"output[{i}]"] = o.detach()
        if not want_grad:
            return self._decided(run, pos, local)
        pairs = [
            (o, _scaled(run, trace.tensor(k), o.dtype))
            for o, k in zip(outs, call.grad_outputs)
            if k is not None and o.requires_grad
        ]
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        wrt = [t for _, t in grad_leaves] + [p for _, p in params] + self._anchors
        if not pairs or not wrt:
            return self._decided(run, pos, local)
        with local.decisions, run.numerics(autocast=False):
            grads = torch.autograd.grad(
                [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True
            )
        for (j, _), g in zip(grad_leaves, grads):
            if g is not None:
                local.backward[f"grad_input[{j}]"] = _unscaled(run, g)
        for (n, _), g in zip(params, grads[len(grad_leaves) :]):
            if g is not None:
                local.params[n] = _unscaled(run, g)
        for label, payload in self._payloads.items():
            for m, g in enumerate(payload.received):
                if g is not None:
                    local.backward[f"grad_to:{label}[{m}]"] = _unscaled(run, g)
        return self._decided(run, pos, local)

    def _load_buffers(self, run: Run, module: torch.nn.Module, call: Call) -> dict:
        """Start the call from fresh buffers holding the reference's values before it (a
        running statistic is judged on what this call added to it); returns the module's
        own buffers, to put back (untouched: autograd may have saved them)."""
        own = {}
        for name, key in zip(call.buffer_names, call.buffers_in):
            buffer = module._buffers.get(name)
            if buffer is not None and key is not None:
                own[name] = buffer
                value = run.place(self.ref.trace.tensor(key))
                module._buffers[name] = value.to(buffer.dtype, copy=True)
        return own

    def _decided(self, run: Run, pos: int, local: LocalRun) -> LocalRun:
        if run is self.ref:
            self.decided[pos] = local.decisions.log
        return local

    def _install_replays(self, run: Run, pos: int, modules, local: LocalRun, replaced) -> None:
        """Replace the children called by call `pos` with replays of their records."""
        trace = self.ref.trace
        queues: dict[str, deque[int]] = defaultdict(deque)
        for child_pos in self.children[pos]:
            queues[trace.calls[child_pos].module].append(child_pos)
        self._payloads: dict[str, _Payload] = {}
        self._anchors: list[torch.Tensor] = []
        for name, queue in queues.items():
            mapped = self._module_name(run, name)
            if mapped is None:
                raise RuntimeError(f"{name} has no counterpart in the target (name_map)")
            child = modules[mapped]
            replaced.append((child, child.__dict__.get("forward")))
            child.forward = self._replay_fn(run, name, queue, local)

    def _replay_fn(self, run: Run, name: str, queue: deque, local: LocalRun):
        trace = self.ref.trace

        def replay(*args, **kwargs):
            if not queue:
                raise RuntimeError(f"{name} is called more often than on the reference")
            pos = queue.popleft()
            call, spec = trace.calls[pos], self.ref.specs[pos]
            label = call.label
            feeds = [x for x in flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
            for j, f in enumerate(feeds):
                local.forward[f"feed:{label}[{j}]"] = f.detach()
            required = [  # per tensor output: whether it required grad in the run
                r
                for k, r in zip(call.outputs, spec.out_grad or [True] * len(call.outputs))
                if k is not None
            ]
            outs = [run.place(trace.tensor(k)) for k in call.outputs if k is not None]
            floats = [o for o in outs if o.is_floating_point()]
            needed = [r for r, o in zip(required, outs) if o.is_floating_point()]
            tensor_grads = [g for k, g in zip(call.inputs, call.grad_inputs) if k is not None]
            grads_in = [
                _scaled(run, trace.tensor(k), f.dtype)
                if k is not None and f.requires_grad
                else None
                for f, k in zip(feeds, tensor_grads + [None] * len(feeds))
            ]
            if (
                torch.is_grad_enabled()
                and any(g is not None for g in call.grad_outputs)
                and not any(f.requires_grad for f in feeds)
            ):  # a child fed no tensor that requires grad (a spectral norm's weight computed
                # from its own parameter): an anchor, so the gradient sent to it is judged too
                feeds.append(torch.zeros((), device=run.device, requires_grad=True))
                self._anchors.append(feeds[-1])
                grads_in.append(None)
            payload = _Payload(floats, grads_in, needed)
            self._payloads[label] = payload
            replayed = iter(_Replay.apply(payload, *feeds) if floats else ())
            rebuilt = []
            for leaf, key in zip(spec.out_leaves, call.outputs):
                if key is None:
                    rebuilt.append(leaf)
                else:
                    t = outs.pop(0)
                    rebuilt.append(next(replayed) if t.is_floating_point() else t)
            return unflatten(rebuilt, spec.out_spec)

        return replay


def _scaled(run: Run, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A recorded gradient placed on `run` at `dtype`, times its `grad_scale`."""
    placed = run.place(grad)
    return (placed * run.grad_scale if run.grad_scale != 1.0 else placed).to(dtype)


def _unscaled(run: Run, grad: torch.Tensor) -> torch.Tensor:
    """A gradient `run` computed, its `grad_scale` taken off (as align.record.loop records)."""
    if run.grad_scale == 1.0:
        return grad
    return grad.to(unscaled_dtype(grad.dtype, run.grad_scale)) / run.grad_scale


def _seed(run: Run) -> None:
    """Seed the run's device as a whole run does; the CPU alone without touching the lazy
    accelerator modules (torch.manual_seed formats a stack trace for each, every call)."""
    if run.device.type == "cpu":
        torch.default_generator.manual_seed(run.seed)
    else:
        torch.manual_seed(run.seed)


def _identical(a: LocalRun, b: LocalRun) -> bool:
    left, right = list(a.items()), list(b.items())
    if [(p, n) for p, n, _ in left] != [(p, n) for p, n, _ in right]:
        return False
    return all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.cpu(), y.cpu())
        for (_, _, x), (_, _, y) in zip(left, right)
    )


# (measured: Glow's ActNorm, initialized from its first batch's statistics: an honest
# fp16 target's own, from its own inputs, failed its isolated output)
WRITES_PARAMS = (
    "it writes its parameters in its forward (a data-dependent initialization), and re-run "
    "alone it would start from what each side's own run wrote"
)


def isolate(
    ref: Run,
    tgt: Run,
    gold: Run,
    *,
    tol: Tolerance,
    backward: bool,
    strict_dtype: bool,
    name_map: dict[str, str | None] | None = None,
    draws: int = 0,
) -> tuple[list[Row], list[Divergence], list[str]]:
    """Judge every recorded module call alone. Returns (rows, culprits, notes).

    Each call that the target does not reproduce bit for bit also runs on the golden,
    and where one of its tensors fails, on `draws` honest draws of the reference
    (align.numerics.jitter) to judge that tensor again.
    """
    iso = Isolator(ref, tgt, gold, backward, name_map)
    floor = choice_floor(tgt)
    rows: list[Row] = []
    failing: dict[int, Row] = {}
    notes: list[str] = []
    # every call of a module some call of which wrote its parameters (a shared instance
    # called again starts from what the first call wrote, on each side its own)
    writers = {c.module for pos, c in enumerate(ref.trace.calls) if ref.specs[pos].writes_params}
    for pos, call in enumerate(ref.trace.calls):
        if iso._module_name(tgt, call.module) is None:
            continue
        if call.module in writers:
            notes.append(f"{call.label} not isolated: {WRITES_PARAMS}")
            continue
        try:
            r_local = iso.run(ref, pos)
            t_local = iso.run(tgt, pos)
            for fault in t_local.decisions.faults:  # replayed draws hide it from the values
                failing[pos] = fault.row(isolated=True)
                rows.append(failing[pos])
            chose = _wrong_choices(
                call, t_local, lambda k, p=pos: iso.run(iso.ref.draw(k), p), floor
            )
            if chose is not None:  # replayed choices hide it from the values too
                failing[pos] = chose
                rows.append(chose)
            if _identical(r_local, t_local):
                continue
            g_local = iso.run(gold, pos)
        except Exception as exc:  # a module we cannot re-run alone is reported, not fatal
            notes.append(f"{call.label} not isolated: {type(exc).__name__}: {exc}")
            continue
        made = Pool(lambda k, pos=pos: iso.run(iso.ref.draw(k), pos), draws)
        try:
            judged = list(
                _judge_local(ref.trace, call, r_local, t_local, g_local, made, tol, strict_dtype)
            )
        except AlignError as exc:  # NaN/Inf on the reference's own isolated run: no yardstick
            notes.append(f"{call.label} not judged in isolation: {exc}")
            continue
        for row in judged:
            rows.append(row)
            if row.failed:
                worst = failing.get(pos)
                if worst is None or row.ratio(row.worst()) > worst.ratio(worst.worst()):
                    failing[pos] = row
    culprits = [failing[p].divergence() for p in culprit_positions(ref.trace.calls, failing)]
    return rows, culprits, notes


# An isolated call runs on the reference's inputs, so an honest kernel's index choices
# (sort, top-k, max, a max-pool's, the boxes NMS keeps) differ from the reference's only
# between values its own rounding puts within reach of each other (of a tie, of the
# IoU threshold); replaying the reference's choices would hide a kernel that chooses
# otherwise far from any tie (decisions.far_choice_row: how far its choices may sit). The
# honest draws of the call that measure the reach: made only where a choice sat beyond
# the floor.
CHOICE_DRAWS = 2


def choice_floor(run: Run) -> float:
    """How far from a tie any run's own index choices may sit (CHOICE_FLOOR unit
    roundoffs of its precision; an emulated HF32 / TF32 run rounds to 10 mantissa bits)."""
    unit = UNIT_ROUNDOFF[run.policy.low_precision]
    if run.emulation is not None:
        unit = max(unit, 2.0**-11)
    return CHOICE_FLOOR * unit


def _wrong_choices(
    call: Call, local: LocalRun, draw: Callable[[int], LocalRun], floor: float
) -> Row | None:
    """A failing row where the target's own index choices on the reference's inputs sat
    far from any tie (a wrong sort, a wrong NMS), else None; `draw(k)` is the reference's
    k-th honest draw of the call, made only where a choice sat beyond `floor`."""
    far = choice_gaps_record(local.decisions)
    far = {op: s for op, s in far.items() if s["gap"] > floor}
    if not far:
        return None
    honest = [choice_gaps_record(draw(k).decisions) for k in range(1, CHOICE_DRAWS + 1)]
    for op, s in sorted(far.items(), key=lambda item: -item[1]["gap"]):
        reach = max((h[op]["gap"] for h in honest if op in h), default=0.0)
        whose = "its honest draws'"
        row = far_choice_row((call.module, call.index), op, s, reach, floor, whose, True)
        if row is not None:
            return row
    return None


def _judge_local(
    trace: Trace,
    call: Call,
    r: LocalRun,
    t: LocalRun,
    g: LocalRun,
    draws: Pool[LocalRun],
    tol,
    strict_dtype,
):
    """The call's isolated rows (`trace`, the reference's, holds its recorded tensors)."""
    ran = r.decisions.ran  # the aten ops the call ran: its kernels' documented accuracy
    ref_items = {(p, n): x for p, n, x in r.items()}
    tgt_items = {(p, n): x for p, n, x in t.items()}
    gold_items = {(p, n): x for p, n, x in g.items()}

    def honest(phase: str, label: str, round_: int) -> list[torch.Tensor]:
        return [x for d in draws(round_) for p, n, x in d.items() if (p, n) == (phase, label)]

    for (phase, label), rt in ref_items.items():
        row = Row(call.module, call.index, phase, label, "", [], isolated=True)
        tt, gt = tgt_items.get((phase, label)), gold_items.get((phase, label))
        if tt is None or gt is None:
            row.failed.append("missing")
            row.message = f"{label} is produced on the reference but not on the target"
            yield row
            continue
        yield judge_robustly(
            tt,
            rt,
            gt,
            tol,
            strict_dtype=strict_dtype,
            # a running mean is a sum over the batch, which may cancel: conditioned like a
            # propagated tensor, its k rises with how far the reference's error says it
            # cancelled (names.LOCAL_BUFFERS says why a running variance is not)
            local=judged_locally(label),
            row=row,
            draws=functools.partial(honest, phase, label),
            accuracy=kernel_accuracy(ran),
            statistics=statistics_span(ran, trace, call, label, gt),
        )


def _first(trace: Trace, keys: list[str | None]) -> torch.Tensor | None:
    key = next((k for k in keys if k is not None), None)
    tensor = trace.tensor(key) if key is not None and key in trace.tensors else None
    return tensor if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() else None


def statistics_span(
    ran: set[str], trace: Trace, call: Call, label: str, golden: torch.Tensor
) -> float:
    """What the statistics a call normalized by (precision.STATISTIC_ORDER) summed, in RMS of
    its tensor `label` (exact: `golden`): 0 where it ran none; 1 for what it computes
    forward; for an input gradient, the grad_output its backward summed (mean(dy),
    mean(dy x)), through the call's forward gain (`_spread(y) / _spread(x)`: a BatchNorm's
    |weight| / std, whatever x's channel means), at least its own RMS. An input gradient
    that cancels is offset by those sums' rounding, not its own (an honest channels_last
    BatchNorm after a 1x1 convolution of zero-mean channels: its input gradient's offset
    was twice an allowance in its own RMS, with one thread)."""
    if not shares_statistics(ran):
        return 0.0
    if not label.startswith("grad_input["):
        return 1.0
    x, y = _first(trace, call.inputs), _first(trace, call.outputs)
    dy = _first(trace, call.grad_outputs)
    if x is None or y is None or dy is None:
        return 1.0
    scales = [
        _spread(x),
        _spread(y),
        *(t.double().pow(2).mean().sqrt().item() for t in (dy, golden)),
    ]
    if min(scales) == 0 or not all(map(math.isfinite, scales)):
        return 1.0
    spread_x, spread_y, rms_dy, own = scales
    return max(1.0, rms_dy * spread_y / spread_x / own)


def _spread(t: torch.Tensor) -> float:
    """RMS of `t` less its mean over every dim but 1 (a channel's, for a BatchNorm)."""
    t = t.double()
    dims = [d for d in range(t.dim()) if d != 1] if t.dim() > 1 else [0]
    return (t - t.mean(dims, keepdim=True)).pow(2).mean().sqrt().item()


def culprit_positions(calls: list[Call], failing: dict[int, Row]) -> list[int]:
    """Failing calls none of whose descendants fail, in call (upstream-first) order."""
    has_failing_descendant = set()
    for pos in failing:
        parent = calls[pos].parent
        while parent is not None:
            has_failing_descendant.add(parent)
            parent = calls[parent].parent
    return sorted(p for p in failing if p not in has_failing_descendant)


@contextlib.contextmanager
def _weights_laid_out(
    module: torch.nn.Module, memory_format: torch.memory_format | None
) -> Iterator[None]:
    """`module`'s 4-d weights in `memory_format` for one isolated call, put back after
    (the reference and its draws share the model); nothing where it is None."""
    kept = (
        []
        if memory_format is None
        else [(t, t.data) for t in [*module.parameters(), *module.buffers()] if t.dim() == 4]
    )
    try:
        for t, data in kept:
            t.data = data.contiguous(memory_format=memory_format)
        yield
    finally:
        for t, data in kept:
            t.data = data
