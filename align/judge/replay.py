"""Which API call of an msprobe dump computes wrong on its own: each call re-run in
float64 from the inputs the dump holds, on each side, without the model or a golden dump.

An msprobe tensor dump at level L1 or mix holds every API call's inputs and outputs
(`Functional.conv2d.0.forward`: input, weight, bias, stride ...). Replaying the call on
the CPU in float64 from one side's own inputs gives that call's exact result on that
side: the golden of that call alone. The target's output is judged against its replay,
relative to the reference's error against the reference's replay (moved onto the
target's replay, elementwise, and rounded to the dump's dtype), with the floors of the
op's documented accuracy, as align.judge.isolation judges a module
(align.numerics.verdict, `local`). A call that fails is a culprit: wrong given its own
inputs, whatever happened upstream.

A call's backward entry (`Functional.conv2d.0.backward`: the gradient of its output
in, and out what msprobe's hook on the output's autograd node caught, the gradients that
node sends to its inputs, in its order) is replayed the same way: the call re-run in
float64 from its dumped forward inputs, differentiated against that side's own dumped
output gradient, so a kernel whose backward alone is wrong is named too. A call that
normalized by statistics (batch_norm, layer_norm, group_norm) has an honest draw too: the
target's replay with its sums moved as a one-pass kernel's are (align.numerics.one_pass).

Only REPLAYABLE APIs run, pure tensor arithmetic named by msprobe's
prefix (`Functional.<name>` is torch.nn.functional's, `Torch.<name>` torch's,
`Tensor.<name>` the tensor method); nothing else a dump names is ever called. A call
whose inputs are not all in the dump (a keyword tensor, an argument type not listed in
`_value`), or whose outputs hold more than MAX_REPLAYED elements, is left out and counted
in a note. Random ops (dropout), device-specific APIs (`NPU.*`) and the backward of
in-place methods (`Tensor.add_`) are not replayed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from align.errors import AlignError, TraceError
from align.judge.isolation import statistics_span
from align.numerics.decisions import Decisions
from align.numerics.one_pass import OnePass
from align.numerics.precision import kernel_accuracy, shares_statistics
from align.numerics.verdict import Divergence, Row, Tolerance, judge_on_replays
from align.record.trace import Call, Trace

__all__ = ["REPLAYABLE", "replay_calls", "replay_draws"]

# msprobe prefix -> the APIs re-run from dumps: deterministic tensor arithmetic only
REPLAYABLE: dict[str, frozenset[str]] = {
    "Functional": frozenset(
        """conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear
        bilinear batch_norm layer_norm group_norm instance_norm rms_norm relu relu6
        leaky_relu elu selu celu gelu silu mish hardswish hardsigmoid hardtanh sigmoid tanh
        softplus softsign logsigmoid softmax log_softmax avg_pool1d avg_pool2d avg_pool3d
        max_pool1d max_pool2d max_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
        adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d interpolate pad
        normalize pixel_shuffle embedding cross_entropy nll_loss mse_loss l1_loss
        smooth_l1_loss huber_loss binary_cross_entropy_with_logits kl_div""".split()
    ),
    "Torch": frozenset(
        """matmul mm bmm addmm baddbmm add sub mul div exp log sqrt rsqrt sigmoid tanh
        relu sum mean var std cat stack abs neg pow clamp softmax log_softmax flatten
        transpose permute reshape""".split()
    ),
    "Tensor": frozenset(
        """add add_ sub sub_ mul mul_ div div_ matmul sum mean exp sigmoid tanh relu pow
        sqrt rsqrt clamp abs neg __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__
        __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ __itruediv__ __matmul__
        __neg__ softmax view reshape transpose permute flatten""".split()
    ),
}
_PLAIN = {"int", "float", "bool", "str"}
MAX_REPLAYED = 1 << 27  # output elements (1 GiB in float64): a larger call is left out


class _Unreplayable(Exception):
    """This call cannot be re-run from the dump (why: the message)."""


def _function(api: str) -> Callable[..., Any]:
    """The torch callable of a replayable msprobe API name (`Functional.conv2d`)."""
    prefix, _, name = api.partition(".")
    if name not in REPLAYABLE.get(prefix, ()):
        raise _Unreplayable(f"{api} is not replayed")
    if prefix == "Functional":
        return getattr(F, name)
    if prefix == "Torch":
        return getattr(torch, name)
    return getattr(torch.Tensor, name)


def _value(value: Any, tensors: Any) -> Any:
    """A dumped argument as a Python value; tensors in float64 where they are floating."""
    if value is None:
        return None
    if isinstance(value, list):
        return [_value(v, tensors) for v in value]
    if not isinstance(value, dict):
        raise _Unreplayable(f"an argument {str(value)[:40]!r} of no known form")
    kind = value.get("type")
    if kind == "torch.Tensor":
        name = value.get("data_name")
        if not isinstance(name, str) or name not in tensors:
            raise _Unreplayable("a tensor argument without its file")
        t = tensors[name]
        return t.double() if t.is_floating_point() else t
    if kind in _PLAIN and isinstance(value.get("value"), (int, float, bool, str)):
        return value["value"]
    if kind == "slice" and isinstance(value.get("value"), list):
        return slice(*value["value"])
    raise _Unreplayable(f"an argument of type {kind}")


def _replay(
    api: str, entry: dict, tensors: Any, one_pass: int | None = None
) -> tuple[list[torch.Tensor | None], set[str]]:
    """The call's outputs re-run in float64 from its dumped inputs (floating ones; None
    elsewhere), and the aten ops it ran; with `one_pass` (a seed), its statistics summed
    as in one pass (align.numerics.one_pass)."""
    fn = _function(api)
    args = _value(entry.get("input_args") or [], tensors)
    kwargs = {k: _value(v, tensors) for k, v in (entry.get("input_kwargs") or {}).items()}
    if any(k in kwargs for k in ("dtype", "out")):
        raise _Unreplayable("a dtype or out argument")
    if api.endswith("_") or "__i" in api:  # in place: on a private copy
        args = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, args)
    with Decisions() as ops, torch.no_grad(), _one_pass(one_pass):
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:  # arguments a dump flattened otherwise: not replayable
            raise _Unreplayable(f"{type(exc).__name__}: {str(exc)[:80]}") from exc
    floating = [x if isinstance(x, torch.Tensor) else None for x in tree_flatten(out)[0]]
    return [x if x is not None and x.is_floating_point() else None for x in floating], ops.ran


def _replay_backward(
    api: str, forward: dict, backward: dict, tensors: Any, one_pass: int | None = None
) -> tuple[list[torch.Tensor | None], set[str]]:
    """What msprobe dumps as a call's backward `output`, re-run in float64: the gradients
    the autograd node of the call's first tensor output (where msprobe hooks it) sends to
    its inputs, in that node's order (a linear's addmm: bias, input, weight transposed; a
    batch_norm's: input, weight, bias), None where the node sends none. The call re-runs
    from its dumped forward inputs, a tensor requiring a gradient where the dump says it
    did (a copy of it: an in-place call writes the copy, as it wrote a non-leaf on the
    device), differentiated against the dumped gradient of that output; `one_pass` as for
    `_replay`."""
    if api.endswith("_") or "__i" in api:
        raise _Unreplayable("the backward of an in-place call is not re-run")
    fn = _function(api)
    dumped = forward.get("input_args") or []
    args = [_needing_grad(_value(v, tensors), v) for v in dumped]
    kwargs = {
        k: _needing_grad(_value(v, tensors), v)
        for k, v in (forward.get("input_kwargs") or {}).items()
    }
    if any(k in kwargs for k in ("dtype", "out")):
        raise _Unreplayable("a dtype or out argument")
    given = [_value(g, tensors) for g in backward.get("input") or []]
    sent: list[tuple[torch.Tensor | None, ...]] = []
    with Decisions() as ops, _one_pass(one_pass):
        try:
            with torch.enable_grad():
                out = fn(*args, **kwargs)
            first = next((x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)), None)
            grad = given[0] if given and isinstance(given[0], torch.Tensor) else None
            if first is None or first.grad_fn is None or grad is None:
                raise _Unreplayable("no output gradient to differentiate against")
            if grad.shape != first.shape:
                raise _Unreplayable("an output gradient of another shape than the output")
            first.grad_fn.register_hook(lambda grad_inputs, _: sent.append(grad_inputs))
            torch.autograd.backward(first, grad.double())
        except _Unreplayable:
            raise
        except Exception as exc:  # arguments a dump flattened otherwise: not replayable
            raise _Unreplayable(f"{type(exc).__name__}: {str(exc)[:80]}") from exc
    return list(sent[0]), ops.ran


def _needing_grad(value: Any, dumped: Any) -> Any:
    """A float64 tensor argument as the replay feeds it: a copy of a leaf that requires a
    gradient where the dump says it did (or says nothing), else as it is."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    if isinstance(dumped, dict) and dumped.get("requires_grad") is False:
        return value
    return value.detach().requires_grad_().clone()


def _one_pass(seed: int | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if seed is None else OnePass(seed)


@functools.lru_cache(maxsize=4)
def _dump_data(path: str) -> dict[str, Any]:
    """dump.json's `data` (read by align.record.msprobe before: it parses)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)["data"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TraceError(f"{path}: cannot be read again: {exc}") from exc
    if not isinstance(data, dict):
        raise TraceError(f"{path}: no 'data' object")
    return data


def _entry(trace: Trace, position: int, phase: str = "forward") -> tuple[str, dict] | None:
    """(API name, dump.json entry of `phase`) of the call at `position`, for an API call
    with a forward entry."""
    names = trace.meta.get("entries") or []
    call = trace.calls[position]
    name = names[position] if position < len(names) else None
    if call.cls != "api" or not isinstance(name, str) or not name.endswith(".forward"):
        return None
    api = name.rsplit(".", 2)[0]
    entry = _dump_data(trace.meta["dump_file"]).get(f"{name[: -len('forward')]}{phase}")
    return (api, entry) if isinstance(entry, dict) else None


def replay_calls(
    ref: Trace,
    tgt: Trace,
    pairs: dict[int, int],
    tol: Tolerance,
    *,
    strict_dtype: bool = True,
) -> tuple[list[Row], list[Divergence], list[str]]:
    """Judge every matched forward API call (`pairs`: reference position -> target
    position) against its own float64 replay on each side. Returns (rows, culprits in
    execution order, notes)."""
    rows: list[Row] = []
    culprits: list[Divergence] = []
    skipped: dict[str, int] = {}
    replayed = 0
    order = ref.forward_order or range(len(ref.calls))
    for pos in order:
        if pos not in pairs:
            continue
        found = (_entry(ref, pos), _entry(tgt, pairs[pos]))
        if found[0] is None or found[1] is None:
            continue
        call = ref.calls[pos]
        try:
            judged = list(_judged(call, ref, tgt, pos, pairs[pos], found, tol, strict_dtype))
        except _Unreplayable as exc:
            reason = str(exc)
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        except AlignError as exc:  # NaN/Inf in a replay: no yardstick for this call
            skipped[f"not judged: {exc}"] = 1
            continue
        replayed += 1
        try:
            judged += list(
                _judged_backward(call, ref, tgt, pos, pairs[pos], found, tol, strict_dtype)
            )
        except _Unreplayable as exc:
            reason = f"backward: {exc}"
            skipped[reason] = skipped.get(reason, 0) + 1
        except AlignError as exc:
            skipped[f"backward not judged: {exc}"] = 1
        rows += judged
        failing = [r for r in judged if r.failed]
        if failing:
            culprits.append(max(failing, key=lambda r: r.ratio(r.worst())).divergence())
    notes = []
    if replayed:
        notes.append(
            f"{replayed} API call(s) re-run in float64 from their dumped inputs on each side "
            "and judged alone (align.judge.replay): a culprit computes wrong given its own "
            "inputs"
        )
    if skipped:
        shown = "; ".join(f"{n} x {why}" for why, n in sorted(skipped.items())[:8])
        notes.append(f"API calls not re-run from the dump: {shown}")
    return rows, culprits, notes


def replay_draws(ref: Trace, aligned: Trace) -> list[Trace]:
    """Two honest draws of the reference `ref` (`aligned`: its calls matched to the
    target's, align.judge.msprobe_dumps.align_calls) for a comparison without a golden
    dump, where whole-network tensors have dtype floors alone for limits: each replayed
    call's dumped tensors moved by an honest kernel's own error on its inputs, the
    reference kernel's (its tensor less its float64 replay) and, where the call normalized
    by statistics, a one-pass kernel's (align.numerics.one_pass; measured: a channels_last
    BatchNorm at channel mean / std 30, output 2.5x the fp32 floor off the contiguous
    one's on the same input). Tensors of calls not replayed stay the reference's: nothing
    widens there. Made lazily, for the tensors that fail against the reference alone."""
    replays = _Replays(ref)
    return [
        replace(aligned, tensors=_MovedTensors(ref, replays, one_pass), draws=[])
        for one_pass in (False, True)
    ]


class _Replays:
    """The float64 replays of `ref`'s calls from its own dumped inputs, each made once:
    by (call position, phase, one-pass seed or None), the tensors and the ops it ran."""

    def __init__(self, ref: Trace):
        self.ref = ref
        self.made: dict[tuple[int, str, int | None], tuple[list, set[str]]] = {}

    def __call__(self, pos: int, phase: str, one_pass: int | None) -> tuple[list, set[str]]:
        key = (pos, phase, one_pass)
        if key not in self.made:
            found = _entry(self.ref, pos)
            if found is None:
                raise _Unreplayable("not an API call with a forward entry")
            api, forward = found
            if phase == "forward":
                self.made[key] = _replay(api, forward, self.ref.tensors, one_pass)
            else:
                backward = _entry(self.ref, pos, "backward")
                if backward is None:
                    raise _Unreplayable("no backward entry")
                self.made[key] = _replay_backward(
                    api, forward, backward[1], self.ref.tensors, one_pass
                )
        return self.made[key]


class _MovedTensors:
    """The reference's tensors, each replayed call's output and input gradients moved by
    an honest kernel's error (`replay_draws`); read as a trace's `tensors`."""

    def __init__(self, ref: Trace, replays: _Replays, one_pass: bool):
        self.ref, self.replays, self.one_pass = ref, replays, one_pass
        self.at = {
            key: (pos, phase, i)
            for pos, call in enumerate(ref.calls)
            for phase, keys in (("forward", call.outputs), ("backward", call.grad_inputs))
            for i, key in enumerate(keys)
            if key is not None
        }

    def __contains__(self, key: str) -> bool:
        return key in self.ref.tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        r = self.ref.tensors[key]
        if key not in self.at or not r.is_floating_point():
            return r
        pos, phase, i = self.at[key]
        try:
            exact, ran = self.replays(pos, phase, None)
            if self.one_pass and not shares_statistics(ran):
                return r  # an honest kernel of this call errs as the reference's: draw 0
            honest = self.replays(pos, phase, 0)[0] if self.one_pass else [r]
        except (_Unreplayable, AlignError):
            return r
        if i >= min(len(exact), len(honest)) or exact[i] is None or honest[i] is None:
            return r
        if exact[i].shape != r.shape or honest[i].shape != r.shape:
            return r
        return r.double() + (honest[i].double() - exact[i])


def _judged_backward(
    call: Call,
    ref: Trace,
    tgt: Trace,
    rpos: int,
    tpos: int,
    found: tuple,
    tol: Tolerance,
    strict_dtype: bool,
) -> Iterator[Row]:
    """Rows of the call's input gradients against their float64 replays, when both sides
    dumped its backward (`found`: both sides' forward entries, as `_judged` takes them)."""
    r_bwd, t_bwd = _entry(ref, rpos, "backward"), _entry(tgt, tpos, "backward")
    if r_bwd is None or t_bwd is None:
        return
    (api, r_fwd), (_, t_fwd) = found
    r_bwd, t_bwd = r_bwd[1], t_bwd[1]
    r_gold, ran = _replay_backward(api, r_fwd, r_bwd, ref.tensors)
    t_gold, _ = _replay_backward(api, t_fwd, t_bwd, tgt.tensors)
    keys = (ref.calls[rpos].grad_inputs, tgt.calls[tpos].grad_inputs)
    sides = ((ref, tgt), keys, (r_gold, t_gold))
    drawn = functools.cache(lambda: _replay_backward(api, t_fwd, t_bwd, tgt.tensors, 0)[0])
    yield from _rows(call, "backward", "grad_input", *sides, tol, strict_dtype, ran, drawn)


def _judged(
    call: Call,
    ref: Trace,
    tgt: Trace,
    rpos: int,
    tpos: int,
    found: tuple,
    tol: Tolerance,
    strict_dtype: bool,
) -> Iterator[Row]:
    (api, r_entry), (_, t_entry) = found
    r_keys, t_keys = ref.calls[rpos].outputs, tgt.calls[tpos].outputs
    stats = getattr(ref.tensors, "stats", {})
    if sum(math.prod(stats[k]["shape"]) for k in r_keys if k in stats) > MAX_REPLAYED:
        raise _Unreplayable(f"outputs of more than {MAX_REPLAYED} elements")
    r_gold, ran = _replay(api, r_entry, ref.tensors)
    t_gold, _ = _replay(api, t_entry, tgt.tensors)
    sides = ((ref, tgt), (r_keys, t_keys), (r_gold, t_gold))
    drawn = functools.cache(lambda: _replay(api, t_entry, tgt.tensors, one_pass=0)[0])
    yield from _rows(call, "forward", "output", *sides, tol, strict_dtype, ran, drawn)


def _rows(
    call: Call,
    phase: str,
    label: str,
    traces: tuple[Trace, Trace],
    keys: tuple[list[str | None], list[str | None]],
    golds: tuple[list[torch.Tensor | None], list[torch.Tensor | None]],
    tol: Tolerance,
    strict_dtype: bool,
    ran: set[str],
    one_pass: Callable[[], list[torch.Tensor | None]],
) -> Iterator[Row]:
    """Each dumped tensor against its side's replay, relative to the reference's error;
    `ran`, the aten ops the replay ran (the kernels' documented accuracy); `one_pass()`,
    the target's replay with its statistics summed as in one pass: an honest draw where
    the call normalized by statistics."""
    if not shares_statistics(ran):
        one_pass = list  # no statistics, no such draw
    (ref, tgt), (r_gold, t_gold) = traces, golds
    for i, (rk, tk) in enumerate(zip(*keys)):
        if rk is None or tk is None or i >= min(len(r_gold), len(t_gold)) or r_gold[i] is None:
            continue
        r, t, gr, gt = ref.tensors[rk], tgt.tensors[tk], r_gold[i], t_gold[i]
        if gt is None or r.shape != gr.shape or t.shape != gt.shape or r.shape != t.shape:
            continue
        row = Row(call.module, call.index, phase, f"{label}[{i}]", "", [], isolated=True)
        yield judge_on_replays(
            t,
            r,
            gt,
            gr,
            tol,
            strict_dtype=strict_dtype,
            row=row,
            accuracy=kernel_accuracy(ran),
            statistics=statistics_span(ran, ref, call, row.tensor, gr),
            honest=functools.partial(_drawn, one_pass, i),
        )


def _drawn(one_pass: Callable[[], list[torch.Tensor | None]], i: int) -> torch.Tensor | None:
    drawn = one_pass()
    return drawn[i] if i < len(drawn) else None
