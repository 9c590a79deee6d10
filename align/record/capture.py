"""Capture: run a private copy of a model and record every module call.

Forward pre-hooks record what each module receives, forward hooks what it returns; tensor
hooks on those outputs record the gradient of each output (tensor hooks, not full
backward hooks, which raise on the in-place activations timm and torchvision use; a hook
registered before an in-place op receives the gradient of the value it saw). To get the
gradient each module passes back to *its own* inputs, the pre-hook hands the module an
alias of each input that requires grad (`_Tap`) and hooks that alias. Every module is hooked, leaf
or not, so containers that compute (timm's BatchNormAct2d, a residual block's add) are
recorded too; a tensor shared by several records is stored once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from align.errors import AlignError, ModelRunError, TraceError
from align.numerics import metrics
from align.numerics.decisions import Choices, Decisions
from align.numerics.emulate import parse_emulation
from align.numerics.jitter import Jitter
from align.numerics.one_pass import OnePass
from align.numerics.precision import Policy, get_policy
from align.numerics.trees import flatten, map_leaves, unflatten
from align.record.checkpointing import plain_checkpoints
from align.record.trace import Call, Trace
from align.runtime import environment
from align.runtime.devices import resolve

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class CallSpec:
    """What is needed to call a module again with recorded tensors (align.record.arguments
    writes it into a Recorder's dumps)."""

    in_spec: Any
    in_leaves: list[Any]  # non-tensor leaves of (args, kwargs); None where a tensor was
    out_spec: Any = None
    out_leaves: list[Any] = field(default_factory=list)
    training: bool = True  # the module's mode when it was called
    # whether autocast was on where it was called (a script may turn it off for a block:
    # an fp32 head, a loss); isolation re-runs the call with autocast off where it was off
    autocast: bool = True
    # per output leaf, whether it required grad (empty: unknown, all did): an output that
    # did not (a detector's transform passing its target boxes on) takes no gradient when
    # the call is replayed in isolation
    out_grad: list[bool] = field(default_factory=list)
    # whether the call wrote its module's parameters (a data-dependent initialization in
    # the first forward, Glow's ActNorm): re-run alone it would start from what its own
    # run wrote, so it is not judged alone (in-process only: not in a Recorder's dumps)
    writes_params: bool = False


class _Tap(torch.autograd.Function):
    """Identity whose output aliases its input without being an autograd view.

    A hook on a view is lost when an in-place op (ReLU(inplace=True)) rewrites the view's
    history; a hook on this alias survives. The alias shares the version counter, so
    autograd still catches in-place misuse exactly as it would without the tap.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def outside_modes(*tensors: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where copying `tensors` is no op of the run: the dispatch modes it runs under (an
    honest draw's jitter, which would nudge a clone; decisions; the golden's float64)
    skip it. Plain tensors take torch's C++ guard (a third of the cost of popping the
    modes: 14 against 41 us a snapshot, measured); a tensor subclass keeps its own dispatch."""
    if all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors):
        return no_dispatch()
    return _disable_current_modes()


def _content_key(t: torch.Tensor) -> tuple:
    """Identifies a tensor's current contents: same storage view at the same version."""
    return (
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
        t.device,
        # (an inference tensor, made under torch.inference_mode inside the model, keeps
        # no version: its contents are never taken for another snapshot's)
        object() if t.is_inference() else t._version,
    )


class _Hook:
    """A Recorder's hook on one module. Deep-copied with the module (`copy.deepcopy` inside
    the model's forward: torch.func's `functional_call` on a copy moved to "meta", a copy
    of the best model mid-step), it becomes `_inert`: copying it copied the Recorder and
    raised on its non-leaf tensors, and a copy must neither record nor keep it alive.
    (DataParallel's replicas share, not copy, the hooks: they are recorded.)"""

    def __init__(self, method: Callable, name: str):
        self.method, self.name = method, name

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        return self.method(self.name, module, *args)

    def __deepcopy__(self, memo: dict) -> Callable:
        return _inert


def _inert(module: nn.Module, *args: Any) -> None:
    """A copied module's hook: nothing."""


class Recorder:
    """Hooks on every module of one model; fills a Trace while the model runs."""

    def __init__(
        self,
        model: nn.Module,
        backward: bool,
        snapshot: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        grad_snapshot: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ):
        self.backward = backward
        # what the trace keeps of a tensor stored under a key: a clone, or (align.record.loop)
        # a stand-in while a host copy streams to disk; gradients may be kept otherwise
        self._snapshot = snapshot or _clone
        self._grad_snapshot = grad_snapshot or self._snapshot
        self.trace = Trace(calls=[], tensors={})
        self.specs: dict[int, CallSpec] = {}
        self._stack: list[int] = []
        # the call whose backward runs now: the last whose output gradient arrived, back to
        # its parent once its input gradient is out (autograd's CPU engine runs a module's
        # backward nodes together: they were created together, and none of another call
        # becomes ready in between)
        self._backward_at: int | None = None
        self._counts: dict[str, int] = {}
        self._seen: dict[tuple, tuple[torch.Tensor, str]] = {}
        self._grads: dict[int, tuple[weakref.ref, str]] = {}
        # per running call: copies of its module's floating buffers as they were before it
        self._buffers: dict[int, list[tuple[str, torch.Tensor]]] = {}
        # per running call: its module's own parameters' fingerprints before it (_fingerprint)
        self._versions: dict[int, tuple] = {}
        # per call that took gradients: the backward passes (graph tasks) they came in
        self.tasks: dict[int, set[int]] = {}
        self._handles = []
        for name, module in model.named_modules():
            self._handles.append(
                module.register_forward_pre_hook(_Hook(self._pre, name), with_kwargs=True)
            )
            self._handles.append(
                module.register_forward_hook(_Hook(self._post, name), with_kwargs=True)
            )
            self._handles.append(
                module.register_forward_hook(
                    _Hook(self._ended, name), with_kwargs=True, always_call=True
                )
            )

    def current(self) -> tuple[str, int, int] | None:
        """(module, call index, position) of the innermost module call running now,
        forward or backward."""
        pos = self._stack[-1] if self._stack else self._backward_at
        if pos is None:
            return None
        call = self.trace.calls[pos]
        return call.module, call.index, pos

    def calls(self, module: str) -> int:
        """How many times module `module` (by qualified name) has been called so far."""
        return self._counts.get(module, 0)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def release(self) -> None:
        """Drop the live tensors kept for dedup: their autograd graphs hold hooks that point
        back here, a cycle through C++ that Python's gc cannot free (a leak per run)."""
        self._seen.clear()
        self._grads.clear()
        self._buffers.clear()
        self._versions.clear()

    def store(self, t: torch.Tensor) -> str:
        """Key of a snapshot of `t`; the same contents are stored once."""
        content = _content_key(t)
        hit = self._seen.get(content)
        if hit is not None:
            return hit[1]
        key = f"t{len(self.trace.tensors)}"
        # (not an inference tensor, whatever `t` is: a Recorder reuses its host memory in
        # later steps, outside the inference_mode a teacher ran under inside the model)
        with outside_modes(t), torch.inference_mode(False):
            self.trace.tensors[key] = self._snapshot(key, t.detach())
        self._seen[content] = (t, key)  # keeps `t` alive so its storage is not reused
        return key

    def store_grad(self, grad: torch.Tensor, fresh: bool = False) -> str:
        """Key of a snapshot of the gradient `grad`; the same tensor is stored once, unless
        `fresh` (written in place since: a parameter gradient accumulated again). It is
        known by a weak reference: backward frees each gradient once used, as without
        the hooks (kept, a step's gradients stayed alive to its end and the next ones took
        fresh memory: 1.75x against 1.34x a bare ResNet-18 step recorded at batch 16,
        128 px, measured alternating in one process)."""
        hit = self._grads.get(id(grad))
        if hit is not None and hit[0]() is grad and not fresh:
            return hit[1]
        key = f"t{len(self.trace.tensors)}"
        with outside_modes(grad):
            self.trace.tensors[key] = self._grad_snapshot(key, grad.detach())
        self._grads[id(grad)] = (weakref.ref(grad), key)
        return key

    def _pre(self, name: str, module: nn.Module, args: tuple, kwargs: dict):
        pos = len(self.trace.calls)
        parent = self._stack[-1] if self._stack else None
        index = self._counts.get(name, 0)
        self._counts[name] = index + 1
        leaves, spec = flatten((args, kwargs))
        keys: list[str | None] = []
        fed: list[Any] = []
        tapped = False
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                keys.append(None)
                fed.append(leaf)
                continue
            keys.append(self.store(leaf))
            # (a module called under no_grad, on a tensor that requires grad, as a teacher
            # network or spectral norm's power iteration is: no gradient will come back)
            if self.backward and leaf.requires_grad and torch.is_grad_enabled():
                leaf = _Tap.apply(leaf)
                leaf.register_hook(partial(_weakly, weakref.ref(self), "_grad_in", pos, i))
                tapped = True
            fed.append(leaf)
        call = Call(name, index, type(module).__name__, parent, inputs=keys)
        call.grad_inputs = [None] * len(keys)
        self.trace.calls.append(call)
        self.specs[pos] = CallSpec(
            spec,
            [None if isinstance(x, torch.Tensor) else x for x in leaves],
            training=module.training,
            autocast=_autocast_on(module, leaves),
        )
        self._versions[pos] = _fingerprint(module, first=index == 0)
        floating = {
            n: b for n, b in module._buffers.items() if b is not None and b.is_floating_point()
        }
        if floating:
            with outside_modes(*floating.values()):
                self._buffers[pos] = [(n, b.detach().clone()) for n, b in floating.items()]
        self._stack.append(pos)
        if tapped:
            return unflatten(fed, spec)
        return None

    def _post(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        pos = self._stack.pop()
        self.trace.forward_order.append(pos)
        call = self.trace.calls[pos]
        leaves, spec = flatten(output)
        keys: list[str | None] = []
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                keys.append(None)
                continue
            keys.append(self.store(leaf))
            if self.backward and leaf.requires_grad:
                leaf.register_hook(partial(_weakly, weakref.ref(self), "_grad_out", pos, i))
        call.outputs = keys
        call.grad_outputs = [None] * len(keys)
        before = self._versions.pop(pos, None)
        if before is not None and _wrote(module, before):
            for running in (*self._stack, pos):  # the calls running it wrote them too
                self.specs[running].writes_params = True
        saved = self._buffers.pop(pos, ())
        with outside_modes(*(b for _, b in saved)):
            for buffer, before in saved:
                now = module._buffers.get(buffer)
                if now is None:
                    continue
                call.buffer_names.append(buffer)
                call.buffers_in.append(self.store(before))
                # (kernels write running statistics without bumping the version counter:
                # compared by value, and a written one stored from a copy, which no later
                # silent write can make the content key of a stale snapshot)
                same = _same(now, before)
                call.buffers.append(call.buffers_in[-1] if same else self.store(now.clone()))
        self.specs[pos].out_spec = spec
        self.specs[pos].out_leaves = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        self.specs[pos].out_grad = [isinstance(x, torch.Tensor) and x.requires_grad for x in leaves]

    def _ended(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        """After every call, `_post` or not: a call that raised leaves the stack, so what
        runs next is not taken for part of it. Checkpointing (torch.utils.checkpoint, timm's
        set_grad_checkpointing) stops its recomputation in backward with an exception once
        the tensors backward needs are back: without this, every later backward op was
        owned by the stopped call (measured: each ReLU's backward branches of resnet26d
        owned by the last recomputed call, and each ReLU named a culprit in isolation)."""
        if self._stack and self.trace.calls[self._stack[-1]].module == name:
            pos = self._stack.pop()  # (`_post` ran: it popped its own, and this is a parent)
            self._buffers.pop(pos, None)
            self._versions.pop(pos, None)

    def _mark(self, pos: int) -> None:
        call = self.trace.calls[pos]
        if all(k is None for k in call.grad_outputs + call.grad_inputs):
            self.trace.backward_order.append(pos)

    def _grad_out(self, pos: int, i: int, grad: torch.Tensor) -> None:
        if not self._inside(self._backward_at, pos):  # (a child's output may be its parent's:
            self._backward_at = pos  # its hook fires first, and its backward runs first)
        self._mark(pos)
        self.tasks.setdefault(pos, set()).add(torch._C._current_graph_task_id())
        self.trace.backward_events.append((pos, "grad_outputs", i))
        self.trace.calls[pos].grad_outputs[i] = self.store_grad(grad)

    def _inside(self, pos: int | None, ancestor: int) -> bool:
        """Whether call `pos` is `ancestor` or nested in it."""
        while pos is not None and pos != ancestor:
            pos = self.trace.calls[pos].parent
        return pos == ancestor

    def _grad_in(self, pos: int, i: int, grad: torch.Tensor) -> None:
        self._backward_at = self.trace.calls[pos].parent
        self._mark(pos)
        self.tasks.setdefault(pos, set()).add(torch._C._current_graph_task_id())
        self.trace.backward_events.append((pos, "grad_inputs", i))
        self.trace.calls[pos].grad_inputs[i] = self.store_grad(grad)


def _autocast_on(module: nn.Module, leaves: list[Any]) -> bool:
    """Whether autocast is on for the device the call computes on: its tensor arguments'
    (an accelerator's before the CPU's), else its module's weights'; on (as the run is)
    where neither says (a rotary embedding called with a length) or the device has no
    autocast (meta)."""
    devices = [x.device.type for x in leaves if isinstance(x, torch.Tensor)]
    devices += [t.device.type for t in itertools.islice(module.parameters(), 1)]
    if not devices:
        return True
    try:
        return torch.is_autocast_enabled(next((d for d in devices if d != "cpu"), "cpu"))
    except RuntimeError:
        return True


def autocast_as_called(spec: CallSpec, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on `device` where the recorded call ran with it off, else as it is:
    a run whose policy has no autocast (fp32, the float64 golden) is never given one."""
    if spec.autocast:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach(), b)


def _clone(key: str, t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _weakly(recorder: weakref.ref, method: str, pos: int, i: int, grad: torch.Tensor) -> None:
    """A tensor hook that reaches its Recorder through a weak reference: a model that keeps
    a graph alive after the run (torchvision's detectors keep their batched ImageList)
    would otherwise keep the Recorder, and every tensor it recorded, alive with it. An
    undefined gradient (None: the op downstream sends none back, as torchvision's box
    coder for its detached proposals) is no gradient, as if the hook had not fired."""
    alive = recorder()
    if alive is not None and grad is not None:
        getattr(alive, method)(pos, i, grad)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call `model` the way align feeds inputs: tuple -> *args, dict -> **kwargs."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def projection_loss(seed: int) -> LossFn:
    """Default loss: every floating (or complex) output dotted with fixed seeded random weights.

    Device- and dtype-agnostic (the weights are drawn in float64 on the CPU), so every
    run of a check gets the same loss and non-trivial gradients everywhere.
    """

    def loss(output: Any, inputs: Any) -> torch.Tensor:
        leaves = [t for t in flatten(output)[0] if isinstance(t, torch.Tensor)]
        # a complex output (a spectrum) by its real and imaginary parts
        floats = [
            torch.view_as_real(t) if t.is_complex() else t
            for t in leaves
            if t.is_floating_point() or t.is_complex()
        ]
        if not floats:
            raise AlignError("the model returned no floating tensor to take a loss of")
        total = 0
        for i, t in enumerate(floats):
            gen = torch.Generator().manual_seed(seed * 1000 + i)
            w = torch.randn(t.shape, generator=gen, dtype=torch.float64) / max(t.numel(), 1) ** 0.5
            acc = torch.float64 if t.dtype == torch.float64 else torch.float32
            total = total + (t.to(acc) * w.to(device=t.device, dtype=acc)).sum()
        return total

    return loss


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # seeds the CPU and every accelerator generator


def numerics(
    policy: Policy,
    device: torch.device,
    emulation: Any = None,
    autocast: bool = True,
    native_kernels: bool = False,
    jitter: int | None = None,
) -> contextlib.ExitStack:
    """Emulated number formats (or float64 kept), then the policy's autocast.

    `native_kernels` turns oneDNN off, so CPU convolutions run ATen's own kernels: another
    kernel library with another summation order, as a device's would be. `jitter` (a
    seed) makes this an honest draw of the run's rounding noise (align.numerics.jitter).
    Reentrant activation checkpoints run plainly (align.record.checkpointing).
    """
    stack = contextlib.ExitStack()
    stack.enter_context(plain_checkpoints())
    if native_kernels:
        stack.enter_context(warnings.catch_warnings())  # oneDNN's TF32-on-XPU notice
        warnings.simplefilter("ignore", UserWarning)
        stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
    if emulation is not None:
        stack.enter_context(emulation.mode())
    if policy.name == "fp64":
        stack.enter_context(KeepFloat64())
    if autocast:
        stack.enter_context(policy.autocast(device))
    if jitter is not None:
        stack.enter_context(Jitter(jitter))
    return stack


class KeepFloat64(TorchDispatchMode):
    """Keeps a golden run in float64: casts and factories asking for a lower float dtype
    (a loss that calls `.float()`, a model that builds anchors in float32) get float64, and
    so do factories that ask for no dtype (`torch.zeros(n)`, `torch.tensor(0.5)`: float64
    is torch's default dtype while the mode is on), as the same script run in float64 would
    build them. Not where backward casts a gradient back to the dtype of its input (a
    gradient penalty's float32 input, cast to float64 where it entered the model, or
    added to a float64 loss): that gradient must be float32, or autograd refuses it. An op
    that refuses a float32 tensor beside float64 ones runs on float64 copies (`_in_float64`)."""

    LOWER = (torch.float32, torch.float16, torch.bfloat16)

    def __enter__(self):
        self.__dict__.setdefault("_defaults", []).append(torch.get_default_dtype())
        torch.set_default_dtype(torch.float64)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.set_default_dtype(self._defaults.pop())
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("dtype") in self.LOWER and not _casting_back():
            kwargs = {**kwargs, "dtype": torch.float64}
        # a foreach op writes its lists tensor by tensor and raises at the first pair it
        # cannot take, the ones before it written: tried first, it would write them twice
        if func._schema.name.startswith("aten::_foreach_") and self._mixed(args, kwargs):
            return self._in_float64(func, args, kwargs)
        try:
            return func(*args, **kwargs)
        except RuntimeError:
            if not self._mixed(args, kwargs):
                raise
        return self._in_float64(func, args, kwargs)  # (its own error, if any, unchained)

    def _mixed(self, args: tuple, kwargs: dict) -> bool:
        """Whether the tensors of an op's arguments mix float64 with a lower float dtype."""
        dtypes = {t.dtype for t in flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        return torch.float64 in dtypes and not dtypes.isdisjoint(self.LOWER)

    def _in_float64(self, func, args: tuple, kwargs: dict) -> Any:
        """`func` on float64 copies of its lower-float tensors, written back where it writes
        (in place, out=): a float32 tensor the model does not hold meets the golden's float64
        in an op that takes one dtype (a loss's class weights, "expected scalar type Double
        but found Float"; an EMA copy made before the golden Recorder, torch's AveragedModel
        lerping its float32 weights towards the model's float64 ones)."""
        leaves, spec = flatten((args, kwargs))
        wide = [
            t.double() if isinstance(t, torch.Tensor) and t.dtype in self.LOWER else t
            for t in leaves
        ]
        wide_args, wide_kwargs = unflatten(wide, spec)
        out = func(*wide_args, **wide_kwargs)
        written = _written(func, args, kwargs)
        back = {}  # the float64 copy's id -> the tensor it stood for, written back
        for t, w in zip(leaves, wide):
            if w is not t and any(t is x for x in written):
                if t.shape != w.shape:  # an out= tensor the op resizes
                    t.resize_(w.shape)
                t.copy_(w)
                back[id(w)] = t
        return map_leaves(lambda r: back.get(id(r), r), out) if back else out


def _fingerprint(module: nn.Module, first: bool) -> tuple[list[int], list[torch.Tensor]]:
    """What shows that a call wrote `module`'s own parameters: their version counters (an
    in-place write bumps them) and, at a module's first call in the run, up to 16 of their
    values each (a write through `.data`, as Glow's ActNorm initializes itself, bumps
    none: measured, the common `self.loc.data.copy_(-mean)`)."""
    own = [p for p in module._parameters.values() if p is not None]
    if not first or not own:
        return [p._version for p in own], []
    with outside_modes(*own):
        return [p._version for p in own], [_sample(p) for p in own]


def _sample(p: torch.Tensor) -> torch.Tensor:
    return p.detach().reshape(-1)[:: max(1, p.numel() // 16)].clone()


def _wrote(module: nn.Module, before: tuple[list[int], list[torch.Tensor]]) -> bool:
    """Whether `module`'s own parameters changed since their `_fingerprint` `before`."""
    versions, samples = before
    own = [p for p in module._parameters.values() if p is not None]
    if [p._version for p in own] != versions:
        return True
    with outside_modes(*own):
        return any(not torch.equal(_sample(p), s) for p, s in zip(own, samples))


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors the aten op `func` writes (the arguments its schema marks `!`: in place,
    out=, a foreach op's list)."""
    found = []
    for i, name in _WRITES[func] if func in _WRITES else _writes(func):
        given = args[i] if i < len(args) else kwargs.get(name)
        found += [t for t in flatten(given)[0] if isinstance(t, torch.Tensor)]
    return found


_WRITES: dict[Any, list[tuple[int, str]]] = {}


def _writes(func: Any) -> list[tuple[int, str]]:
    """(position, name) of the arguments `func`'s schema marks written, cached."""
    _WRITES[func] = [
        (i, arg.name)
        for i, arg in enumerate(func._schema.arguments)
        if arg.alias_info is not None and arg.alias_info.is_write
    ]
    return _WRITES[func]


def _casting_back() -> bool:
    """Whether backward is casting gradients now: a cast's backward (ToCopyBackward0), or
    any node of a backward that builds no graph (its outputs cast to their inputs'
    dtypes). Not a forward that backward runs again with grad enabled (an activation
    checkpoint's recomputation), which must compute as its forward did."""
    if torch._C._current_graph_task_id() == -1:
        return False
    node = torch._C._current_autograd_node()
    return not torch.is_grad_enabled() or type(node).__name__ == "ToCopyBackward0"


@dataclass
class Run:
    """A prepared private copy of a model, how it was run, and what it recorded."""

    model: nn.Module
    device: torch.device
    policy: Policy
    trace: Trace
    specs: dict[int, CallSpec]
    emulation: Any = None  # align.numerics.emulate.Emulation or None
    native_kernels: bool = False
    loss_scale: float = 1.0
    seed: int = 0
    jitter: int | None = (
        None  # the seed of an honest draw (align.numerics.jitter), None for a plain run
    )
    decisions: Decisions | None = None  # its discrete choices (align.numerics.decisions)
    one_pass: int | None = None  # the seed of a one-pass statistics draw (align.numerics.one_pass)
    # the loss scale a re-run's backward applies to the trace's gradients, recorded unscaled
    # (align.record.loop), and takes off what it returns: an fp16 backward runs scaled, as
    # the recorded loop did, not in fp16's subnormals (1: the trace's are as run)
    grad_scale: float = 1.0
    # the layout a module re-run alone (align.judge.isolation) lays its 4-d weights and
    # inputs out in: an honest draw's other summation order (`draw`); None: as recorded
    memory_format: torch.memory_format | None = None

    def numerics(self, autocast: bool = True) -> contextlib.ExitStack:
        """Context for running code as this run did."""
        stack = numerics(
            self.policy, self.device, self.emulation, autocast, self.native_kernels, self.jitter
        )
        if self.one_pass is not None:
            stack.enter_context(OnePass(self.one_pass))
        return stack

    def one_pass_draw(self) -> Run:
        """This run with its normalizations' statistics summed as in one pass, at random
        (align.numerics.one_pass), without jitter's nudges: the honest kernel that
        align.judge.step_isolation re-runs a call on."""
        return dataclasses.replace(self, one_pass=self.seed)

    def draw(self, n: int) -> Run:
        """This run's n-th honest draw: the same model and record, rounding jittered, and
        a module re-run alone in the other layout every other draw, as a whole-network
        draw runs (`honest_draw`; measured: fastvit_t8's depthwise 1x1 conv before a
        train-mode BatchNorm, whose weight gradient cancels to a millionth of its terms,
        2.1x the reference's error summed with two threads, where the jittered draws
        stayed under the reference's; summed channels_last, 3.8x, as two threads sum)."""
        return dataclasses.replace(
            self, jitter=jitter_seed(self.seed, n), memory_format=draw_layout(self.model, n)
        )

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """A private copy of a recorded tensor on this run's device (float64 if golden)."""
        dtype = torch.float64 if self.policy.name == "fp64" and t.is_floating_point() else None
        return t.to(device=self.device, dtype=dtype, copy=True)


def jitter_seed(seed: int, n: int) -> int:
    """The jitter seed of honest draw n of a run seeded `seed`."""
    return seed * 1000 + n + 1


def other_layout(model: nn.Module) -> torch.memory_format | None:
    """The memory format a model with 2-d convolutions does not run in (channels_last for
    a contiguous one, contiguous for a channels_last one); None without 4-d weights."""
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    if weight is None:
        return None
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last


def honest_draw(
    model: nn.Module,
    inputs: Any,
    run: Run,
    k: int,
    *,
    loss_fn: LossFn | None,
    grad_inputs: Callable[[Any], Any] | None = None,
) -> Trace:
    """Honest draw k of `run` (align.numerics.jitter): the same model, inputs, numerics and
    decisions, with every rounding jittered; a whole run of its own. Odd draws also run
    in the other memory format (`other_layout`): the device's own convolution, norm and
    pooling kernels for that layout sum in another order, a spread that jittering each
    op's result misses on long reductions (measured at 224 px, fp32: BatchNorm weight
    gradients over 2x56x56 values 5.7x the reference's error on channels_last, beyond
    2x its 2 jittered draws, in resnet26d, efficientnet_b0 and ghostnet_050). A device
    such as an Ascend NPU runs its convolutions in a blocked layout of its own."""
    return in_draw_layout(
        lambda memory_format: (
            run_model(
                model,
                inputs,
                device=run.device,
                policy=run.policy,
                backward=run.trace.meta["backward"],
                loss_fn=loss_fn,
                seed=run.seed,
                loss_scale=run.loss_scale,
                emulation=run.emulation,
                native_kernels=run.native_kernels,
                jitter=jitter_seed(run.seed, k),
                grad_inputs=grad_inputs,
                replay=run.decisions.choices,
                memory_format=memory_format,
            ).trace
        ),
        draw_layout(model, k),
    )


def draw_layout(model: nn.Module, k: int) -> torch.memory_format | None:
    """The memory format honest draw k runs `model` in: every other one (k odd) the
    other layout (`other_layout`), the rest as the reference."""
    return other_layout(model) if k % 2 else None


T = TypeVar("T")


def in_draw_layout(run: Callable[[torch.memory_format | None], T], memory_format) -> T:
    """`run(memory_format)`, or `run(None)` where the model cannot run laid out so: a
    model may view a 4-d weight or input in a way only its own layout allows (a global
    filter's weight as complex numbers, measured: `view_as_complex` raised on
    channels_last, and every check of that model stopped in its first honest draw)."""
    if memory_format is None:
        return run(None)
    try:
        return run(memory_format)
    except (RuntimeError, ModelRunError):  # what the model raised (wrapped, from a whole run)
        return run(None)


def prepare(model: nn.Module, device: torch.device, policy: Policy) -> nn.Module:
    """A private copy of `model` on `device` cast by `policy` (the caller's is untouched)."""
    private = copy.deepcopy(model)
    policy.prepare(private)
    return private.to(device)


def run_model(
    model: nn.Module,
    inputs: Any,
    *,
    device: torch.device,
    policy: Policy,
    backward: bool,
    loss_fn: LossFn | None,
    seed: int,
    loss_scale: float = 1.0,
    emulation: Any = None,
    native_kernels: bool = False,
    jitter: int | None = None,
    grad_inputs: Callable[[Any], Any] | None = None,
    replay: Choices | None = None,
    memory_format: torch.memory_format | None = None,
) -> Run:
    """Run a private copy of `model` once (forward, loss, backward) with every hook on.

    Backward differentiates every floating input, or only those `grad_inputs(inputs)`
    returns (a detector's images, not its target boxes). The run's discrete choices (sort,
    max-pool indices) are recorded in `run.decisions`, or are `replay`'s (align.numerics.decisions).
    `memory_format` lays out the copy's 4-d weights and 4-d floating inputs in it.
    """
    private = prepare(model, device, policy)
    run = Run(
        private,
        device,
        policy,
        Trace([], {}),
        {},
        emulation,
        native_kernels,
        loss_scale,
        seed,
        jitter,
        Decisions(replay),
    )
    x = laid_out(private, policy.cast_inputs(inputs, device), memory_format)
    if backward:
        differentiate(x, grad_inputs)
    loss_fn = loss_fn or projection_loss(seed)
    recorder = Recorder(private, backward)
    run.decisions.where = recorder.current
    started = time.perf_counter()
    try:
        _seed_all(seed)
        with model_errors(device, policy, jitter), run.decisions, run.numerics():
            output = call_model(private, x)
        recorder.remove()  # the loss is not a module call
        loss = None
        if backward:
            with run.decisions, run.numerics(autocast=False):
                with loss_errors(device, policy):
                    loss = loss_fn(output, x)
                with model_errors(device, policy, jitter):
                    (loss * loss_scale).backward()
            for name, param in private.named_parameters():
                if param.grad is not None:
                    recorder.trace.param_grads[name] = recorder.store_grad(param.grad)
    finally:
        recorder.remove()
        recorder.release()
    trace = recorder.trace
    trace.decisions, trace.faults = run.decisions.choices, run.decisions.faults
    trace.meta = {
        "device": str(device),
        "precision": policy.name,
        "seed": seed,
        "loss": None if loss is None else float(loss.detach().float()),
        "loss_scale": loss_scale,
        "emulate": None if emulation is None else emulation.name,
        "native_kernels": native_kernels,
        "jitter": jitter,
        "memory_format": None if memory_format is None else str(memory_format).split(".")[-1],
        "decisions": "replayed" if replay is not None else "own",
        "decisions_differed": run.decisions.summary(),
        "model": type(model).__name__,
        "backward": backward,
        "seconds": time.perf_counter() - started,
        "environment": environment.record({"run": str(device)}),
    }
    run.trace, run.specs = trace, recorder.specs
    return run


def differentiate(inputs: Any, grad_inputs: Callable[[Any], Any] | None = None) -> None:
    """Make `inputs`' floating tensors (or those `grad_inputs(inputs)` returns: a detector's
    images, not its boxes) require grad, in place: their gradients are judged, and a loss
    may take them (a gradient penalty differentiates the output by its input)."""
    map_leaves(
        lambda t: (
            t.requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        ),
        grad_inputs(inputs) if grad_inputs is not None else inputs,
    )


def undifferentiable_inputs(run: Run) -> frozenset[int]:
    """Positions, among the model's flattened inputs, of those whose gradient in `run`
    holds NaN or an infinity (a detector's target boxes, whose gradient its loss makes
    0 * inf; no training script asks for it), which its runs should not differentiate.
    None under fp16, whose own overflow reaches an input's gradient too."""
    trace = run.trace
    if (
        run.policy.low_precision == torch.float16
        or not trace.calls
        or trace.calls[0].parent is not None
    ):
        return frozenset()
    return frozenset(
        i
        for i, key in enumerate(trace.calls[0].grad_inputs)
        if key is not None and not metrics.all_finite(metrics.judged_form(trace.tensors[key]))
    )


def all_inputs_but(positions: frozenset[int]) -> Callable[[Any], list]:
    """A `grad_inputs` for `differentiate`: every input but those at `positions`."""
    return partial(_all_but, positions)


def _all_but(positions: frozenset[int], inputs: Any) -> list:
    return [leaf for i, leaf in enumerate(flatten(inputs)[0]) if i not in positions]


def laid_out(model: nn.Module, inputs: Any, memory_format: torch.memory_format | None) -> Any:
    """Lay out `model`'s 4-d weights in `memory_format` (in place) and return `inputs`
    with their 4-d floating tensors in it; None leaves both as they are."""
    if memory_format is None:
        return inputs
    lay_out_weights(model, memory_format)
    return inputs_laid_out(inputs, memory_format)


def lay_out_weights(model: nn.Module, memory_format: torch.memory_format) -> None:
    """`model`'s 4-d parameters and buffers in `memory_format`, in place. Not
    `model.to(memory_format=...)`: that converts 5-d ones too, and a Conv3d's weight has
    no channels_last (timm's lambda_resnet26t raised there)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=memory_format)


def inputs_laid_out(inputs: Any, memory_format: torch.memory_format) -> Any:
    """`inputs` (any nesting) with their 4-d floating tensors in `memory_format` (but for
    images: FEW_CHANNELS)."""
    return map_leaves(partial(_laid_out, memory_format=memory_format), inputs)


@contextlib.contextmanager
def model_errors(device: torch.device, policy: Policy, jitter: int | None = None) -> Iterator[None]:
    """A ModelRunError for what the model's forward or backward raises on `device` at
    `policy`'s precision (a kernel it lacks there), chained to the original error."""
    try:
        yield
    except AlignError:
        raise
    except Exception as exc:
        draw = "" if jitter is None else " in an honest draw of the reference"
        raise ModelRunError(
            f"the model raised {type(exc).__name__} on {device} at {policy.name}"
            f"{draw}: {str(exc).strip()[:500]}\nno verdict: run it there outside align to see "
            "why (a kernel this device or precision lacks: another --reference or --precision)"
        ) from exc


@contextlib.contextmanager
def loss_errors(device: torch.device, policy: Policy) -> Iterator[None]:
    """A ModelRunError for what the loss function raises, chained to the original error.
    align takes the loss outside autocast, on the outputs as the model returned them,
    where a script taking it under autocast has its loss ops run in float32 (CPU
    autocast's `ctc_loss` does; on bf16 log-probabilities it has no kernel)."""
    try:
        yield
    except AlignError:
        raise
    except Exception as exc:
        hint = (
            f": at {policy.name} the outputs may be {policy.autocast_dtype}, and autocast, "
            "under which a script takes its loss, would have run the loss's ops in float32; "
            "cast them in loss_fn (output.float())"
            if policy.autocast_dtype is not None
            else ""
        )
        raise ModelRunError(
            f"loss_fn raised {type(exc).__name__} on {device} at {policy.name}: "
            f"{str(exc).strip()[:300]}\nalign takes the loss outside autocast{hint}"
        ) from exc


# A 4-d input with fewer channels than this (an image) stays as given: the first
# convolution lays it out itself, from its weights. oneDNN's channels_last backward of a
# stride-2 1x1 convolution over fewer than 8 channels crashes the process (torch 2.14.1 on
# CPU: 1, 3 and 4 channels, measured; 8 and more ran), and timm's mobileone_s0 has one on
# its input.
FEW_CHANNELS = 8


def _laid_out(t: Any, memory_format: torch.memory_format) -> Any:
    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point():
        if memory_format == torch.channels_last and t.shape[1] < FEW_CHANNELS:
            return t
        return t.contiguous(memory_format=memory_format)
    return t


def capture(
    model: nn.Module,
    inputs: Any,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    backward: bool = True,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    emulate: str | None = None,
    draws: int = 0,
    grad_inputs: Callable[[Any], Any] | None = None,
    decisions_of: Trace | None = None,
) -> Trace:
    """Record every module call of one run of `model` on `device` under `precision`.

    Save it with `trace.save(dir)` and compare it elsewhere with `align.compare`. A
    reference dump should carry `draws` honest draws (align.numerics.jitter, 2 is plenty): the
    comparison then scales its limits by the largest of their errors. Target and golden
    dumps should take the reference dump's discrete choices (`decisions_of`, see
    align.numerics.decisions), so that near-ties are judged by the same choice on every side.
    """

    policy = get_policy(precision)
    chosen = grad_inputs is not None
    left_out = _left_out(decisions_of) if not chosen else frozenset()
    if left_out:
        grad_inputs = all_inputs_but(left_out)

    def one_run() -> Run:
        return run_model(
            model,
            inputs,
            device=resolve(device),
            policy=policy,
            backward=backward,
            loss_fn=loss_fn,
            seed=seed,
            loss_scale=policy.check_loss_scale,
            emulation=_emulation(emulate),
            grad_inputs=grad_inputs,
            replay=None if decisions_of is None else decisions_of.decisions,
        )

    run = one_run()
    if backward and not chosen and not left_out and (left_out := undifferentiable_inputs(run)):
        grad_inputs = all_inputs_but(left_out)
        run = one_run()
    if left_out:
        run.trace.meta[UNDIFFERENTIATED] = sorted(left_out)
    run.trace.draws = [
        honest_draw(model, inputs, run, k, loss_fn=loss_fn, grad_inputs=grad_inputs)
        for k in range(draws)
    ]
    return run.trace


# a dump's meta key: the positions, among the model's flattened inputs, of those whose
# gradient held NaN or infinity on the reference and that no run of the dump differentiated
UNDIFFERENTIATED = "undifferentiated_inputs"


def _left_out(reference: Trace | None) -> frozenset[int]:
    """The inputs the reference's dump did not differentiate, which its target and golden
    dumps leave out too (a malformed entry is a TraceError)."""
    if reference is None or UNDIFFERENTIATED not in reference.meta:
        return frozenset()
    positions = reference.meta[UNDIFFERENTIATED]
    if not isinstance(positions, list) or not all(type(i) is int and i >= 0 for i in positions):
        raise TraceError(
            f"the reference dump's meta {UNDIFFERENTIATED!r} is not a list of input positions: "
            "the dump is corrupt; dump the reference again"
        )
    return frozenset(positions)


def _emulation(spec: str | None):
    if not spec:
        return None

    return parse_emulation(spec)
