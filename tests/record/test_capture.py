"""Capture: records per module call, in-place activations, containers, outputs of any shape."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import align
from align.errors import TraceError
from align.numerics.jitter import Jitter
from align.record.capture import Recorder, call_model, lay_out_weights
from align.testing import FAULTS, perturb
from align.testing.models import BoxLoss, GlobalFilter, box_inputs


class Twice(nn.Module):
    """Calls one child twice, returns a dict with a tuple inside, uses in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x, scale=1.0):
        a = self.act(self.lin(x))
        b = self.lin(a) * scale
        return {"out": (a, b), "n": 3}


def test_module_called_twice_is_two_records_and_structures_survive():
    model = Twice()
    trace = align.capture(model, (torch.randn(2, 4), 2.0))
    lin = [c for c in trace.calls if c.module == "lin"]
    assert [c.index for c in lin] == [0, 1]
    assert all(c.parent == 0 for c in trace.calls[1:])
    root = trace.calls[0]
    assert root.inputs[1] is None  # the float scale is not a tensor
    assert len(root.outputs) == 3 and root.outputs[2] is None  # a, b and the int
    assert set(trace.param_grads) == {"lin.weight", "lin.bias"}
    # the second call's output gradient is recorded, and the param grad sums both calls
    assert lin[1].grad_outputs[0] is not None and lin[0].grad_outputs[0] is not None


def test_inplace_relu_gets_gradient_of_its_own_input():
    model = Twice()
    x = torch.randn(2, 4)
    trace = align.capture(model, (x, 1.0))
    relu = next(c for c in trace.calls if c.module == "act")
    lin0 = next(c for c in trace.calls if c.module == "lin" and c.index == 0)
    g_in = trace.tensor(relu.grad_inputs[0])
    g_out = trace.tensor(relu.grad_outputs[0])
    pre = trace.tensor(lin0.outputs[0])  # the value ReLU saw, before it wrote in place
    torch.testing.assert_close(g_in, g_out * (pre > 0))
    assert trace.tensor(relu.outputs[0]).min() >= 0
    assert pre.min() < 0  # the record kept the pre-ReLU value


def test_non_leaf_module_that_computes_is_recorded():
    model = timm.create_model("mobilenetv3_small_100", num_classes=10).train()
    trace = align.capture(model, torch.randn(2, 3, 32, 32))
    bn_act = next(c for c in trace.calls if c.cls == "BatchNormAct2d")
    child = next(c for c in trace.calls if c.parent == trace.calls.index(bn_act))
    assert child.module.startswith(bn_act.module + ".")
    # the normalization happens in the container itself: its input differs from what it feeds
    assert not torch.equal(trace.tensor(bn_act.inputs[0]), trace.tensor(child.inputs[0]))
    missing = [c.label for c in trace.calls if any(k is None for k in c.grad_outputs)]
    assert not missing


def test_capture_never_mutates_the_callers_model():
    model = timm.create_model("resnet18", num_classes=10).train()
    before = copy.deepcopy(model.state_dict())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    align.capture(model, torch.randn(2, 3, 32, 32), precision="o2-fp16")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and p.dtype == torch.float32 for p in model.parameters())
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_shared_tensors_stored_once():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3)), nn.Identity())
    trace = align.capture(model, torch.randn(2, 3))
    outs = [c.outputs[0] for c in trace.calls]
    assert len(set(outs)) == 1  # the inner Linear's output is everybody's output


def test_a_gradient_is_freed_once_stored_and_a_live_one_stored_once():
    """The hooks keep their own snapshot of a gradient, not the gradient: backward frees it
    as it goes (a recorded step's memory, and fresh pages for the next gradients, measured
    0.1x of a ResNet-18 step at batch 16, 128 px), while one still alive is stored once."""
    import weakref

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    seen = []
    hooks = Recorder(model, backward=True)
    try:
        out = model(torch.randn(3, 4))
        hidden = hooks.trace.calls[1].outputs[0]  # the Tanh's output: grad_outputs of it
        out.register_hook(lambda g: seen.append(weakref.ref(g)))
        out.sum().backward()
        assert seen and seen[0]() is None  # the output's gradient is gone, its copy kept
        grads = [c.grad_outputs[0] for c in hooks.trace.calls]
        assert all(k in hooks.trace.tensors for k in grads) and hidden in hooks.trace.tensors
        live = torch.ones(3, 2)
        first = hooks.store_grad(live)
        assert hooks.store_grad(live) == first  # alive: one record
        again = hooks.store_grad(live, fresh=True)  # written in place since: a new record
        assert again != first and hooks.store_grad(live) == again
    finally:
        hooks.release()
        hooks.remove()


@pytest.mark.parametrize("inputs", [torch.ones(1, 3), (torch.ones(1, 3),), {"x": torch.ones(1, 3)}])
def test_call_model_feeds_tensor_tuple_or_dict(inputs):
    class F(nn.Module):
        def forward(self, x):
            return x + 1

    assert call_model(F(), inputs).sum() == 6


def test_a_model_that_keeps_its_graph_does_not_keep_the_record():
    """torchvision's detectors hand back an ImageList whose graph outlives the run; the
    tensor hooks on it must not keep the Recorder (and every tensor it recorded) alive."""
    import gc

    from align.record.capture import Recorder

    kept = []

    class Keeper(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            kept.append(y)  # a graph that outlives the run
            return y.relu()

    gc.collect()
    before = sum(isinstance(o, Recorder) for o in gc.get_objects())
    for _ in range(3):
        align.capture(Keeper(), torch.randn(2, 4))
    gc.collect()
    assert len(kept) == 3
    assert sum(isinstance(o, Recorder) for o in gc.get_objects()) == before


def test_other_layout_is_the_memory_format_a_conv_model_does_not_run_in():
    from align.record.capture import other_layout

    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert other_layout(conv) == torch.channels_last
    assert other_layout(copy.deepcopy(conv).to(memory_format=torch.channels_last)) == (
        torch.contiguous_format
    )
    assert other_layout(nn.Linear(4, 4)) is None  # nothing to lay out: a jittered draw only


def test_a_model_that_cannot_run_in_the_other_layout_draws_in_its_own():
    from align.numerics.precision import get_policy
    from align.record.capture import honest_draw, run_model

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), GlobalFilter(4, 8), nn.Flatten(), nn.Linear(256, 10)
    )
    x = torch.randn(2, 3, 8, 8)
    kw = dict(backward=True, loss_fn=None, seed=0)
    ref = run_model(model, x, device=torch.device("cpu"), policy=get_policy("fp32"), **kw)
    laid_out = copy.deepcopy(model[1])
    lay_out_weights(laid_out, torch.channels_last)
    with pytest.raises(RuntimeError, match="stride"):  # what stopped every check before
        laid_out(torch.randn(2, 4, 8, 8))
    assert honest_draw(model, x, ref, 1, loss_fn=None).meta["memory_format"] is None
    phases = "forward,backward,train"
    honest = align.check(model, x, target_model=perturb(model, 1.0), target="cpu", phases=phases)
    assert honest.passed, honest
    faulty = copy.deepcopy(model)
    with torch.no_grad():
        faulty[1].weight.mul_(1.003)
    report = align.check(model, x, target_model=faulty, target="cpu")
    assert not report.passed and report.culprits[0].module == "1", report


def test_odd_honest_draws_run_in_the_other_layout_with_the_references_choices():
    from align.numerics.precision import get_policy
    from align.record.capture import honest_draw, run_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
    x = torch.randn(2, 3, 12, 12)
    kw = dict(backward=True, loss_fn=None, seed=0)
    ref = run_model(model, x, device=torch.device("cpu"), policy=get_policy("fp32"), **kw)
    draws = [honest_draw(model, x, ref, k, loss_fn=None) for k in (0, 1)]
    assert [d.meta["memory_format"] for d in draws] == [None, "channels_last"]
    assert draws[1].meta["decisions"] == "replayed"
    grads = {k for c in ref.trace.calls for k in (*c.grad_inputs, *c.grad_outputs) if k}
    flow = max(float(ref.trace.tensors[k].norm()) for k in grads)
    for draw in draws:
        for key, t in ref.trace.tensors.items():
            other = draw.tensors[key]
            assert other.shape == t.shape
            # rounding apart; a gradient that cancels (the conv's bias gradient before a
            # BatchNorm, exactly 0) is all rounding of terms as large as the gradients
            # flowing back, summed as a one-pass BatchNorm may (align.numerics.one_pass)
            assert float((other - t).norm()) <= 1e-5 * (float(t.norm()) + flow), key


def test_the_other_layout_keeps_an_image_as_given_and_survives_a_strided_1x1_conv():
    """An image (under 8 channels) is not laid out channels_last for an other-layout draw:
    its first convolution lays it out itself. Laid out, oneDNN's backward of a stride-2 1x1
    convolution over it crashed the process (timm mobileone_s0's stem, torch 2.14.1)."""
    from align.numerics.precision import get_policy
    from align.record.capture import honest_draw, inputs_laid_out, run_model

    image, features = torch.randn(2, 3, 8, 8), torch.randn(2, 16, 8, 8)
    laid = inputs_laid_out((image, features), torch.channels_last)
    assert laid[0] is image
    assert laid[1].is_contiguous(memory_format=torch.channels_last) and not laid[1].is_contiguous()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1, stride=2), nn.BatchNorm2d(16), nn.ReLU())
    x = torch.randn(2, 3, 64, 64)
    kw = dict(backward=True, loss_fn=None, seed=0)
    ref = run_model(model, x, device=torch.device("cpu"), policy=get_policy("fp32"), **kw)
    draw = honest_draw(model, x, ref, 1, loss_fn=None)
    assert draw.meta["memory_format"] == "channels_last"
    assert set(draw.tensors) == set(ref.trace.tensors)


def test_buffers_a_call_writes_are_recorded_before_and_after_it(tmp_path):
    """A train-mode BatchNorm writes its running statistics in place (without bumping the
    version counter): each call records them as they were and as it left them, by name;
    in eval mode, where nothing is written, they are recorded under one key, unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 8, 8)
    trace = align.capture(model, x)
    bn = trace.by_key()[("1", 0)]
    assert bn.buffer_names == ["running_mean", "running_var"]
    before = [trace.tensor(k) for k in bn.buffers_in]
    after = [trace.tensor(k) for k in bn.buffers]
    assert torch.equal(before[0], torch.zeros(4)) and torch.equal(before[1], torch.ones(4))
    feature = model[0](x).detach()
    assert torch.allclose(after[0], 0.1 * feature.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(after[1], 0.9 + 0.1 * feature.var((0, 2, 3)), atol=1e-6)
    assert bn.wrote(0) and bn.wrote(1)
    assert model[1].num_batches_tracked == 0  # the caller's model is left alone
    assert all(not c.buffer_names for c in trace.calls if c.module != "1")
    loaded = align.load_trace(trace.save(tmp_path / "dump"))
    again = loaded.by_key()[("1", 0)]
    assert again.buffer_names == bn.buffer_names
    assert torch.equal(loaded.tensor(again.buffers[1]), after[1])
    frozen = align.capture(model.eval(), x).by_key()[("1", 0)]
    assert frozen.buffer_names == bn.buffer_names and frozen.buffers == frozen.buffers_in
    assert not frozen.wrote(0) and not frozen.wrote(1)


def test_an_honest_draw_records_the_same_written_buffers():
    """Under jitter (every op's result nudged) the copies a call's buffers are compared
    with are still exact: an eval-mode BatchNorm writes nothing in a draw either."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(), nn.BatchNorm2d(4))
    recorder = Recorder(model, backward=False)
    with Jitter(1):
        model(torch.randn(2, 3, 8, 8))
    written = {
        c.module: [n for i, n in enumerate(c.buffer_names) if c.wrote(i)]
        for c in recorder.trace.calls
    }
    assert written == {"": [], "0": [], "1": [], "2": ["running_mean", "running_var"]}


def test_an_honest_draw_records_its_tensors_as_its_run_computed_them():
    """Recording is no op of the run: jitter nudges what the model computes, never the
    copies of it (a nudged copy adds one rounding to every tensor of a draw, and so to
    the honest spread the verdict's limits grow from)."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    computed = {}
    model[1].register_forward_hook(lambda m, args, out: computed.update(out=out))
    recorder = Recorder(model, backward=True)
    x = torch.randn(4, 8, requires_grad=True)
    with Jitter(1):
        model(x).sum().backward()
    tanh = next(c for c in recorder.trace.calls if c.module == "1")
    assert torch.equal(recorder.trace.tensors[tanh.outputs[0]], computed["out"])
    assert torch.equal(recorder.trace.tensors[recorder.trace.calls[0].grad_inputs[0]], x.grad)


def test_an_honest_draws_layout_converts_4d_weights_and_leaves_a_conv3ds():
    """channels_last is a 4-d format: a model with a Conv3d (timm's lambda_resnet26t)
    cannot be `.to(memory_format=channels_last)`, and its draws lay out the rest."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    model.add_module("pos", nn.Conv3d(1, 4, (1, 3, 3)))
    with pytest.raises(RuntimeError, match="rank 4"):
        copy.deepcopy(model).to(memory_format=torch.channels_last)
    lay_out_weights(model, torch.channels_last)
    conv2d, conv3d = model[0].weight, model.pos.weight
    assert conv2d.is_contiguous(memory_format=torch.channels_last) and not conv2d.is_contiguous()
    assert conv3d.is_contiguous()
    lay_out_weights(model, torch.contiguous_format)
    assert conv2d.is_contiguous()


class MessagePassing(nn.Module):
    """Builds its scratch tensors with torch's default dtype (`torch.zeros(n)`), as user
    code does, and index_adds the model's activations into them (no type promotion)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("dst", torch.tensor([0, 2, 2, 1, 0]))

    def forward(self, x):
        h = self.lin(x)
        agg = torch.zeros(3, 4).index_add(0, self.dst, h)
        return agg / (torch.zeros(3).index_add(0, self.dst, torch.ones(5)) + 1)[:, None]


def test_the_golden_builds_a_models_default_dtype_tensors_in_float64():
    model, x = MessagePassing(), torch.randn(5, 4)
    honest = perturb(model, 0.5)  # not bit for bit: every tensor is judged
    report = align.check(model, x, target_model=honest, target="cpu", phases="forward,backward")
    assert report.passed and report.rows
    faulty = copy.deepcopy(model)
    FAULTS["kernel_gain"](faulty, "lin")
    report = align.check(model, x, target_model=faulty, target="cpu", phases="forward")
    assert not report.passed and report.culprits[0].module == "lin"
    assert torch.get_default_dtype() == torch.float32  # put back after the golden run


def test_keep_float64_puts_the_default_dtype_back_when_the_run_raises():
    from align.record.capture import KeepFloat64

    with pytest.raises(RuntimeError), KeepFloat64():
        assert torch.zeros(1).dtype == torch.tensor(0.5).dtype == torch.float64
        raise RuntimeError("the model failed")
    assert torch.get_default_dtype() == torch.float32


def test_keep_float64_runs_an_op_refusing_a_float32_tensor_on_float64_copies():
    # a loss's float32 class weights beside the golden's float64 logits raised "expected
    # scalar type Double but found Float"; an EMA's float32 weights lerped towards float64
    # ones raised "expected dtype float for `end`"
    from align.record.capture import KeepFloat64

    logits, labels = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    weight = torch.tensor([1.0, 2.0, 0.5])
    # (a foreach op's first pair agrees: tried first, it was lerped twice)
    ema, model = [torch.ones(4), torch.ones(4)], [torch.zeros(4), torch.zeros(4).double()]
    out = torch.empty(0)  # an out= tensor the op resizes
    with KeepFloat64():
        loss = F.cross_entropy(logits, labels, weight=weight)
        torch._foreach_lerp_(ema, model, 0.25)
        torch.mm(logits[:2], weight.view(3, 1).expand(3, 2), out=out)
        with pytest.raises(RuntimeError, match="shape") as raised:  # its own error, unchained
            logits @ torch.ones(2, 2)
    assert raised.value.__context__ is None
    assert loss.dtype == torch.float64
    assert loss == F.cross_entropy(logits, labels, weight=weight.double())
    assert all(e.dtype == torch.float32 and torch.equal(e, torch.full((4,), 0.75)) for e in ema)
    assert out.dtype == torch.float32 and out.shape == (2, 2)
    torch.testing.assert_close(out, (logits[:2] @ weight.double().view(3, 1)).float().expand(2, 2))


class Teacher(nn.Module):
    """Calls a child under no_grad on a tensor that requires grad (an EMA teacher's target,
    spectral norm's power iteration)."""

    def __init__(self):
        super().__init__()
        self.student, self.teacher = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.student(x)
        with torch.no_grad():
            target = self.teacher(h)
        return h - target


def test_a_module_called_under_no_grad_on_a_tensor_that_requires_grad_is_recorded():
    model, x = Teacher(), torch.randn(3, 4)
    trace = align.capture(model, x)
    teacher = next(c for c in trace.calls if c.module == "teacher")
    assert teacher.inputs[0] is not None and teacher.grad_inputs == [None]
    student = next(c for c in trace.calls if c.module == "student")
    assert student.grad_outputs[0] is not None


class Checkpointed(nn.Module):
    """A body recomputed in backward (torch.utils.checkpoint, as timm's
    set_grad_checkpointing does), whose recomputation torch stops early by raising."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self.body, x, use_reentrant=False))


def test_a_call_stopped_by_an_exception_leaves_the_stack():
    """Backward's ops belong to the calls whose backward runs, not to the recomputed call
    checkpointing stopped: each ReLU's backward branches are its own call's."""
    from align.numerics.decisions import Decisions

    model, x = Checkpointed(), torch.randn(5, 6, requires_grad=True)
    hooks = Recorder(model, backward=True)
    choices = Decisions(where=hooks.current)
    try:
        with choices:
            model(x).sum().backward()
        calls = hooks.trace.calls
        assert hooks._stack == []  # every call, stopped or not, has left it
        recomputed = [c for c in calls if c.index == 1]
        assert recomputed and all(c.module.startswith("body") for c in recomputed)
        owners = [
            calls[o]
            for (key, _), o in zip(choices.log, choices.owners)
            if key.startswith("aten.threshold_backward")
        ]
        assert len(owners) == 2
        assert [(c.module, c.index) for c in owners] == [("body.3", 0), ("body.1", 0)]
    finally:
        hooks.release()
        hooks.remove()


def test_a_module_that_raises_leaves_the_recorder_usable():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)

        def forward(self, x):
            self.inner(x)
            raise ValueError("data error")

    model = nn.Sequential(Flaky(), nn.Linear(2, 2))
    hooks = Recorder(model, backward=False)
    try:
        with pytest.raises(ValueError):
            model(torch.ones(1, 2))
        assert hooks._stack == [] and hooks.current() is None
        model[1](torch.ones(1, 2))
        assert hooks.trace.calls[-1].module == "1" and hooks.trace.calls[-1].parent is None
    finally:
        hooks.remove()


class _Spectrum(nn.Module):
    """A model returning a complex spectrum, no real output at all."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return torch.fft.rfft(self.lin(x))


def test_a_model_returning_a_complex_spectrum_is_checked_on_its_real_and_imaginary_parts():
    torch.manual_seed(0)
    model, x = _Spectrum(), torch.randn(4, 16)
    honest = align.check(model, x, target_model=perturb(model, 1.0), target="cpu")
    assert honest.passed, honest  # before: "the model returned no floating tensor"
    faulty = copy.deepcopy(model)
    with torch.no_grad():
        faulty.lin.weight.mul_(1.003)
    report = align.check(model, x, target_model=faulty, target="cpu")
    assert not report.passed and report.culprits[0].module == "lin", report


class _NoGradient(torch.autograd.Function):
    """Doubles its input and sends no gradient back (None), as torchvision's box coder
    sends none to the proposals it decodes."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return None


class _Stopped(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, h):
        return self.lin(_NoGradient.apply(h))


class _PartlyStopped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head, self.b = nn.Linear(8, 8), _Stopped(), nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        return self.head(h) + self.b(h)


def test_an_input_whose_gradient_the_op_downstream_leaves_undefined_has_none():
    torch.manual_seed(0)
    model, x = _PartlyStopped(), torch.randn(4, 8)
    trace = align.capture(model, x)
    head = next(c for c in trace.calls if c.module == "head")
    assert head.grad_inputs == [None]
    assert trace.calls[0].grad_outputs[0] is not None
    assert align.check(model, x, target_model=perturb(model, 1.0)).passed
    faulty = copy.deepcopy(model)
    FAULTS["backward_gain"](faulty, "a")
    report = align.check(model, x, target_model=faulty)
    assert not report.passed and "a" in {c.module for c in report.culprits}


def test_autocast_is_read_on_the_device_a_call_computes_on():
    """A call given no tensor reads its weights' device; one given none and holding none,
    or on a device without autocast (meta), counts as under the run's autocast."""
    from align.record.capture import _autocast_on

    with torch.autocast("cpu", enabled=False):
        assert not _autocast_on(nn.Linear(2, 2), [5])
        assert _autocast_on(nn.Identity(), [5])
        assert _autocast_on(nn.Identity(), [torch.empty(2, device="meta")])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _autocast_on(nn.Linear(2, 2), [torch.ones(2)])


def test_dumps_leave_out_an_input_whose_gradient_the_model_makes_nan_on_every_side(tmp_path):
    """A detector's target boxes, whose gradient its loss makes 0 * inf: the reference's
    dump leaves them out and says which, the target's and the golden's taking it from
    there, and the dumps compare (before, the comparison refused the NaN reference)."""
    torch.manual_seed(0)
    model, inputs = BoxLoss(), box_inputs()
    ref = align.capture(model, inputs)
    assert ref.meta["undifferentiated_inputs"] == [1] and ref.calls[0].grad_inputs[1] is None
    ref = align.load_trace(ref.save(tmp_path / "ref"))  # as `align dump --decisions` reads it
    tgt = align.capture(perturb(model, 1.0), inputs, decisions_of=ref)
    gold = align.capture(model, inputs, precision="fp64", decisions_of=ref)
    assert tgt.meta["undifferentiated_inputs"] == gold.meta["undifferentiated_inputs"] == [1]
    assert align.compare(ref, tgt, gold).passed
    ref.meta["undifferentiated_inputs"] = ["boxes"]
    with pytest.raises(TraceError, match="undifferentiated_inputs"):
        align.capture(model, inputs, decisions_of=ref)


def test_a_copy_of_a_module_made_inside_forward_is_not_recorded_and_runs():
    # torch.func's ensemble idiom deep-copies a head inside forward: the copy took the
    # recorder's hooks with it, and deep-copying them raised "Only Tensors created
    # explicitly by the user (graph leaves) support the deepcopy protocol"
    from align.testing.models import USER_MODELS

    model, x = USER_MODELS["ensemble"]()
    trace = align.capture(model, x)
    assert [c.module for c in trace.calls] == ["", "body", "body.0", "body.1"]
    assert not model.heads[0]._forward_hooks  # the capture's hooks are gone after it


def test_tensors_made_under_inference_mode_inside_forward_are_recorded():
    # an inference tensor keeps no version counter: reading it raised "Inference tensors do
    # not track version counter" out of the recording
    from align.testing.models import USER_MODELS

    model, x = USER_MODELS["distiller"]()
    trace = align.capture(model, x)
    teacher = next(c for c in trace.calls if c.module == "teacher")
    torch.testing.assert_close(trace.tensor(teacher.outputs[0]), model.teacher(x))
