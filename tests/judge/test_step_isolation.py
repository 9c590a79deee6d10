"""Culprits from align.Recorder dumps: `align.compare(ref, tgt, golden, model=model)` re-runs
the first failing step's module calls alone in float64 from each side's own records.

A small training loop (conv, BatchNorm, ReLU, dropout, a module with a float argument, a
linear head) is recorded in-process on steps 1 and 2: step 1's weights come from the
`before/` state (step 0 is not recorded), step 2's from step 1's parameters.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

import align
from align.errors import TraceError
from align.judge import steps
from align.judge.step_isolation import _HonestKernel, isolate_step
from align.numerics.jitter import Jitter
from align.numerics.precision import get_policy
from align.numerics.verdict import as_tolerance
from align.record.capture import lay_out_weights
from align.record.loop_dump import LoopDump
from align.record.trace import read_trace
from align.testing import perturb
from align.testing.faults import (
    backward_gain,
    bias_grad_dropped,
    kernel_gain,
    norm_eps,
    norm_grad_no_var,
    norm_momentum,
    output_offset,
    running_var_biased,
    weight_grad_gain,
    weight_via_fp16,
)
from align.testing.loops import fp16_scaled_step
from align.testing.models import OffsetNorm


class Scale(nn.Module):
    def forward(self, x: torch.Tensor, factor: float) -> torch.Tensor:
        return x * factor


class Cast(nn.Module):
    def forward(self, x: torch.Tensor, to: torch.dtype | torch.device) -> torch.Tensor:
        return x.to(to)


class Factor:
    """A user's object as an argument."""

    value = 1.5


class ScaleBy(nn.Module):
    def forward(self, x: torch.Tensor, factor: Factor) -> torch.Tensor:
        return x * factor.value


class Net(nn.Module):
    def __init__(self, cast: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.scale = Scale()
        self.head = nn.Linear(8 * 14, 5)
        self.cast, self.to_device, self.to_float, self.scale_by = cast, Cast(), Cast(), ScaleBy()

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))
        h = self.to_float(self.scale(self.drop(h), 0.5), torch.float32)  # a dtype argument
        if self.cast:  # a device argument; an argument the dump cannot hold: an object
            h = self.scale_by(self.to_device(h, torch.device("cpu")), Factor())
        return self.head(h.flatten(1))


STEPS = [1, 2]


def _train(
    out: Path,
    *,
    fault=None,
    replay=None,
    golden=False,
    jitter=False,
    cast=False,
    bf16=False,
    honest=None,
    draw=None,
    clip=False,
    steps=STEPS,
    accumulate=1,
    set_to_none=True,
):
    torch.manual_seed(0)
    model = Net(cast)
    if fault is not None:
        fault[0](model, fault[1])
    if honest is not None:
        model = honest(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.randn(3, 6, 3, 16, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(2))
    rec = align.Recorder(
        model, out, steps=steps, optimizer=opt, replay=replay, golden=golden, draw=draw
    )
    for step in range(3):
        with rec.step(step):
            for x, y in zip(data[step].chunk(accumulate), targets[step].chunk(accumulate)):
                with torch.autocast("cpu", torch.bfloat16, enabled=bf16 and not golden):
                    with Jitter(step + 1) if jitter else contextlib.nullcontext():
                        loss = nn.functional.cross_entropy(model(x).float(), y)
                (loss / accumulate).backward()
            if clip:  # the gradients the optimizer receives are no longer backward's
                nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("steps")
    _train(root / "ref")
    _train(root / "gold", replay=root / "ref", golden=True)
    _train(root / "honest", replay=root / "ref", jitter=True)
    return root


def _compare(dumps: Path, target: str, model: nn.Module | None = None) -> align.Report:
    return align.compare(dumps / "ref", dumps / target, dumps / "gold", model=model or Net())


def test_an_honest_target_passes_and_every_module_passes_alone(dumps):
    assert _compare(dumps, "honest").passed
    ref, honest = LoopDump(dumps / "ref"), LoopDump(dumps / "honest")
    tol = as_tolerance(None, get_policy("fp32"))
    for n in STEPS:
        weights = [d.weights_before(0, n) for d in (ref, honest)]
        rows, culprits, notes = isolate_step(
            Net(), ref.load(0, n), honest.load(0, n), weights, tol, strict_dtype=True
        )
        assert culprits == [] and not [r for r in rows if r.failed], notes
        judged = {(r.module, r.phase) for r in rows}
        for module in ("conv", "norm", "drop", "scale", "to_float", "head"):
            assert (module, "forward") in judged, (n, sorted(judged))
        assert ("norm", "backward") in judged and ("drop", "backward") in judged
        # each called once, its weights its own: their gradients are judged per call
        assert {"conv", "norm", "head"} <= {m for m, phase in judged if phase == "param_grad"}


@pytest.mark.parametrize(
    "fault, site",
    [
        (kernel_gain, "conv"),  # a forward 0.3% off
        (backward_gain, "norm"),  # an exact forward, a backward 1% off
        (norm_eps, "norm"),  # another eps: wrong given its own inputs
        (output_offset, "head"),  # a bias bug of 0.2% of the output's RMS
        (running_var_biased, "norm"),  # exact outputs, a running statistic wrong
        (weight_grad_gain, "conv"),  # exact outputs, a weight gradient 1% off
        (bias_grad_dropped, "head"),  # a bias gradient forgotten
    ],
)
def test_a_faulty_module_is_named_from_the_dumps(dumps, tmp_path, fault, site):
    _train(tmp_path / "bad", fault=(fault, site), replay=dumps / "ref")
    report = align.compare(dumps / "ref", tmp_path / "bad", dumps / "gold", model=Net())
    assert not report.passed
    assert [c.module for c in report.culprits][:1] == [site], str(report)
    assert report.culprits[0].tensor.startswith("step 1 "), str(report)
    assert any(r.isolated and r.failed for r in report.local_rows)
    without = align.compare(dumps / "ref", tmp_path / "bad", dumps / "gold")
    assert without.culprits == [] and not without.local_rows  # no model: nothing re-run


def test_weights_that_load_differently_fail_before_the_first_step(dumps, tmp_path):
    """Recorded from the run's first step, weights that load differently fail before it;
    after an unrecorded step the target took the reference's, and a note says how far out
    of line what it carried was."""
    fault = (weight_via_fp16, "conv")
    _train(tmp_path / "ref", steps=[0, 1])
    _train(tmp_path / "gold", replay=tmp_path / "ref", golden=True, steps=[0, 1])
    _train(tmp_path / "bad", fault=fault, replay=tmp_path / "ref", steps=[0, 1])
    report = align.compare(tmp_path / "ref", tmp_path / "bad", tmp_path / "gold", model=Net())
    first = report.first_divergence
    assert (first.module, first.phase, first.tensor) == (
        "conv",
        "weights",
        "step 0 conv.weight before the step",
    ), str(report)
    assert report.culprits == []  # each module computes right with the weights it was given
    _train(tmp_path / "later", fault=fault, replay=dumps / "ref")
    later = align.compare(dumps / "ref", tmp_path / "later", dumps / "gold")
    assert later.passed  # what it carried is not judged: it runs from the reference's
    assert any("after 1 unrecorded steps" in n and "most out of line" in n for n in later.notes)


def test_calls_that_cannot_be_rebuilt_and_a_foreign_model_are_notes(dumps, tmp_path):
    _train(tmp_path / "ref", cast=True)
    _train(tmp_path / "gold", replay=tmp_path / "ref", golden=True, cast=True)
    _train(tmp_path / "bad", fault=(kernel_gain, "conv"), replay=tmp_path / "ref", cast=True)
    report = align.compare(
        tmp_path / "ref", tmp_path / "bad", tmp_path / "gold", model=Net(cast=True)
    )
    assert [c.module for c in report.culprits][:1] == ["conv"], str(report)
    assert any("not re-run alone: 1 x an argument of type Factor" in n for n in report.notes)
    assert ("to_device", "forward") in {(r.module, r.phase) for r in report.local_rows}

    foreign = nn.Sequential(nn.Linear(2, 2))
    report = align.compare(tmp_path / "ref", tmp_path / "bad", tmp_path / "gold", model=foreign)
    assert not report.passed and report.culprits == []
    assert any("the model given is not the one recorded" in n for n in report.notes), report.notes


def test_a_crafted_call_record_is_a_trace_error(dumps, tmp_path):
    _train(tmp_path / "bad", fault=(kernel_gain, "conv"), replay=dumps / "ref")
    manifest = tmp_path / "bad" / "rank0" / "step000001" / "trace" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["meta"]["calls"][1] = {"in": {"os.system": [0]}, "in_leaves": ["rm -rf /"]}
    manifest.write_text(json.dumps(data))
    with pytest.raises(TraceError, match="a call's arguments are malformed"):
        align.compare(dumps / "ref", tmp_path / "bad", dumps / "gold", model=Net())


def test_the_command_line_names_the_culprit_with_the_users_model_factory(dumps, tmp_path):
    _train(tmp_path / "bad", fault=(kernel_gain, "conv"), replay=dumps / "ref")
    (tmp_path / "train.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_step_isolation import Net\n\n\ndef build_model():\n    return Net()\n"
    )

    def cli(*more: str) -> subprocess.CompletedProcess:
        args = [dumps / "ref", tmp_path / "bad", "--golden", dumps / "gold", *more]
        return subprocess.run(
            [sys.executable, "-m", "align.compare", *map(str, args)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )

    named = cli("--model", "train:build_model")
    assert named.returncode == 1, named.stderr
    culprits = named.stdout.split("culprits (wrong on their own, each re-run alone):\n")[-1]
    assert culprits.splitlines()[1].split()[:4] == ["conv", "forward", "step", "1"], named.stdout
    for bad, message in [
        ("train", "give MODULE:FUNCTION"),
        ("train:nothing", "AttributeError"),
        ("nowhere:build", "ModuleNotFoundError: No module named 'nowhere'"),
    ]:
        wrong = cli("--model", bad)
        assert wrong.returncode == 2 and message in wrong.stderr, wrong.stderr
        assert "Traceback" not in wrong.stderr


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> Path:
    """An AMP (bf16 autocast) script: reference, golden, two honest draws of the reference
    and an honest target whose accumulating kernels round one ulp otherwise."""
    root = tmp_path_factory.mktemp("bf16")
    _train(root / "ref", bf16=True)
    _train(root / "gold", replay=root / "ref", golden=True, bf16=True)
    for n in (1, 2):
        _train(root / "ref", bf16=True, draw=n)
    _train(root / "honest", replay=root / "ref", bf16=True, honest=partial(perturb, ulps=1.0))
    return root


def test_under_bf16_an_honest_target_passes_and_a_hidden_fault_is_named(bf16, tmp_path):
    honest = align.compare(bf16 / "ref", bf16 / "honest", bf16 / "gold", model=Net())
    assert honest.passed and honest.local_rows, str(honest)
    for fault, site in [(norm_eps, "norm"), (kernel_gain, "conv")]:
        _train(tmp_path / site, fault=(fault, site), replay=bf16 / "ref", bf16=True)
        report = align.compare(bf16 / "ref", tmp_path / site, bf16 / "gold", model=Net())
        # bf16's noise may hide it from the whole network; alone, the module is wrong
        assert not report.passed, str(report)
        assert [c.module for c in report.culprits][:1] == [site], str(report)


class Residual(nn.Module):
    """relu_(fc2(relu(fc1(x))) + x): in-place ReLUs whose inputs honest bf16 rounding
    puts on the other side of zero, the outer one the block's output too."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(256, 256), nn.Linear(256, 256)
        self.act1, self.act2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act2(self.fc2(self.act1(self.fc1(x))) + x)


def _flipping(out: Path, replay=None, golden: bool = False, honest=None, draw=None):
    torch.manual_seed(0)
    model = nn.Sequential(Residual(), Residual(), nn.Linear(256, 4))
    model = honest(model) if honest is not None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(1))
    with align.Recorder(
        model, out, steps=[0, 1], optimizer=opt, replay=replay, golden=golden
    ) as rec:
        for n in range(2):
            with rec.step(n):
                with torch.autocast("cpu", torch.bfloat16, enabled=not golden):
                    loss = model(data[n]).float().square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()


def test_a_target_that_took_the_references_branches_is_re_run_with_them(tmp_path):
    """The honest target replays the reference's ReLU branches (forward and backward):
    alone, each call re-runs with the branches it took, not its own on its inputs."""
    _flipping(tmp_path / "ref")
    _flipping(tmp_path / "gold", tmp_path / "ref", golden=True)
    for n in (1, 2):  # honest draws of the reference: the whole steps' spread
        _flipping(tmp_path / "ref", draw=n)
    _flipping(tmp_path / "honest", tmp_path / "ref", honest=partial(perturb, ulps=1.0))
    flipped = LoopDump(tmp_path / "honest").load(0, 1).trace.meta["decisions_differed"]
    assert "relu" in flipped, flipped  # branches honest rounding flipped were replayed
    model = nn.Sequential(Residual(), Residual(), nn.Linear(256, 4))
    report = align.compare(tmp_path / "ref", tmp_path / "honest", tmp_path / "gold", model=model)
    assert report.culprits == [] and not [r for r in report.local_rows if r.failed], str(report)
    judged = {(r.module, r.phase) for r in report.local_rows}
    assert {("0.act2", "forward"), ("0.act2", "backward"), ("1.act1", "backward")} <= judged


def test_a_weight_gradient_fault_is_named_under_gradient_clipping(tmp_path):
    """The Recorder keeps each gradient as backward wrote it, before the clipping."""
    _train(tmp_path / "ref", clip=True)
    _train(tmp_path / "gold", replay=tmp_path / "ref", golden=True, clip=True)
    _train(tmp_path / "bad", fault=(weight_grad_gain, "conv"), replay=tmp_path / "ref", clip=True)
    report = align.compare(tmp_path / "ref", tmp_path / "bad", tmp_path / "gold", model=Net())
    assert [c.module for c in report.culprits][:1] == ["conv"], str(report)
    assert report.culprits[0].phase == "param_grad"


def test_a_weight_gradient_fault_is_named_where_the_script_zeroes_gradients_in_place(tmp_path):
    """`zero_grad(set_to_none=False)` leaves zeros in `.grad`: backward's gradient is
    still its own (it was judged nowhere, and no culprit was named)."""
    _train(tmp_path / "ref", set_to_none=False)
    _train(tmp_path / "gold", replay=tmp_path / "ref", golden=True, set_to_none=False)
    bad = (weight_grad_gain, "conv")
    _train(tmp_path / "bad", fault=bad, replay=tmp_path / "ref", set_to_none=False)
    report = align.compare(tmp_path / "ref", tmp_path / "bad", tmp_path / "gold", model=Net())
    assert [c.module for c in report.culprits][:1] == ["conv"], str(report)
    assert report.culprits[0].phase == "param_grad"


def test_a_weight_gradient_fault_is_named_where_micro_batches_accumulate(tmp_path):
    """Each call's backward is its own, though its gradient is accumulated into by the
    next micro-batch's: the first call's, taken before the second call, is judged alone."""
    _train(tmp_path / "ref", accumulate=2)
    _train(tmp_path / "gold", replay=tmp_path / "ref", golden=True, accumulate=2)
    _train(tmp_path / "honest", replay=tmp_path / "ref", jitter=True, accumulate=2)
    honest = align.compare(tmp_path / "ref", tmp_path / "honest", tmp_path / "gold", model=Net())
    assert honest.passed, str(honest)
    judged = {(r.module, r.call, r.phase) for r in honest.local_rows}
    assert ("conv", 0, "param_grad") in judged and ("conv", 1, "param_grad") not in judged
    bad = (weight_grad_gain, "conv")
    _train(tmp_path / "bad", fault=bad, replay=tmp_path / "ref", accumulate=2)
    report = align.compare(tmp_path / "ref", tmp_path / "bad", tmp_path / "gold", model=Net())
    assert [c.module for c in report.culprits][:1] == ["conv"], str(report)
    assert report.culprits[0].phase == "param_grad"


Scales = collections.namedtuple("Scales", ["gain", "offset"])


class Mix(nn.Module):
    """Takes its features in an OrderedDict (as torchvision's FPN does) and its constants
    in a namedtuple; `error`, a gain of its own computation (a fault)."""

    def __init__(self, error: float = 1.0):
        super().__init__()
        self.lin, self.error = nn.Linear(8, 8), error

    def forward(self, feats: collections.OrderedDict, scales: Scales) -> torch.Tensor:
        return self.lin(feats["h"]) * (scales.gain * self.error) + scales.offset


class MixNet(nn.Module):
    def __init__(self, error: float = 1.0):
        super().__init__()
        self.inp, self.mix, self.head = nn.Linear(4, 8), Mix(error), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.head(self.mix(collections.OrderedDict(h=h), Scales(0.5, 0.1)))


def _mix_run(out: Path, replay=None, golden=False, error=1.0) -> None:
    torch.manual_seed(0)
    model = MixNet(error)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))
    recorder = align.Recorder(model, out, steps=[0, 1], optimizer=opt, replay=replay, golden=golden)
    with recorder as rec:
        for n in range(2):
            with rec.step(n):
                model(data[n]).square().mean().backward()
                opt.step()
                opt.zero_grad()


def test_a_call_given_an_ordered_dict_and_a_namedtuple_is_re_run_alone(tmp_path):
    _mix_run(tmp_path / "ref")
    _mix_run(tmp_path / "gold", replay=tmp_path / "ref", golden=True)
    _mix_run(tmp_path / "bad", replay=tmp_path / "ref", error=1.003)
    report = align.compare(tmp_path / "ref", tmp_path / "bad", tmp_path / "gold", model=MixNet())
    assert [c.module for c in report.culprits][:1] == ["mix"], str(report)
    assert ("mix", "forward") in {(r.module, r.phase) for r in report.local_rows}
    assert not any("not re-run" in n for n in report.notes), report.notes


@dataclasses.dataclass(frozen=True)
class Features:
    h: torch.Tensor
    scale: float


@dataclasses.dataclass
class Gated:
    y: torch.Tensor


class Gate(nn.Module):
    """Takes its features and returns its result in dataclasses; `error`, a gain of its own
    computation (a fault)."""

    def __init__(self, error: float = 1.0):
        super().__init__()
        self.lin, self.error = nn.Linear(8, 8), error

    def forward(self, feats: Features) -> Gated:
        return Gated(torch.sigmoid(self.lin(feats.h)) * feats.h * (feats.scale * self.error))


class GateNet(nn.Module):
    def __init__(self, error: float = 1.0):
        super().__init__()
        self.inp, self.gate, self.head = nn.Linear(4, 8), Gate(error), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(Features(torch.tanh(self.inp(x)), 0.5)).y)


def _gate_run(out: Path, replay=None, golden=False, error=1.0) -> None:
    torch.manual_seed(0)
    model = GateNet(error)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    recorder = align.Recorder(model, out, steps=[0], optimizer=opt, replay=replay, golden=golden)
    with recorder as rec, rec.step(0):
        model(data).square().mean().backward()
        opt.step()


def test_a_call_given_and_returning_dataclasses_is_recorded_and_re_run_alone(tmp_path):
    """The tensors a dataclass holds are the call's inputs and outputs, with their
    gradients; the call is re-run from the dump with a dataclass of the same name and
    fields made anew, and a 0.3% gain in it is named."""
    _gate_run(tmp_path / "ref")
    _gate_run(tmp_path / "gold", replay=tmp_path / "ref", golden=True)
    _gate_run(tmp_path / "bad", replay=tmp_path / "ref", error=1.003)
    trace = read_trace(tmp_path / "ref" / "rank0" / "step000000" / "trace")
    gate = next(c for c in trace.calls if c.module == "gate")
    assert gate.inputs[0] is not None and gate.outputs[0] is not None
    assert gate.grad_inputs[0] is not None and gate.grad_outputs[0] is not None
    report = align.compare(tmp_path / "ref", tmp_path / "bad", tmp_path / "gold", model=GateNet())
    assert [c.module for c in report.culprits][:1] == ["gate"], str(report)
    gate_rows = {(r.phase, r.tensor) for r in report.local_rows if r.module == "gate"}
    assert {("forward", "output[0]"), ("backward", "grad_input[0]")} <= gate_rows
    assert not any("not re-run" in n for n in report.notes), report.notes


class ZeroMean(nn.Module):
    """A BatchNorm fed a 1x1 convolution of another BatchNorm's zero-mean channels: its
    batch mean, and so its running mean, is rounding noise."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.pw, self.bn2 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn2(self.pw(self.bn(self.conv(x))))).mean((2, 3)))


def _zero_mean_run(
    out: Path, replay=None, golden=False, channels_last=False, fault=None, draw=None
):
    torch.manual_seed(0)
    model = ZeroMean()
    if fault is not None:
        fault[0](model, fault[1])
    x = torch.randn(8, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    if channels_last:  # the CPU's channels_last BatchNorm sums its statistics in fp32
        lay_out_weights(model, torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = align.Recorder(
        model, out, steps=[0], optimizer=opt, replay=replay, golden=golden, draw=draw
    )
    with recorder as rec:
        with rec.step(0):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()


@pytest.mark.usefixtures("one_thread")
def test_a_running_mean_of_rounding_noise_summed_in_another_order_passes(tmp_path):
    """The reference's contiguous BatchNorm sums its batch mean more accurately than fp32;
    an honest channels_last target's running mean of a zero-mean channel is then all
    rounding (cos_err 0.34 where the reference's is 1e-16) and passes in isolation; a
    momentum fault on the BatchNorm whose mean carries signal is still named. The same
    kernel's input gradient cancels to 0.45 of its grad_output's sums: its offset, 0.67
    sqrt(n) roundoffs of them with one thread, is allowed in their units
    (isolation.statistics_span), and a forgotten variance term there is still named."""
    _zero_mean_run(tmp_path / "ref")
    for k in (1, 2):  # honest draws: the whole network's channels_last spread
        _zero_mean_run(tmp_path / "ref", draw=k)
    _zero_mean_run(tmp_path / "gold", replay=tmp_path / "ref", golden=True)
    _zero_mean_run(tmp_path / "cl", replay=tmp_path / "ref", channels_last=True)
    honest = align.compare(tmp_path / "ref", tmp_path / "cl", tmp_path / "gold", model=ZeroMean())
    means = [r for r in honest.local_rows if r.tensor == "buffer running_mean"]
    assert {r.module for r in means} == {"bn", "bn2"}
    assert honest.passed, str(honest)
    for fault, name in ((norm_momentum, "bn"), (norm_grad_no_var, "bn2")):
        _zero_mean_run(tmp_path / "bad", replay=tmp_path / "ref", fault=(fault, name))
        bad = align.compare(tmp_path / "ref", tmp_path / "bad", tmp_path / "gold", model=ZeroMean())
        assert [c.module for c in bad.culprits][:1] == [name], str(bad)


class LateBlock(nn.Module):
    """A residual block whose last BatchNorm starts at zero weight (timm's
    zero_init_last): its convolution's gradient is zero in the first step."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Linear(4, 8), nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        nn.init.zeros_(self.bn.weight)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(h + self.bn(self.conv(h))))


def _late_run(out: Path, replay=None, golden=False, fault=None) -> None:
    torch.manual_seed(0)
    model = LateBlock()
    if fault is not None:
        fault(model, "conv")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data = torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(1))
    recorder = align.Recorder(
        model, out, steps=[0, 1, 2], optimizer=opt, replay=replay, golden=golden
    )
    with recorder as rec:
        for n in range(3):
            with rec.step(n):
                model(data[n]).square().mean().backward()
                opt.step()
                opt.zero_grad()


def test_where_no_step_fails_each_step_is_isolated_until_one_names_a_culprit(tmp_path, monkeypatch):
    """A weight-gradient fault behind a zero-initialized BatchNorm acts from step 1 on.
    Where the whole network shows nothing (bf16's noise can hide it; here every row is
    passed to make it so), step 0 alone names no one, and step 1 names the module."""
    _late_run(tmp_path / "ref")
    _late_run(tmp_path / "gold", replay=tmp_path / "ref", golden=True)
    _late_run(tmp_path / "bad", replay=tmp_path / "ref", fault=weight_grad_gain)
    judge_step = steps._judge_step

    def quiet(*args, **kwargs):
        rows = judge_step(*args, **kwargs)
        for row in rows:
            row.failed = []
        return rows

    monkeypatch.setattr(steps, "_judge_step", quiet)
    report = align.compare(tmp_path / "ref", tmp_path / "bad", tmp_path / "gold", model=LateBlock())
    assert [(c.module, c.tensor.split()[:2]) for c in report.culprits][:1] == [
        ("conv", ["step", "1"])
    ], str(report)
    assert not any(r.tensor.startswith("step 2") for r in report.local_rows)  # it stops there
    honest = align.compare(tmp_path / "ref", tmp_path / "ref", tmp_path / "gold", model=LateBlock())
    assert honest.passed and not honest.culprits


def _offset_run(out: Path, replay=None, golden=False, channels_last=False, draw=None, fault=None):
    torch.manual_seed(0)
    model = OffsetNorm(3.0)  # mean / std about 6
    if fault is not None:
        fault(model, "bn")
    x = torch.randn(8, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    if channels_last:
        lay_out_weights(model, torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = align.Recorder(
        model, out, steps=[0], optimizer=opt, replay=replay, golden=golden, draw=draw
    )
    with recorder as rec, rec.step(0):
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.usefixtures("one_thread")
def test_a_batch_norm_of_inputs_far_from_zero_mean_summed_in_one_pass_passes(tmp_path):
    """The CPU's channels_last BatchNorm sums each channel's mean in one chain, as Ascend's
    sums x and x^2: at input mean / std 6 its output and input gradient are offset per
    channel far beyond a contiguous reference's error (they failed rel_rmse and share in
    isolation). The one-pass draw (align.numerics.one_pass) bounds them, and a wrong
    kernel in that layout is still named."""
    _offset_run(tmp_path / "ref")
    for k in (1, 2):
        _offset_run(tmp_path / "ref", draw=k)
    _offset_run(tmp_path / "gold", replay=tmp_path / "ref", golden=True)
    _offset_run(tmp_path / "cl", replay=tmp_path / "ref", channels_last=True)
    model = OffsetNorm(3.0)
    honest = align.compare(tmp_path / "ref", tmp_path / "cl", tmp_path / "gold", model=model)
    assert honest.passed, str(honest)
    for fault in (norm_eps, norm_grad_no_var, kernel_gain):
        out = tmp_path / fault.__name__
        _offset_run(out, replay=tmp_path / "ref", channels_last=True, fault=fault)
        report = align.compare(tmp_path / "ref", out, tmp_path / "gold", model=model)
        assert [c.module for c in report.culprits] == ["bn"], (fault.__name__, str(report))


def test_an_honest_kernel_re_runs_an_fp16_backward_at_the_loops_loss_scale(tmp_path):
    """The honest kernel re-runs a call at the dump's precision: under fp16 with a
    GradScaler it scales the recorded (unscaled) gradients back, as the loop ran, and
    unscales what it returns; at scale 1 the fp16 gradients would be mostly subnormal."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 4))
    fp16_scaled_step(model, tmp_path / "d", scale=65536.0)
    dump = LoopDump(tmp_path / "d")
    step, weights = dump.load(0, 0), dump.weights_before(0, 0)
    pos = next(i for i, c in enumerate(step.trace.calls) if c.module == "0")
    exact = step.trace.tensor(step.trace.meta["backward_grads"]["0.weight"]).double()
    honest = _HonestKernel(model, step, weights, get_policy("amp-fp16"))(
        pos, "param_grad", "weight"
    )
    assert honest is not None and honest.dtype == torch.float32
    error = (honest.double() - exact).norm() / exact.norm()
    assert error < 5e-3, error  # fp16 roundings; flushed to subnormals it is several percent


class Recurrent(nn.Module):
    """One cell applied at every time step: its weight gradient is the sum of its calls'."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.Linear(4 + 8, 8), nn.Linear(8, 5)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(torch.cat([x[:, t], h], 1)))
        return self.head(h)


def _recurrent(out: Path, *, fault=None, replay=None, golden=False, jitter=False):
    torch.manual_seed(0)
    model = Recurrent()
    if fault is not None:
        fault(model, "cell")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    with align.Recorder(
        model, out, steps=[0, 1], optimizer=opt, replay=replay, golden=golden
    ) as rec:
        for step in range(2):
            x, y = torch.randn(6, 5, 4, generator=gen), torch.randint(0, 5, (6,), generator=gen)
            with rec.step(step):
                with Jitter(step + 1) if jitter else contextlib.nullcontext():
                    nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()


@pytest.mark.parametrize("fault", [weight_grad_gain, bias_grad_dropped])
def test_a_weight_gradient_fault_in_a_cell_called_at_every_time_step_is_named(tmp_path, fault):
    """One backward sums the cell's five calls' gradients: judged against the sum of their
    replays (before: caught on the step's own rows, no culprit named)."""
    _recurrent(tmp_path / "ref")
    _recurrent(tmp_path / "gold", replay=tmp_path / "ref", golden=True)
    _recurrent(tmp_path / "honest", replay=tmp_path / "ref", jitter=True)
    honest = align.compare(
        tmp_path / "ref", tmp_path / "honest", tmp_path / "gold", model=Recurrent()
    )
    assert honest.passed, str(honest)
    assert ("cell", 0, "param_grad") in {(r.module, r.call, r.phase) for r in honest.local_rows}
    _recurrent(tmp_path / "bad", fault=fault, replay=tmp_path / "ref")
    report = align.compare(tmp_path / "ref", tmp_path / "bad", tmp_path / "gold", model=Recurrent())
    assert [c.module for c in report.culprits][:1] == ["cell"], str(report)
    assert report.culprits[0].phase == "param_grad"
