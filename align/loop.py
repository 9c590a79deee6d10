"""Align inside the user's own training loop: record chosen steps on each device, then
judge them step by step.

    rec = align.Recorder(model, "npu_dump", steps=[0, 1, 2], optimizer=opt)
    for step, (x, y) in enumerate(loader):
        with rec.step(step):
            loss = criterion(model(x), y); loss.backward(); opt.step(); opt.zero_grad()

    python -m align.compare gpu_dump npu_dump [--golden golden_dump]

A recorded step is written when it ends, to DIR/rank{N}/step{n:06d}/ (N is the
torch.distributed rank, 0 without it), through a temporary directory and a rename, so a
step on disk is complete and memory holds one step's tensors at most:

* `trace/` (an align trace, align.trace): every module call's inputs, outputs and the
  gradients it sends back (align.capture's hooks); the parameter gradients the optimizer
  received (after GradScaler's unscaling and any clipping: an optimizer step pre-hook
  takes them before `zero_grad` can clear them; without `optimizer=`, or on a step the
  scaler skipped, the gradients backward accumulated; a step where an optimizer given
  without a scaler does not step records none); the
  step's discrete choices (align.decisions). Gradients are divided by the scaler's
  scale, so a run that scales its loss compares with one that does not (the golden).
* `state.safetensors` and `step.json`: the loss, the parameters and floating buffers
  after the step, the optimizer's state (momentum buffers, exp_avg, exp_avg_sq, step
  counts) and hyperparameters by param group and parameter name, and the scaler's scale
  and whether it skipped the optimizer step (`scaler=`).

The loss is what `rec.loss(loss)` was given in the step; without that call, the tensor
`.backward()` was last called on (divided by the scaler's scale, so
`scaler.scale(loss).backward()` records `loss`). Steps not in `steps` run with nothing
installed. Under torch.distributed, construct the recorder after
`init_process_group`: each rank writes its own directory and ranks are compared one to
one.

Discrete decisions: `replay=REFERENCE_DIR` makes a run take the reference dump's
decisions (indices, piecewise branches, random draws from the default generator: see
align.decisions) of the same rank and step, as target and golden runs should. Steps not
recorded make their own, so the runs must otherwise see the same thing: seed the script
and feed the same batches in the same order.

Golden: `golden=True` on a CPU run of the same script (same seed, same batches, same
steps) makes it the float64 golden: the recorder casts the model to float64, casts the
model's floating inputs to float64 and keeps float64 where the script asks for a lower
float dtype (align.capture.KeepFloat64); autocast leaves float64 alone, so an AMP
script runs unchanged. Run it without loss scaling. Then every tensor
of the target is judged by its error against the golden relative to the reference's
(align.verdict); without a golden the reference stands in and only dtype floors remain.

Comparison (`compare`, reached through align.compare and python -m align.compare):
steps in order, and within a step, across ranks, in the order they happen: the model's
inputs (the data), module outputs, the loss and buffers, gradients and parameter
gradients (align.comparison.compare_traces), the scaler, the optimizer's state, the
parameters after the update. The report's first divergence is the first failing tensor
of the first failing step; its `train` entry has one line per step and rank.

Isolation (re-running one module on the reference's recorded inputs, align.isolation) is
possible from these dumps only together with the model: a dump holds each call's tensor
inputs and output gradients, but not its non-tensor arguments nor the module's code.
The module's weights at step n are the parameters and buffers recorded after step n-1,
so isolating step n needs step n-1 recorded too (or n = 0 and the initial weights). It
is not implemented from dumps: align.check isolates on models it runs itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from align import decisions, environment
from align.capture import KeepFloat64
from align.capture import Recorder as ModuleHooks
from align.comparison import _param_name, compare_traces
from align.decisions import Decisions
from align.errors import AlignError, MismatchError, TraceError
from align.result import Report, write_json_atomic
from align.trace import BACKWARD_SLOTS, Trace, load_trace, replace_dir
from align.verdict import Row, Tolerance, judge

FORMAT = "align.loop/1"
RUN_FILE = "loop.json"  # per rank: what was recorded, where
STEP_FILE = "step.json"  # per step: scalars and the index of state.safetensors
STATE_FILE = "state.safetensors"
TRACE_DIR = "trace"
_RANK_DIR = re.compile(r"^rank(\d+)$")
_STEP_DIR = re.compile(r"^step(\d{6})$")
# param group entries that choose an implementation, not the arithmetic
IMPLEMENTATION = {"foreach", "fused", "capturable", "differentiable"}
# Within a step, rows are ordered across ranks by when their tensors are made.
ORDER = {
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


def _step_dir(n: int) -> str:
    return f"step{n:06d}"


def _rank() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, (0, 1) without it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _BackwardRoots(TorchFunctionMode):
    """Remembers the tensor `.backward()` / `torch.autograd.backward` was last called on."""

    def __init__(self) -> None:
        super().__init__()
        self.root: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            first = args[0] if args else (kwargs or {}).get("tensors")
            if isinstance(first, (list, tuple)) and len(first) == 1:
                first = first[0]
            if isinstance(first, torch.Tensor):
                self.root = first.detach()
        return func(*args, **(kwargs or {}))


class Recorder:
    """Records the chosen steps of the user's own training loop; see the module docstring.

    Args:
        model: the model the loop trains (DDP-wrapped or not, as long as every device's
            script wraps it the same way).
        out: dump directory; this rank writes DIR/rank{N}/.
        steps: the step numbers (as passed to `step()`) to record.
        optimizer: records the gradients it receives and its state after each step.
        scaler: a torch.amp.GradScaler: records its scale and skipped steps, and divides
            recorded gradients by the scale.
        replay: a reference dump whose discrete choices this run takes, step by step.
        golden: this is the float64 golden run (CPU): casts the model and its inputs.

    Example:
        rec = align.Recorder(model, "gpu_dump", steps=[0, 1, 2], optimizer=opt)
        for step, (x, y) in enumerate(loader):
            with rec.step(step):
                loss = rec.loss(criterion(model(x), y)); loss.backward(); opt.step()
                opt.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        out: str | os.PathLike,
        steps: Iterable[int],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None,
        replay: str | os.PathLike | None = None,
        golden: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise AlignError(f"Recorder needs the nn.Module being trained, not {type(model)}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise AlignError(f"optimizer= must be a torch.optim.Optimizer, not {type(optimizer)}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise AlignError(f"scaler= must be a torch.amp.GradScaler, not {type(scaler)}")
        self.steps = _step_numbers(steps)
        self.model, self.optimizer, self.scaler, self.golden = model, optimizer, scaler, golden
        self.rank, self.world = _rank()
        self.root = Path(out) / f"rank{self.rank}"
        self.replay = None if replay is None else _rank_root(Path(replay), self.rank)
        if golden:
            _make_golden(model, optimizer, scaler)
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._given_loss: torch.Tensor | None = None
        self._recording = False
        self._start()

    def _start(self) -> None:
        """Claim this rank's directory: refuse a foreign one, drop a previous recording's steps."""
        if self.root.exists():
            if not self.root.is_dir() or (
                any(self.root.iterdir()) and not (self.root / RUN_FILE).is_file()
            ):
                raise AlignError(
                    f"{self.root}: exists and is not an align loop dump (no {RUN_FILE}); "
                    "give Recorder a new or empty directory"
                )
            for old in self.root.iterdir():
                if _STEP_DIR.match(old.name):
                    shutil.rmtree(old)
        device = self._device()
        write_json_atomic(
            self.root / RUN_FILE,
            {
                "format": FORMAT,
                "rank": self.rank,
                "world_size": self.world,
                "steps": sorted(self.steps),
                "model": type(self.model).__name__,
                "device": device,
                "golden": self.golden,
                "optimizer": None if self.optimizer is None else type(self.optimizer).__name__,
                "scaler": self.scaler is not None and self.scaler.is_enabled(),
                "replay": None if self.replay is None else str(self.replay),
                "environment": environment.record({"run": device}),
            },
        )

    @contextlib.contextmanager
    def step(self, n: int) -> Iterator[None]:
        """Context of one training step: records it if `n` is one of `steps`."""
        if n not in self.steps:
            with KeepFloat64() if self.golden else contextlib.nullcontext():
                yield
            return
        if self._recording:
            raise AlignError(f"rec.step({n}) entered inside another recorded step")
        self._recording = True
        try:
            yield from self._record(n)
        finally:
            self._recording = False
            self._given_loss = None

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Mark `loss` (unscaled) as this step's loss, else the tensor backward ran on is."""
        if self._recording:
            self._given_loss = loss.detach()
        return loss

    def _record(self, n: int) -> Iterator[None]:
        started = time.perf_counter()
        scale = self._scale()
        hooks = ModuleHooks(self.model, backward=True)
        accumulated: dict[str, str] = {}  # scaled, as backward left them
        received: dict[str, str] = {}  # as the optimizer received them
        stepped: list[bool] = []

        def take_accumulated(name: str, p: torch.Tensor) -> None:
            accumulated[name] = hooks.store(p.grad)

        def take_received(optimizer, args, kwargs) -> None:
            stepped.append(True)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        received[self._name(p)] = hooks.store(p.grad)

        choices = Decisions(self._replayed(n))
        roots = _BackwardRoots()
        with contextlib.ExitStack() as stack:
            stack.callback(hooks.release)
            stack.callback(hooks.remove)
            # Where the optimizer may not step (no optimizer, or a scaler that can skip),
            # the gradients backward accumulated are taken too.
            backward_grads = self.optimizer is None or scale != 1.0
            for name, p in self.model.named_parameters() if backward_grads else ():
                if p.requires_grad:
                    hook = p.register_post_accumulate_grad_hook(partial(take_accumulated, name))
                    stack.callback(hook.remove)
            if self.optimizer is not None:
                stack.callback(self.optimizer.register_step_pre_hook(take_received).remove)
            if self.golden:
                stack.enter_context(KeepFloat64())
            stack.enter_context(choices)
            stack.enter_context(roots)
            yield
        trace = hooks.trace
        if scale != 1.0:
            _unscale(trace, scale, accumulated.values())
        trace.param_grads = {**accumulated, **received}
        trace.decisions = choices.choices
        trace.meta = {
            "device": self._device(),
            "decisions": "replayed" if self.replay is not None else "own",
            "decisions_differed": choices.summary(),
            "model": type(self.model).__name__,
            "backward": True,
        }
        state = self._state()
        loss = self._given_loss if self._given_loss is not None else roots.root
        if loss is not None and self._given_loss is None:
            loss = loss / scale
        if loss is not None:
            state["loss"] = loss.detach().reshape(()).cpu().clone()
        info = {
            "format": FORMAT,
            "step": n,
            "rank": self.rank,
            "groups": self._groups(),
            "scaler": self._scaler_info(scale, bool(stepped)),
            "output_dtypes": sorted(
                {str(trace.tensors[k].dtype) for c in trace.calls for k in c.outputs if k}
            ),
            "seconds": time.perf_counter() - started,
        }
        replace_dir(
            self.root / _step_dir(n), partial(_write_step, trace, state, info), STEP_FILE, "step"
        )

    def _device(self) -> str:
        return str(next((p.device for p in self.model.parameters()), torch.device("cpu")))

    def _name(self, p: torch.Tensor) -> str:
        return self._names.get(id(p)) or f"<unnamed {tuple(p.shape)}>"

    def _scale(self) -> float:
        if self.scaler is None or not self.scaler.is_enabled():
            return 1.0
        return float(self.scaler.get_scale())

    def _scaler_info(self, scale: float, stepped: bool) -> dict[str, Any] | None:
        if self.scaler is None or not self.scaler.is_enabled():
            return None
        return {"scale": scale, "next_scale": self._scale(), "skipped": not stepped}

    def _replayed(self, n: int) -> decisions.Choices | None:
        if self.replay is None:
            return None
        path = self.replay / _step_dir(n) / TRACE_DIR
        if not path.is_dir():
            raise TraceError(
                f"{self.replay}: the reference dump has no step {n}: record the same steps "
                "on the reference as on this run"
            )
        return load_trace(path).decisions

    def _groups(self) -> list[dict[str, Any]]:
        """Each param group's hyperparameters and its parameters' names, in order."""
        if self.optimizer is None:
            return []
        return [
            {
                "hyper": {k: _jsonable(v) for k, v in g.items() if k != "params"},
                "params": [self._name(p) for p in g["params"]],
            }
            for g in self.optimizer.param_groups
        ]

    def _state(self) -> dict[str, torch.Tensor]:
        """Parameters and floating buffers after the step, and the optimizer's state."""
        state = {f"param/{n}": p.detach() for n, p in self.model.named_parameters()}
        state.update(
            {f"buffer/{n}": b for n, b in self.model.named_buffers() if b.is_floating_point()}
        )
        for g, group in enumerate(self.optimizer.param_groups if self.optimizer else []):
            for p in group["params"]:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if isinstance(value, (int, float)) or isinstance(value, torch.Tensor):
                        state[f"optim/{g}/{self._name(p)}/{key}"] = torch.as_tensor(value)
        return _unshared({k: v.detach().cpu().contiguous() for k, v in state.items()})


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with a copy of each tensor whose storage another one already uses
    (safetensors refuses shared storage). No other copy: the step is written at once."""
    seen: set[int] = set()
    out = {}
    for key, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def _step_numbers(steps: Any) -> frozenset[int]:
    try:
        numbers = frozenset(steps)
    except TypeError:
        numbers = None
    if not numbers or not all(isinstance(n, int) and n >= 0 for n in numbers):
        raise AlignError(f"steps= must list step numbers >= 0 to record, e.g. [0, 1, 2]: {steps!r}")
    return numbers


def _make_golden(model: nn.Module, optimizer: torch.optim.Optimizer | None, scaler: Any) -> None:
    """Turn this run into the float64 golden: model in float64, floating inputs cast."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise AlignError("golden=True is the float64 CPU run: keep the model on the CPU")
    if optimizer is not None and optimizer.state:
        raise AlignError("golden=True: construct the Recorder before the first optimizer step")
    if scaler is not None and scaler.is_enabled():
        raise AlignError(
            "golden=True: run the golden without loss scaling (GradScaler(enabled=False)); "
            "recorded gradients are unscaled on every side"
        )
    model.double()  # in place: the optimizer keeps the same parameter objects
    model.register_forward_pre_hook(_inputs_to_float64, with_kwargs=True)


def _inputs_to_float64(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cast(t: Any) -> Any:
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return tree_map(cast, (args, kwargs))


def _unscale(trace: Trace, scale: float, more: Iterable[str]) -> None:
    """Divide the recorded module gradients (and `more` keys) by the loss scale they had."""
    keys = {k for c in trace.calls for slot in BACKWARD_SLOTS for k in getattr(c, slot) if k}
    for key in keys | set(more):
        trace.tensors[key] = trace.tensors[key] / scale


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def _write_step(trace: Trace, state: dict[str, torch.Tensor], info: dict, directory: Path) -> None:
    trace.save(directory / TRACE_DIR)
    save_file(state, str(directory / STATE_FILE))
    info["state"] = {k: {"shape": list(t.shape), "dtype": str(t.dtype)} for k, t in state.items()}
    (directory / STEP_FILE).write_text(json.dumps(info, indent=1, default=str))


# ----------------------------------------------------------------------------- reading


def is_dump(path: Any) -> bool:
    """True for a directory written by `Recorder` (it has rank0/loop.json)."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / "rank0" / RUN_FILE).is_file()


def _rank_root(root: Path, rank: int) -> Path:
    path = root / f"rank{rank}"
    if not (path / RUN_FILE).is_file():
        raise TraceError(
            f"{root}: no rank{rank}/{RUN_FILE}; expected a dump written by align.Recorder "
            "with the same number of ranks"
        )
    return path


@dataclass
class Step:
    """One recorded step of one rank: its module trace, state tensors and scalars."""

    number: int
    rank: int
    trace: Trace
    state: dict[str, torch.Tensor]
    info: dict[str, Any]


class LoopDump:
    """A Recorder's dump directory: ranks and their recorded steps."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise TraceError(f"{self.root}: no such dump directory")
        self.ranks: dict[int, dict[str, Any]] = {}
        for d in sorted(self.root.iterdir()):
            m = _RANK_DIR.match(d.name)
            if m and d.is_dir():
                self.ranks[int(m[1])] = _read_json(_rank_root(self.root, int(m[1])) / RUN_FILE)
        if not self.ranks:
            raise TraceError(f"{self.root}: no rank*/ directories: not an align.Recorder dump")

    def steps(self, rank: int) -> list[int]:
        """Step numbers recorded (completely: temporary directories are skipped) by `rank`."""
        d = self.root / f"rank{rank}"
        return sorted(int(m[1]) for p in d.iterdir() if (m := _STEP_DIR.match(p.name)))

    def load(self, rank: int, n: int) -> Step:
        """Read step `n` of `rank`; a truncated or corrupt record is a TraceError."""
        d = self.root / f"rank{rank}" / _step_dir(n)
        info = _read_json(d / STEP_FILE)
        index = info.get("state")
        if not isinstance(index, dict):
            raise TraceError(f"{d / STEP_FILE}: no 'state' index: the step record is corrupt")
        return Step(n, rank, load_trace(d / TRACE_DIR), _read_state(d / STATE_FILE, index), info)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(
            f"{path}: missing or not valid JSON ({exc}); the dump is incomplete or corrupt: "
            "record it again"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TraceError(f"{path}: not an {FORMAT} record")
    return data


def _read_state(path: Path, index: dict[str, Any]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {key: f.get_tensor(key) for key in index}
    except Exception as exc:  # safetensors raises its own error types
        raise TraceError(
            f"{path}: not readable ({exc}); the step record is truncated or corrupt: record "
            "it again"
        ) from exc
    for key, t in state.items():
        entry = index[key]
        if not isinstance(entry, dict) or [list(t.shape), str(t.dtype)] != [
            entry.get("shape"),
            entry.get("dtype"),
        ]:
            raise TraceError(f"{path}: {key} is not what {STEP_FILE} says: the record is corrupt")
    return state


# -------------------------------------------------------------------------- comparing


def compare(
    reference: str | os.PathLike,
    target: str | os.PathLike,
    golden: str | os.PathLike | None = None,
    *,
    tolerance: Tolerance | dict | None = None,
    name_map: dict[str, str | None] | None = None,
) -> Report:
    """Judge a target loop dump against a reference (and a float64 golden) step by step."""
    from align.api import _tolerance
    from align.precision import get_policy

    started = time.perf_counter()
    ref, tgt = LoopDump(reference), LoopDump(target)
    gold = None if golden is None else LoopDump(golden)
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
    tol = _tolerance(tolerance, policy)
    strict = policy.name == "fp32"
    notes: list[str] = []
    rows: list[Row] = []
    table: list[dict[str, Any]] = []
    for n in steps:
        ordered = []
        for rank in ranks:
            sides = [ref.load(rank, n), tgt.load(rank, n)]
            if gold is not None:
                if n not in gold.steps(rank):
                    raise MismatchError(
                        f"the golden dump has no step {n} of rank {rank}: record the same steps"
                    )
                sides.append(gold.load(rank, n))
            step_rows = _judge_step(*sides, tol=tol, strict=strict, name_map=name_map or {})
            label = f"rank {rank} step {n}" if len(ranks) > 1 else f"step {n}"
            for row in step_rows:
                row.tensor = f"{label} {row.tensor}"
            ordered += [(ORDER.get(r.phase, 1), rank, i, r) for i, r in enumerate(step_rows)]
            table.append(_step_entry(n, rank, sides, step_rows))
            notes += _step_notes(*sides)
        rows += [r for *_, r in sorted(ordered, key=lambda x: x[:3])]
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
    skipped = sorted(set(ref.steps(ranks[0])) ^ set(tgt.steps(ranks[0])))
    if skipped:
        notes.append(f"steps {skipped} were recorded on one side only and not judged")
    if gold is None:
        notes.append(
            "no golden dump: the reference stood in for it, so limits are dtype floors only; "
            "record a float64 golden (Recorder(..., golden=True) on a CPU run of the script)"
        )
    else:
        notes.append(
            "the reference's error is a single draw (a training loop's dump has no honest "
            "draws): a small or cancelling gradient can flag an honest target"
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
) -> list[Row]:
    """Rows of one step of one rank: data, module tensors, loss, scaler, optimizer, params."""
    g = gold or ref
    rows = _input_rows(ref.trace, tgt.trace, g.trace, tol, strict)
    rows += compare_traces(
        ref.trace,
        tgt.trace,
        None if gold is None else gold.trace,
        tol=tol,
        strict_dtype=strict,
        name_map=name_map,
    )
    judged = partial(_state_row, ref, tgt, g, tol, strict)
    if "loss" in ref.state:
        rows.append(judged("", "loss", "loss", "loss", "loss"))
    rows += _scaler_rows(ref.info.get("scaler"), tgt.info.get("scaler"))
    for gi, group in enumerate(ref.info.get("groups", [])):
        for name in group["params"]:
            tname = _param_name(name, name_map)
            if tname is None:
                continue
            prefix = f"optim/{gi}/{name}/"
            for key in sorted(k for k in ref.state if k.startswith(prefix)):
                leaf = key[len(prefix) :]
                label = f"group {gi} {name} {leaf}"
                tkey = f"optim/{gi}/{tname}/{leaf}"
                if leaf == "step":
                    rows.append(_exact_row(_owner(name), "optimizer", label, ref, tgt, key, tkey))
                else:
                    rows.append(judged(_owner(name), "optimizer", label, key, tkey))
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
    ref: Step, tgt: Step, gold: Step, tol, strict, module: str, phase: str, label, key, tkey
) -> Row:
    row = Row(module, 0, phase, label, "", [])
    if tkey not in tgt.state:
        row.failed.append("missing")
        row.message = f"{key} is recorded on the reference, not on the target"
        return row
    if key not in gold.state:
        raise MismatchError(f"the golden dump has no {key}: record it with the same optimizer")
    return _judged(ref.state[key], tgt.state[tkey], gold.state[key], tol, strict, row)


def _judged(r: torch.Tensor, t: torch.Tensor, g: torch.Tensor, tol, strict, row: Row) -> Row:
    if t.shape != r.shape or g.shape != r.shape:
        raise MismatchError(
            f"{row.module or '<model>'} {row.phase} {row.tensor}: shape {tuple(r.shape)} on the "
            f"reference, {tuple(t.shape)} on the target, {tuple(g.shape)} in the golden run; "
            "the runs did not train the same model on the same batches"
        )
    return judge(t, r, g, tol, strict_dtype=strict, local=False, row=row)


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
                "it with Recorder(..., replay=REFERENCE_DIR) (align.decisions)"
            )
        elif side.trace.meta.get("decisions_differed"):
            notes.append(decisions.note(role, side.trace.meta["decisions_differed"]))
    return notes
