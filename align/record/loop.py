"""Align inside the user's own training loop: record chosen steps on each device
(align.judge.steps judges them step by step).

    rec = align.Recorder(model, "npu_dump", steps=[0, 1, 2], optimizer=opt)
    for step, (x, y) in enumerate(loader):
        with rec.step(step):
            loss = criterion(model(x), y); loss.backward(); opt.step(); opt.zero_grad()

    python -m align.compare gpu_dump npu_dump [--golden golden_dump]

A recorded step is written to DIR/rank{N}/step{n:06d}/ (N is the torch.distributed rank, 0
without it; the layout and its reader: align.record.loop_dump), through a temporary
directory and a rename, so a step on disk is complete (a killed process leaves only hidden
temporary directories). It streams (align.record.writer): its tensors are private copies
in host memory, gathered into shards of STREAM_SHARD_BYTES that a background thread writes
while the step goes on; the rest is written once it ends. A device's tensors are copied to
host memory on the device's stream, none kept on the device, and streamed after one
synchronization at the step's end. Memory holds the step being recorded and what is left
to write of the one before (`steps_in_memory=1`: one step, the next waits at its start for
it to be on disk), the last recorded step returns once every step is on disk, and a failed
write is raised at the next `rec.step()`. The dump is complete after the last recorded
step, `rec.close()` (or the end of `with align.Recorder(...) as rec:`), or `rec.flush()`.
What a step holds:

* `trace/` (an align trace, align.record.trace): every module call's inputs, outputs and the
  gradients it sends back (align.capture's hooks); the parameter gradients the optimizer
  received (after GradScaler's unscaling and any clipping: an optimizer step pre-hook
  takes them before `zero_grad` can clear them; without `optimizer=`, or on a step the
  scaler skipped, the gradients backward accumulated; a step where an optimizer given
  without a scaler does not step records none), and the gradients one backward wrote into
  an empty `.grad`, as it wrote them, before any clipping, unscaling or all-reduce
  (align.record.backward_grads: a module's call alone reproduces them; one copy where the
  optimizer receives them unchanged); the
  step's discrete choices (align.numerics.decisions). Gradients are divided by the scaler's
  scale, so a run that scales its loss compares with one that does not (the golden);
  fp16 ones in float32, whose range holds them (precision.unscaled_dtype).
* `state.safetensors` and `step.json`: the loss, the parameters and floating buffers
  after the step, the optimizer's state (momentum buffers, exp_avg, exp_avg_sq, step
  counts) and hyperparameters by param group and parameter name, and the scaler's scale
  and whether it skipped the optimizer step (`scaler=`). A script with several optimizers
  (a GAN's generator and critic) gives them as a list: their param groups are numbered
  across them in that order, and a step counts as skipped when none of them stepped.

The loss is what `rec.loss(loss)` was given in the step; without that call, the tensor
`.backward()` was last called on (divided by the scaler's scale, so
`scaler.scale(loss).backward()` records `loss`). Steps not in `steps` run with nothing
installed. Under torch.distributed, construct the recorder after
`init_process_group`: each rank writes its own directory and ranks are compared one to
one.

Discrete decisions: `replay=REFERENCE_DIR` makes a run take the reference dump's
decisions (indices, piecewise branches, random draws from the default generator: see
align.numerics.decisions) of the same rank and step, as target and golden runs should. Steps not
recorded make their own, so the runs must otherwise see the same thing: seed the script
and feed the same batches in the same order. A torch.optim optimizer's step is outside
(it decides and draws nothing); a user's own optimizer class is inside, its draws replayed.

Golden: `golden=True` on a CPU run of the same script (same seed, same batches, same
steps) makes it the float64 golden: the recorder casts the model to float64, casts the
floating inputs of every module call (the model's, or a submodule's the script calls) to
float64 and keeps float64 where the script asks for a lower float dtype
(align.record.capture.KeepFloat64); autocast leaves float64 alone, so an AMP script runs
unchanged. Run it without loss scaling: it skips the optimizer steps the
reference's scaler skipped, as the draws do (`Recorder._skips`). Then every tensor
of the target is judged by its error against the golden relative to the reference's
(align.numerics.verdict); without a golden the reference stands in and only dtype floors remain.

Comparison (align.judge.steps `compare`, reached through align.compare and python -m
align.compare):
steps in order, and within a step, across ranks, in the order they happen: the model's
inputs (the data), module outputs, the loss and buffers, gradients and parameter
gradients (align.judge.comparison.compare_traces), the scaler, the optimizer's state, the
parameters after the update. The report's first divergence is the first failing tensor
of the first failing step; its `train` entry has one line per step and rank.

Honest draws: the reference's own error against the golden is one sample of its
rounding noise. Run the reference script again with `ALIGN_DRAW=1` (then 2, ...) in its
environment, or `draw=1`: that run replays the reference dump's decisions, nudges every
rounding of its recorded steps at random (align.numerics.jitter, as another honest device
would round; after unrecorded steps it takes the reference's state) and writes
DIR/draws/1/. Odd draws also run the model in the other memory format
(capture.other_layout: channels_last for a contiguous model with 4-d weights; its 4-d
inputs follow), whose kernels sum in another order, as capture.honest_draw does (a model
that cannot run so, raising, is told to draw with even numbers; align.check's own draws
fall back to the model's layout: capture.in_draw_layout). The
comparison then scales each tensor's limit by the largest error of the reference and its
draws (as `align.dump --draws` does for case dumps).

Isolation: `align.compare(ref, tgt, golden, model=model)` (`align compare ... --model
train:build_model`) re-runs each module call of the first failing step (else of the
first step) alone, in float64, from each side's own record (align.judge.step_isolation),
and names the modules wrong given their own inputs. A step holds what that needs besides
the modules' code: each call's tensors, its other arguments and mode
(align.record.arguments; a call with an argument JSON cannot hold, a dtype or a user's
object, is not re-run, and the report counts it), the owners of its random draws, and
the weights the step started from: the parameters recorded after step n-1, or, where
step n-1 is not recorded, the parameters, floating buffers and optimizer state before step
n (state keys `before/param/...`, `before/optim/...`, judged as the step's "weights" rows:
a checkpoint that loads differently fails there).

Start state: steps not recorded are not replayed, and honest runs part there (a discrete
choice flipped; AdamW's first update steep where a gradient is near eps). So after
unrecorded steps a replaying run (target, golden, draw) takes the reference's `before/`
state at its first recorded step (`Recorder._adopt`) and keeps its own under `carried/`:
the comparison notes how far out of line that was, not judged, and judges the recorded
steps from one start (record a run's first step to judge how it starts).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from functools import partial, wraps
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from align.errors import AlignError, TraceError
from align.files import read_json, write_json_atomic
from align.numerics import decisions
from align.numerics.decisions import Decisions, choice_gaps_record
from align.numerics.jitter import Jitter
from align.numerics.precision import unscaled_dtype
from align.numerics.trees import map_leaves
from align.record.arguments import spec_to_json
from align.record.backward_grads import BackwardGrads
from align.record.buffers import HostBuffers
from align.record.capture import KeepFloat64, inputs_laid_out, lay_out_weights, other_layout
from align.record.capture import Recorder as ModuleHooks
from align.record.loop_dump import (
    BEFORE,
    CARRIED,
    DRAW_ENV,
    DRAWS_DIR,
    FORMAT,
    RUN_FILE,
    STATE_FILE,
    STEP_DIR,
    STEP_FILE,
    TRACE_DIR,
    rank_root,
    start_state,
    step_dir,
)
from align.record.trace import Trace, read_trace
from align.record.writer import StepFiles, StepWriter, wait_for_writes
from align.runtime import environment
from align.runtime.devices import on_host, synchronize
from align.runtime.wrappers import wrapped


def _rank() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, (0, 1) without it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _BackwardRoots:
    """Remembers the tensor backward was last called on in this thread, while entered.

    `torch.autograd.backward` (which `Tensor.backward` calls) is wrapped once, while any
    thread has one entered, and tells the innermost one of the calling thread. A function
    mode would see the call too, but taxes every torch call of the step (measured: 0.2x of
    a ResNet-18 step at batch 4, 64 px).
    """

    _lock = threading.Lock()
    _entered = 0  # in every thread: the wrapper is installed while this is above 0
    _original: Any = None
    _local = threading.local()  # .stack: this thread's entered instances

    def __init__(self) -> None:
        self.root: torch.Tensor | None = None

    def __enter__(self) -> _BackwardRoots:
        cls = type(self)
        with cls._lock:
            if cls._entered == 0:
                original = cls._original = torch.autograd.backward

                @wraps(original)
                def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
                    cls._remember(tensors)
                    return original(tensors, *args, **kwargs)

                torch.autograd.backward = backward
            cls._entered += 1
        cls._local.__dict__.setdefault("stack", []).append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        cls = type(self)
        cls._local.stack.remove(self)
        with cls._lock:
            cls._entered -= 1
            if cls._entered == 0:
                torch.autograd.backward = cls._original

    @classmethod
    def _remember(cls, tensors: Any) -> None:
        """Tell this thread's innermost entered instance the root backward runs from; not
        a backward called inside one (a reentrant checkpoint's, on its recomputed outputs)."""
        if torch._C._current_graph_task_id() != -1:
            return
        stack = getattr(cls._local, "stack", None)
        if isinstance(tensors, (list, tuple)) and len(tensors) == 1:
            tensors = tensors[0]
        if stack and isinstance(tensors, torch.Tensor):
            stack[-1].root = tensors.detach()


class Recorder:
    """Records the chosen steps of the user's own training loop; see the module docstring.

    Args:
        model: the model the loop trains, as it is or wrapped by torch.compile,
            DistributedDataParallel or DataParallel: it is recorded by the names of the
            model inside (`unwrapped`), so a compiled or DDP run compares with an eager
            one, and `align.compare --model` takes the model as the script builds it. A
            compiled model runs eagerly in the steps recorded (hooks and dispatch modes
            need eager ops; measured: its outputs are the eager model's bit for bit), so
            the compiled kernels are not what is judged: the comparison says so.
        out: dump directory; this rank writes DIR/rank{N}/.
        steps: the step numbers (as passed to `step()`) to record.
        optimizer: records the gradients it receives and its state after each step; a
            list of them for a script with several (a GAN's generator and critic): their
            param groups are numbered across them, in the order given.
        scaler: a torch.amp.GradScaler: records its scale and skipped steps, and divides
            recorded gradients by the scale.
        replay: a reference dump whose discrete choices this run takes, step by step.
        golden: this is the float64 golden run (CPU): casts the model and its inputs.
        draw: this run of the reference script is its honest draw `draw` (default: the
            ALIGN_DRAW environment variable): it writes OUT/draws/{draw}/, replays OUT's
            decisions, and runs every recorded step with its rounding nudged
            (align.numerics.jitter).
        background: write each step on a background thread, its shards while it runs;
            False writes each shard in the loop as it fills and the rest before
            `rec.step()` returns: the same files either way. Under torch.distributed
            too: two gloo ranks with DDP, recording 3 steps, exited cleanly in 40 of 40
            runs with the thread and 40 of 40 without it (torch 2.14). An abort seen once
            before, in 1 of 40 runs with it ("terminate called without an active
            exception"), came in C++ teardown after every step was written and the
            thread joined: nothing of the writer runs then.
        steps_in_memory: recorded steps in host memory at once. 2 (the default): a
            recorded step starts at once while the writer finishes the one before (its
            last shard and the state after it); 1: it waits at its start until that one
            is on disk, a strict bound of one step. ResNet-18, batch 16, 128 px, 4
            steps in a row: 2 takes 1.25x the memory of recording one step and 1.26x
            the bare step each; 1 takes 1.12x the memory and 1.36x the step
            (bench/bench_loop.py --steps-in-memory N).

    The dump is complete once the last recorded step returns; `close()` (or leaving
    `with align.Recorder(...) as rec:`) and `flush()` complete it sooner, for a loop that
    stops early, and so does the interpreter's exit. A failed write raises an AlignError
    naming the step and directory at the next `rec.step()`, `flush()` or `close()`.

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
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        replay: str | os.PathLike | None = None,
        golden: bool = False,
        draw: int | None = None,
        background: bool = True,
        steps_in_memory: int = 2,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise AlignError(f"Recorder needs the nn.Module being trained, not {type(model)}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise AlignError(f"scaler= must be a torch.amp.GradScaler, not {type(scaler)}")
        self.steps = _step_numbers(steps)
        self.draw = _draw_number(draw)
        if self.draw is not None:
            if replay is not None or golden:
                raise AlignError(
                    f"draw={self.draw} (or {DRAW_ENV}) re-runs the reference script as an "
                    "honest draw: give it the reference's out=, without replay= or golden="
                )
            replay, out = out, Path(out) / DRAWS_DIR / str(self.draw)
        self._last = max(self.steps)
        model, self.compiled = wrapped(model)
        self.optimizers = _optimizers(optimizer)
        self.model, self.scaler, self.golden = model, scaler, golden
        self.rank, self.world = _rank()
        self.root = Path(out) / f"rank{self.rank}"
        self.replay = None if replay is None else rank_root(Path(replay), self.rank)
        if golden:
            _make_golden(model, self.optimizers, scaler)
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._given_loss: torch.Tensor | None = None
        self._recording = False
        self._unrecorded = 0  # steps run since the last recorded one (or the start)
        if type(steps_in_memory) is not int or steps_in_memory < 1:
            raise AlignError(f"steps_in_memory= must be 1 or more, not {steps_in_memory!r}")
        self._writer = StepWriter(self.root, background, steps_in_memory)
        self._buffers = HostBuffers()
        # a step's copies from a device, queued: (key, host buffer, loss scale to divide by),
        # and the devices they were queued on
        self._queued: list[tuple[str, torch.Tensor, float]] = []
        self._queued_on: set[torch.device] = set()
        self.memory_format = None
        if self.draw is not None and self.draw % 2:
            self.memory_format = other_layout(model)
        self._start()
        self._layout = _LaidOut(model, self.memory_format)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def flush(self) -> None:
        """Wait until every recorded step is on disk; raise a failed write's error."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and stop the writer thread; free the host memory kept for recording."""
        try:
            self._writer.close()
        finally:
            self._buffers.clear()
            self._layout.undo()

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
                if STEP_DIR.match(old.name):
                    shutil.rmtree(old)
        if self.draw is None:  # a new reference: the draws of the previous one are stale
            for old in (self.root.parent / DRAWS_DIR).glob(f"*/{self.root.name}"):
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
                "draw": self.draw,
                "memory_format": None
                if self.memory_format is None
                else str(self.memory_format).split(".")[-1],
                "optimizers": [type(o).__name__ for o in self.optimizers],
                "compiled": self.compiled,
                "scaler": self.scaler is not None and self.scaler.is_enabled(),
                "replay": None if self.replay is None else str(self.replay),
                "environment": environment.record({"run": device}),
            },
        )

    @contextlib.contextmanager
    def step(self, n: int) -> Iterator[None]:
        """Context of one training step: records it if `n` is one of `steps`."""
        self._writer.check()
        if n not in self.steps:
            self._unrecorded += 1
            with self._numerics(n), self._layout.said():
                yield
            return
        if self._recording:
            raise AlignError(f"rec.step({n}) entered inside another recorded step")
        self._writer.reserve()  # waits for room: steps_in_memory
        self._recording = True
        files = None
        try:
            files = self._files(n)
            with self._layout.said():
                write = yield from self._record(n, files)
        except BaseException:
            if files is None:
                self._writer.cancel(n, self.root / step_dir(n), lambda: None)
            else:
                files.abandon()
            raise
        finally:
            self._recording = False
            self._given_loss = None
            self._queued.clear()
            self._queued_on.clear()
        files.finish(write)
        if n == self._last:
            self.close()

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Mark `loss` (unscaled) as this step's loss, else the tensor backward ran on is."""
        if self._recording:
            self._given_loss = loss.detach()
        return loss

    def _files(self, n: int) -> StepFiles:
        """Step n's directory while it is recorded (its tensors stream there)."""
        self._buffers.next_step()
        return StepFiles(
            self.root / step_dir(n),
            n,
            self._writer,
            self._buffers,
            marker=STEP_FILE,
            trace_dir=TRACE_DIR,
        )

    def _record(self, n: int, files: StepFiles) -> Iterator[None]:
        """Record step `n` around its one `yield`, streaming its tensors to `files`; return
        what writes the rest."""
        started = time.perf_counter()
        carried, self._unrecorded = self._unrecorded, 0
        # what this step starts from, where no recorded step before it left it
        before, start = ({}, None) if n - 1 in self.steps else self._start_state(n, carried)
        scale = self._scale()
        hooks = ModuleHooks(
            self.model,
            backward=True,
            snapshot=partial(self._snapshot, files, 1.0),
            grad_snapshot=partial(self._snapshot, files, scale),  # recorded unscaled
        )
        accumulated: dict[str, str] = {}  # as backward left them (unscaled when recorded)
        # as the first gradient into a .grad that may have been empty (None or zeros) left
        # them; `backward_own` keeps those whose .grad was (`grads.own`)
        first: dict[str, str] = {}
        # gradients each parameter took while its module had been called once: one, and
        # the first is that call's alone, though micro-batches accumulate more after it
        # (two: two backwards went through the call, whose recorded output gradient is
        # the last's)
        while_once: dict[str, int] = {}
        received: dict[str, str] = {}  # as the optimizer received them
        stepped: list[bool] = []
        # Where the optimizer may not step (no optimizer, or a scaler that can skip), the
        # gradients backward accumulated are taken too.
        # A run standing for the reference (the golden, a draw) skips the optimizer step
        # where the reference's scaler did (`_skips`), and takes them too.
        skip = self._skips(n)
        backward_grads = not self.optimizers or scale != 1.0 or skip

        def take_accumulated(name: str, p: torch.Tensor) -> None:
            # the first gradient into an empty .grad is taken as it is: one call alone may
            # reproduce it however the script changes it after (clipping, unscaling, an
            # all-reduce); once accumulated again it is no one call's (grads.own)
            if hooks.calls(name.rpartition(".")[0]) == 1:
                while_once[name] = while_once.get(name, 0) + 1
            if grads.may_own(name) or backward_grads:
                key = hooks.store_grad(p.grad, fresh=name in accumulated)
                if grads.may_own(name):
                    first[name] = key
                if backward_grads:
                    accumulated[name] = key

        def take_received(optimizer, args, kwargs) -> None:
            stepped.append(True)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        name = self._name(p)
                        if name in first and scale == 1.0 and grads.unchanged(name):
                            received[name] = first[name]  # the same values: one copy
                        else:
                            received[name] = hooks.store(p.grad)

        grads = BackwardGrads(self.model, take_accumulated)
        choices = Decisions(self._replayed(n), where=hooks.current)
        roots = _BackwardRoots()
        with contextlib.ExitStack() as stack:
            stack.callback(hooks.release)
            stack.callback(hooks.remove)
            grads.install(stack)
            for optimizer in self.optimizers:
                stack.callback(optimizer.register_step_pre_hook(take_received).remove)
                if _draws_nothing(optimizer):
                    stack.enter_context(_stepping_outside(optimizer, choices))
                if skip:
                    stack.enter_context(skipping(optimizer))
            stack.enter_context(self._numerics(n))
            stack.enter_context(choices)
            stack.enter_context(roots)
            yield
        trace = hooks.trace
        trace.param_grads = {**accumulated, **received}
        # the gradients one backward wrote, as it wrote them: per call in isolation (a
        # module's first call's alone, where micro-batches accumulated more after it)
        alone = {
            n
            for n in first
            if not grads.own(n)
            and grads.empty_before(n)
            and while_once.get(n) == 1
            and hooks.calls(n.rpartition(".")[0]) > 1
        }
        backward_own = {n: k for n, k in first.items() if grads.own(n) or n in alone}
        trace.decisions, trace.faults = choices.choices, choices.faults
        trace.meta = {
            "device": self._device(),
            "decisions": "replayed" if self.replay is not None else "own",
            "decisions_differed": choices.summary(),
            "choice_gaps": choice_gaps_record(choices),
            "model": type(self.model).__name__,
            "backward": True,
            # what isolation needs to call each module again (align.judge.step_isolation)
            "calls": [spec_to_json(hooks.specs[pos]) for pos in range(len(trace.calls))],
            "decision_owners": choices.owners,
            "backward_grads": backward_own,
            "first_call_grads": sorted(alone),
            "summed_grads": _summed(hooks, grads, [n for n in backward_own if n not in alone]),
        }
        state = {**before, **self._state()}
        loss = self._given_loss if self._given_loss is not None else roots.root
        if loss is not None and self._given_loss is None:
            loss = loss / scale
        if loss is not None:
            state["loss"] = loss.reshape(()).cpu().clone()
        info = {
            "format": FORMAT,
            "step": n,
            "rank": self.rank,
            "groups": self._groups(),
            "scaler": self._scaler_info(scale, bool(stepped)),
            "start": start,
            "output_dtypes": sorted(
                {str(trace.tensors[k].dtype) for c in trace.calls for k in c.outputs if k}
            ),
            "seconds": time.perf_counter() - started,
        }
        self._to_host(trace, files)
        return partial(self._write, trace, state, info, files.shards.index)

    def _snapshot(self, files: StepFiles, scale: float, key: str, t: torch.Tensor) -> torch.Tensor:
        """Record `t` under `key`, divided by the loss `scale` it has (a gradient): a copy
        in reused host memory, streamed to the step's files at once; from a device, a copy
        queued on its stream, written once the step ends (`_to_host`): no device memory
        is held, and the loop does not wait for it. The trace keeps a stand-in (a meta
        tensor: the shape and dtype, no memory)."""
        dtype = unscaled_dtype(t.dtype, scale)
        if t.layout != torch.strided:  # a sparse gradient, recorded dense
            t = t.to_dense()
        if on_host(t):
            copy = self._buffers.copy(t, dtype=dtype)
            if scale != 1.0:
                copy.div_(scale)
            files.add(key, copy)
        else:
            self._queued.append((key, self._queue(t, dtype=dtype), scale))
        return torch.empty(t.shape, dtype=dtype, device="meta")

    def _queue(
        self,
        t: torch.Tensor,
        layout: torch.memory_format | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """A host copy of device tensor `t`, queued on its device (complete after `_to_host`)."""
        self._queued_on.add(t.device)
        return self._buffers.copy(t, layout, queued=True, dtype=dtype)

    def _to_host(self, trace: Trace, files: StepFiles) -> None:
        """Wait for the copies the step queued (one synchronization per device, in the
        loop's thread), then stream them to the step's files."""
        for device in self._queued_on:
            synchronize(device)
        self._queued_on.clear()
        for key, copy, scale in self._queued:
            files.add(key, copy.div_(scale) if scale != 1.0 else copy)
        self._queued.clear()
        trace.decisions = [(op, t.cpu()) for op, t in trace.decisions]

    def _write(
        self, trace: Trace, state: dict[str, torch.Tensor], info: dict, index: dict, to: Path
    ) -> None:
        """Write the rest of a step, then hand its host memory to the next recorded step."""
        _write_step(trace, state, info, to, index)
        self._buffers.give(state.values())

    def _numerics(self, n: int) -> contextlib.AbstractContextManager:
        """What step `n` of this run computes under: float64 kept (the golden), rounding
        nudged (a recorded step of a draw, seeded per draw and step: after unrecorded
        steps a draw takes the reference's state, `_start_state`, so nudging those would
        cost a jittered step each for nothing), or nothing."""
        if self.golden:
            return KeepFloat64()
        if self.draw is not None and n in self.steps:
            return Jitter(self.draw * 1_000_003 + n)
        return contextlib.nullcontext()

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

    def _skips(self, n: int) -> bool:
        """Whether this run skips step n's optimizer step: it stands for the reference (the
        golden, which runs without loss scaling, or a draw) and the reference's scaler
        skipped it (its gradients overflowed). A target keeps its own scaler's choice: the
        comparison judges whether it skipped alike."""
        stands_in = self.golden or self.draw is not None
        if self.replay is None or not self.optimizers or not stands_in:
            return False
        wait_for_writes(self.replay)
        path = self.replay / step_dir(n) / STEP_FILE
        if not path.is_file():
            return False  # (`_replayed` says the step is missing)
        info = read_json(path, what="a step record (record it again)", error=TraceError)
        return isinstance(info, dict) and bool((info.get("scaler") or {}).get("skipped"))

    def _replayed(self, n: int) -> decisions.Choices | None:
        if self.replay is None:
            return None
        wait_for_writes(self.replay)
        path = self.replay / step_dir(n) / TRACE_DIR
        if not path.is_dir():
            raise TraceError(
                f"{self.replay}: the reference dump has no step {n}: record the same steps "
                "on the reference as on this run"
            )
        return read_trace(path).decisions

    def _groups(self) -> list[dict[str, Any]]:
        """Each param group's hyperparameters and its parameters' names, in order (of the
        optimizers, then of their groups)."""
        return [
            {
                "hyper": {k: _jsonable(v) for k, v in g.items() if k != "params"},
                "params": [self._name(p) for p in g["params"]],
                "optimizer": o,
            }
            for o, _optimizer, g in self._param_groups()
        ]

    def _param_groups(self) -> list[tuple[int, torch.optim.Optimizer, dict[str, Any]]]:
        """(optimizer index, optimizer, group) of every param group, numbered across the
        optimizers in the order given: a group's position here is its number in the dump."""
        return [(o, opt, g) for o, opt in enumerate(self.optimizers) for g in opt.param_groups]

    def _state(self) -> dict[str, torch.Tensor]:
        """Private copies of the parameters and floating buffers after the step, and of
        the optimizer's state, in host memory (a device's are copied there directly) and
        each with its own storage, as safetensors wants."""
        return self._host_copies(self._live_state())

    def _live_state(self) -> dict[str, torch.Tensor]:
        """The parameters, floating buffers and optimizer state as they are now: keys
        param/NAME, buffer/NAME and optim/GROUP/NAME/KEY (a number as a tensor)."""
        state = self._weights()
        for key, _entries, _leaf, value in self._optimizer_entries():
            state[key] = torch.as_tensor(value)
        return state

    def _optimizer_entries(self) -> Iterator[tuple[str, dict, str, torch.Tensor | float]]:
        """Each tensor or number of the optimizer's state: (its key optim/GROUP/NAME/KEY,
        the parameter's state dict, KEY, the value)."""
        for g, (_o, optimizer, group) in enumerate(self._param_groups()):
            for p in group["params"]:
                entries = optimizer.state.get(p, {})
                for leaf, value in entries.items():
                    if isinstance(value, (int, float, torch.Tensor)):
                        yield f"optim/{g}/{self._name(p)}/{leaf}", entries, leaf, value

    def _start_state(self, n: int, carried: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Host copies of the state step `n` starts from (BEFORE keys), and what step.json
        says of it. After `carried` unrecorded steps, a replaying run (target, golden,
        draw) first takes the reference's (`_adopt`): steps not recorded are not replayed,
        and honest runs part there (a discrete choice flipped; AdamW's first update,
        lr * g / (|g| + eps), steep where a gradient is near eps: an honest one-ulp target's
        zero-initialized weight moved 2 lr off), so the recorded steps compare from one
        start; its own state is kept under CARRIED, reported, not judged."""
        info: dict[str, Any] = {"unrecorded_before": carried, "adopted": False}
        if self.replay is None or not carried:
            return self._host_copies(_prefixed(self._live_state(), BEFORE)), info
        own = self._host_copies(_prefixed(self._live_state(), CARRIED))
        info.update(adopted=True, not_adopted=self._adopt(n))
        return {**own, **self._host_copies(_prefixed(self._live_state(), BEFORE))}, info

    def _adopt(self, n: int) -> list[str]:
        """Take the state the reference's step `n` started from: its parameters, floating
        buffers and optimizer state, by name (cast to this run's dtypes, on its devices).
        Returns the keys it has none of, or of another shape."""
        wait_for_writes(self.replay)
        theirs = start_state(self.replay, n)
        if not theirs:
            raise TraceError(
                f"{self.replay / step_dir(n)}: the reference recorded no state at the start "
                f"of step {n}: record it again, with the same steps= as this run"
            )
        missing = []
        with torch.no_grad():
            for key, t in self._weights().items():
                if key in theirs and theirs[key].shape == t.shape:
                    t.copy_(theirs[key])
                else:
                    missing.append(key)
            for key, entries, leaf, value in list(self._optimizer_entries()):
                ref = theirs.get(key)
                if ref is None or ref.shape != torch.as_tensor(value).shape:
                    missing.append(key)
                elif isinstance(value, torch.Tensor):
                    value.copy_(ref)
                else:  # a number (a step count)
                    entries[leaf] = type(value)(ref.item())
        return missing

    def _host_copies(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host copies of `state`, from a device queued (complete after `_to_host`)."""
        layout = torch.contiguous_format
        return {
            k: self._buffers.copy(v, layout) if on_host(v) else self._queue(v, layout)
            for k, v in state.items()
        }

    def _weights(self) -> dict[str, torch.Tensor]:
        """The parameters and floating buffers as they are now, keyed param/NAME and
        buffer/NAME."""
        state = {f"param/{n}": p for n, p in self.model.named_parameters()}
        state.update(
            {f"buffer/{n}": b for n, b in self.model.named_buffers() if b.is_floating_point()}
        )
        return state


class _LaidOut:
    """`model` (an honest draw's: the reference script run again) in `memory_format`, its
    4-d inputs converted as they arrive, until `undo` (Recorder.close) lays it out as it
    was; None changes nothing."""

    def __init__(self, model: nn.Module, memory_format: torch.memory_format | None):
        self.model, self.hook, self.memory_format = model, None, memory_format
        if memory_format is not None:
            lay_out_weights(model, memory_format)
            self.hook = model.register_forward_pre_hook(
                lambda m, args, kwargs: inputs_laid_out((args, kwargs), memory_format),
                with_kwargs=True,
            )

    @contextlib.contextmanager
    def said(self) -> Iterator[None]:
        """What the model raises, with a note that it runs laid out otherwise: a model may
        view a 4-d weight or input in a way only its own layout allows."""
        try:
            yield
        except RuntimeError as exc:  # (what a view or a kernel raises on another layout)
            if self.hook is not None:
                exc.add_note(
                    "align: this honest draw runs the model in the other memory format "
                    f"({self.memory_format}); a model that cannot run so draws in its own "
                    "with an even number (draw=2, 4, ...)"
                )
            raise

    def undo(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
            lay_out_weights(self.model, other_layout(self.model))


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: t for key, t in state.items()}


def _draw_number(draw: int | None) -> int | None:
    """`draw`, else ALIGN_DRAW from the environment: a positive integer, or None."""
    if draw is None and os.environ.get(DRAW_ENV, "").strip():
        text = os.environ[DRAW_ENV].strip()
        if not text.isdigit():
            raise AlignError(f"{DRAW_ENV}={text!r}: give the draw's number, 1, 2, ...")
        draw = int(text)
    if draw is not None and (type(draw) is not int or draw < 1):
        raise AlignError(f"draw= must be a positive integer (1, 2, ...), not {draw!r}")
    return draw


def _step_numbers(steps: Any) -> frozenset[int]:
    try:
        numbers = frozenset(steps)
    except TypeError:
        numbers = None
    if not numbers or not all(isinstance(n, int) and n >= 0 for n in numbers):
        raise AlignError(f"steps= must list step numbers >= 0 to record, e.g. [0, 1, 2]: {steps!r}")
    return numbers


@contextlib.contextmanager
def _step_replaced(optimizer: torch.optim.Optimizer, step: Any) -> Iterator[None]:
    """`optimizer.step` is `step` inside; the instance's own `step` (an LR scheduler's
    wrapper) is put back after."""
    own = optimizer.__dict__.get("step")
    optimizer.step = step
    try:
        yield
    finally:
        if own is None:
            del optimizer.step
        else:
            optimizer.step = own


def skipping(optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager:
    """`optimizer.step()` does nothing inside (the reference's scaler skipped the step:
    Recorder._skips)."""
    return _step_replaced(optimizer, lambda *args, **kwargs: None)


def _draws_nothing(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch.optim's own optimizers: no random draw, and no branch that a gradient
    flows through (a user's optimizer may draw noise: its step stays recorded)."""
    return type(optimizer).__module__.startswith("torch.optim.")


def _stepping_outside(
    optimizer: torch.optim.Optimizer, choices: Decisions
) -> contextlib.AbstractContextManager:
    """`optimizer.step()` runs with `choices` suspended inside: an optimizer makes no
    discrete choice, and each of its ops (about four per parameter) would pay the mode's
    Python dispatch (timm ResNet-18, SGD with momentum, batch 4 at 64 px: its step took
    1.4x as long under the mode)."""
    step = optimizer.step

    @wraps(step)
    def outside(*args: Any, **kwargs: Any) -> Any:
        with choices.suspended():
            return step(*args, **kwargs)

    return _step_replaced(optimizer, outside)


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """`optimizer=` as a list: none, one, or several."""
    if optimizer is None:
        return []
    given = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    if (
        isinstance(given, (list, tuple))
        and given
        and all(isinstance(o, torch.optim.Optimizer) for o in given)
    ):
        return list(given)
    raise AlignError(
        f"optimizer= must be a torch.optim.Optimizer or a list of them, not {type(optimizer)}"
    )


def _summed(hooks: ModuleHooks, grads: BackwardGrads, names: list[str]) -> list[str]:
    """Of `names` (gradients one backward wrote), those whose module's calls that took
    gradients, two or more, took them all in that backward: the gradient is their sum
    (not a frozen critic's call in the generator's backward, nor a gradient penalty's
    call whose backward built a graph that a second-order term went through)."""
    tasks: dict[str, list[set[int]]] = defaultdict(list)
    for pos, took in hooks.tasks.items():
        tasks[hooks.trace.calls[pos].module].append(took)
    summed = []
    for name in names:
        calls = tasks.get(name.rpartition(".")[0], [])
        if len(calls) > 1 and all(took == {grads.task(name)} for took in calls):
            summed.append(name)
    return sorted(summed)


def _make_golden(model: nn.Module, optimizers: list[torch.optim.Optimizer], scaler: Any) -> None:
    """Turn this run into the float64 golden: model in float64, floating inputs cast."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise AlignError("golden=True is the float64 CPU run: keep the model on the CPU")
    if any(o.state for o in optimizers):
        raise AlignError("golden=True: construct the Recorder before the first optimizer step")
    if scaler is not None and scaler.is_enabled():
        raise AlignError(
            "golden=True: run the golden without loss scaling (GradScaler(enabled=False)); "
            "recorded gradients are unscaled on every side"
        )
    model.double()  # in place: the optimizer keeps the same parameter objects
    for module in model.modules():  # a script may call a submodule (a GAN's critic) itself
        module.register_forward_pre_hook(_inputs_to_float64, with_kwargs=True)


def _inputs_to_float64(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cast(t: Any) -> Any:
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return map_leaves(cast, (args, kwargs))


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def _write_step(
    trace: Trace, state: dict[str, torch.Tensor], info: dict, directory: Path, index: dict
) -> None:
    """What is left of a step once its tensors are in their shards (`index`)."""
    trace.write_records(directory / TRACE_DIR, index)
    save_file(state, str(directory / STATE_FILE))
    info["state"] = {k: {"shape": list(t.shape), "dtype": str(t.dtype)} for k, t in state.items()}
    (directory / STEP_FILE).write_text(json.dumps(info, indent=1, default=str))
