"""Isolation (align.judge.isolation): what an isolated call is given."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import align
from align.judge.isolation import _Payload, _Replay, statistics_span
from align.numerics.jitter import Jitter
from align.record.trace import Call, Trace
from align.testing import FAULTS, perturb, with_threads


def test_an_honest_draw_isolates_a_container_on_its_childrens_records_as_they_are():
    """A replayed child's outputs are records, not ops of the run: a draw's jitter nudges
    what the container computes, not them (a nudged record adds one rounding to every
    input of the container, and so to the honest spread its limits grow from)."""
    recorded = torch.randn(100)
    feed = torch.randn(1, requires_grad=True)
    with Jitter(3):
        (replayed,) = _Replay.apply(_Payload([recorded], [None], [True]), feed)
        nudged = recorded * 1.0
    assert torch.equal(replayed, recorded)
    assert not torch.equal(nudged, recorded)  # the jitter is on: a computed op is nudged


def _batch_norm_call(dy: torch.Tensor, mean: float = 0.0) -> tuple[Trace, Call, torch.Tensor]:
    """A train-mode BatchNorm's call on channels of this mean, with its exact input gradient."""
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = (x - x.mean((0, 2, 3), keepdim=True)) * 3.0 + mean
    bn = torch.nn.BatchNorm2d(4).double()
    xg = x.clone().requires_grad_(True)
    y = bn(xg)
    (dx,) = torch.autograd.grad(y, xg, dy)
    tensors = {"x": x, "y": y.detach(), "dy": dy}
    call = Call("bn", 0, "BatchNorm2d", None, ["x"], ["y"], ["dy"], ["dx"])
    return Trace([call], tensors), call, dx


def test_an_input_gradient_that_cancels_is_allowed_its_grad_outputs_summation_order():
    """A BatchNorm's input gradient is offset by the rounding of mean(dy) and mean(dy x),
    sums of its grad_output carried through the forward gain 1 / 3: where dy is mostly
    a per-channel constant the input gradient cancels it, and the allowance is in dy's
    units; an input gradient that cancels nothing is allowed its own, and a computation
    without statistics none."""
    ran = {"native_batch_norm", "native_batch_norm_backward"}
    noise = torch.randn(8, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    trace, call, dx = _batch_norm_call(10.0 + noise)  # dx keeps only the noise's part
    span = statistics_span(ran, trace, call, "grad_input[0]", dx)
    assert 6.0 < span < 15.0  # rms(dy) / (3 rms(dx)): 10 / 1, less what the gradient keeps
    far = _batch_norm_call(10.0 + noise, mean=30.0)  # the gain is |weight| / std all the same
    assert statistics_span(ran, *far[:2], "grad_input[0]", far[2]) == pytest.approx(span)
    assert statistics_span(ran, trace, call, "output[0]", trace.tensor("y")) == 1.0
    assert statistics_span({"convolution"}, trace, call, "grad_input[0]", dx) == 0.0
    trace, call, dx = _batch_norm_call(noise)
    assert statistics_span(ran, trace, call, "grad_input[0]", dx) < 1.2  # (its projection)


@dataclasses.dataclass(frozen=True)
class Carried:
    h: torch.Tensor
    scale: float


class Scaled(torch.nn.Module):
    def __init__(self, error: float):
        super().__init__()
        self.lin, self.error = torch.nn.Linear(8, 8), error

    def forward(self, carried: Carried) -> Carried:
        return Carried(self.lin(carried.h) * carried.scale * self.error, carried.scale)


class CarryingNet(torch.nn.Module):
    def __init__(self, error: float = 1.0):
        super().__init__()
        self.inp, self.scaled, self.head = (
            torch.nn.Linear(4, 8),
            Scaled(error),
            torch.nn.Linear(8, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.scaled(Carried(self.inp(x), 0.5)).h))


def test_a_module_given_a_dataclass_is_isolated_and_named():
    """align.check records the tensors a dataclass carries into and out of a call, so the
    call is re-run alone on them and a 0.3% gain in it is named."""
    torch.manual_seed(0)
    model, wrong = CarryingNet(), CarryingNet(1.003)
    wrong.load_state_dict(model.state_dict())
    report = align.check(model, torch.randn(16, 4), target_model=wrong)
    assert [c.module for c in report.culprits] == ["scaled"], str(report)
    judged = {(r.phase, r.tensor) for r in report.local_rows if r.module == "scaled"}
    assert {("forward", "output[0]"), ("backward", "grad_input[0]")} <= judged


class DepthwiseBeforeNorm(torch.nn.Module):
    """A depthwise 1x1 conv before a train-mode BatchNorm (fastvit's RepMixer scale
    branch): the norm undoes any per-channel scale, so the conv's weight gradient cancels
    to eps-sized terms, a sum that another summation order moves by its own size."""

    def __init__(self, c: int = 48):
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, c, 3, padding=1)
        self.dw = torch.nn.Conv2d(c, c, 1, groups=c, bias=False)
        self.bn = torch.nn.BatchNorm2d(c)
        self.head = torch.nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.dw(self.conv0(x))).relu().mean((2, 3)))


@pytest.mark.usefixtures("one_thread")  # the reference sums with one thread, the target two
@pytest.mark.parametrize("seed", [0, 3])
def test_a_cancelling_weight_gradient_is_allowed_another_layouts_summation_order(seed):
    """Isolated draws alternate the layout, as whole-network ones do: a target summing
    the cancelling weight gradient with two threads was 2x to 4x the reference's and its
    jittered draws' error (a false alarm at 7 of 8 seeds and sizes); a 1% gain of that
    weight gradient still fails and is named."""
    torch.manual_seed(seed)
    model = DepthwiseBeforeNorm().train()
    x = 30 * torch.randn(2, 3, 16, 16)
    honest = align.check(model, x, target_model=with_threads(model, 2), target="cpu")
    assert honest.passed, honest
    faulty = copy.deepcopy(model)
    FAULTS["weight_grad_gain"](faulty, "dw")
    report = align.check(model, x, target_model=faulty, target="cpu")
    assert not report.passed and report.culprits[0].module == "dw"


class Gain(torch.nn.Module):
    """A child called with no tensor: it returns a value made of its own parameter."""

    def __init__(self):
        super().__init__()
        self.g = torch.nn.Parameter(torch.linspace(0.5, 1.5, 16))

    def forward(self):
        return self.g * 2


class GainedLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.gain = torch.nn.Linear(16, 16), Gain()

    def forward(self, x):
        return self.lin(x) * self.gain()


class _Louder(torch.autograd.Function):
    """Identity forward; backward 1% too large."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


class WrongGainGradient(GainedLinear):
    """Sends the gain 1% too much gradient: its own backward is wrong, not the child's."""

    def forward(self, x):
        return self.lin(x) * _Louder.apply(self.gain())


def test_the_gradient_a_module_sends_a_child_fed_no_tensor_is_judged():
    # a spectral norm's weight is such a child's output: without an anchor the replayed
    # child is a constant, and a wrong gradient sent to it was judged nowhere
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), GainedLinear(), torch.nn.Linear(16, 4))
    target = copy.deepcopy(model)
    target[1].__class__ = WrongGainGradient
    x = torch.randn(4, 8)
    report = align.check(model, x, target_model=target, target="cpu", phases="forward,backward")
    assert report.culprits and report.culprits[0].module == "1", str(report)
    assert report.culprits[0].tensor == "grad_to:1.gain[0]"


class _Kept(torch.nn.Module):
    """Post-processing: boxes and scores from raw outputs, NMS, the kept ones' scores. A
    `wrong` kernel computes overlaps with a +1.5 px box convention."""

    def __init__(self, wrong: bool = False):
        super().__init__()
        self.wrong = wrong

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torchvision

        xy, wh = raw[:, :2] * 20, raw[:, 2:4].exp() * 6
        boxes, scores = torch.cat([xy - wh / 2, xy + wh / 2], 1), raw[:, 4].sigmoid()
        seen = boxes.detach()
        if self.wrong:
            seen = torch.cat([seen[:, :2], seen[:, 2:] + 1.5], 1)
        keep = torchvision.ops.nms(seen, scores.detach(), 0.5)
        mask = torch.zeros_like(scores).index_fill(0, keep, 1.0)
        return scores * mask, boxes * mask[:, None]


def test_a_kernel_that_chooses_otherwise_far_from_a_tie_is_named_though_its_choices_replay():
    # the whole run replays the reference's kept boxes, so the target's values were the
    # reference's bit for bit: the check said ALIGNED without isolating anything
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 5), _Kept()).eval()
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    for target in (with_threads(model), perturb(model, 1.0)):
        honest = align.check(model, x, target_model=target, target="cpu")
        assert honest.passed, str(honest)
    wrong = copy.deepcopy(model)
    wrong[1].wrong = True
    report = align.check(model, x, target_model=wrong, target="cpu")
    assert not report.passed
    assert [(c.module, c.metric) for c in report.culprits] == [("1", "choice_gap")], str(report)


class _Float32Head(nn.Module):
    """A body under the run's autocast and a head that turns it off and computes in
    float32, as detection heads and losses do."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.SiLU())
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, 12)

    def forward(self, x):
        h = self.body(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.head(self.norm(h.float()))


@pytest.mark.parametrize("precision", ["amp-bf16", "amp-fp16"])
def test_a_call_made_with_autocast_off_is_isolated_with_it_off(precision):
    """Isolated under the run's autocast, the float32 head ran in half precision, and a
    0.3% gain there was lost in its rounding: the check failed and named no module."""
    torch.manual_seed(0)
    model, x = _Float32Head(), torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    assert align.check(model, x, target_model=perturb(model, 1.0), precision=precision).passed
    for fault in ("kernel_gain", "fp16_kernel"):
        faulty = copy.deepcopy(model)
        FAULTS[fault](faulty, "head")
        report = align.check(model, x, target_model=faulty, precision=precision)
        assert not report.passed and [c.module for c in report.culprits] == ["head"], report


class _ViewEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 2, 2)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # a view, as timm's PatchEmbed returns


class _Gain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


class _WritesTheView(nn.Module):
    """Writes its child's output (a view) in place, which loses the gradient hook on it:
    no gradient is recorded for that output, though backward sends one through it."""

    def __init__(self, faulty: bool = False):
        super().__init__()
        self.embed, self.head, self.faulty = _ViewEmbed(), nn.Linear(8, 4), faulty

    def forward(self, x):
        h = self.embed(x)
        h.mul_(2)
        return self.head(_Gain.apply(h) if self.faulty else h)


def test_a_child_output_with_no_recorded_gradient_still_passes_one_back_in_isolation():
    """The parent's own backward 1% off is named: the replayed child's output required
    grad in the run, so the isolated backward reaches it (an output marked not to take a
    gradient because none was recorded there named no module)."""
    torch.manual_seed(0)
    model, x = _WritesTheView(), torch.randn(2, 3, 8, 8)
    trace = align.capture(model, x)
    assert next(c for c in trace.calls if c.module == "embed").grad_outputs == [None]
    faulty = copy.deepcopy(model)
    faulty.faulty = True
    report = align.check(model, x, target_model=faulty, target="cpu")
    assert not report.passed and [c.module for c in report.culprits] == [""], report


class _ActNorm(nn.Module):
    """Glow's ActNorm: its scale and shift set from the first batch's statistics, written
    in place or through `.data` (rosinality's glow-pytorch: no version counter moves)."""

    def __init__(self, channels: int, through_data: bool):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.through_data = through_data

    def forward(self, x):
        if not self.initialized:
            with torch.no_grad():
                loc, logs = (
                    (self.loc.data, self.logs.data) if self.through_data else (self.loc, self.logs)
                )
                loc.copy_(-x.mean((0, 2, 3), keepdim=True))
                logs.copy_(-x.std((0, 2, 3), keepdim=True).log())
                self.initialized.fill_(True)
        return (x + self.loc) * self.logs.exp()


@pytest.mark.parametrize("through_data", [False, True])
def test_a_module_that_writes_its_parameters_in_forward_is_not_judged_alone(through_data):
    # re-run alone, each side's ActNorm started from what its own run had written from its
    # own inputs: an honest target's differed by its upstream's error and was named, and so
    # was one downstream of a fault; a shared one's second call too
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), _ActNorm(8, through_data), nn.Conv2d(8, 4, 3), _ActNorm(4, through_data)
    )
    x = torch.randn(2, 3, 12, 12)
    faulty = copy.deepcopy(model)
    FAULTS["kernel_gain"](faulty, "2")
    report = align.check(model, x, target_model=faulty, phases="forward,backward")
    assert not report.passed and [c.module for c in report.culprits] == ["2"], report
    assert "2" in {r.module for r in report.local_rows} <= {"0", "2"}, report.local_rows
    skipped = [n.split(" not isolated: it writes its parameters")[0] for n in report.notes]
    assert {"1", "3"} <= set(skipped) and "2" not in skipped, report.notes
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), _ActNorm(8, through_data), nn.Conv2d(8, 4, 3), _ActNorm(4, through_data)
    )
    x = torch.randn(2, 3, 12, 12)
    honest = align.check(model, x, target_model=perturb(model, 0.5), precision="amp-bf16")
    assert honest.passed, honest
    shared = _ActNorm(8, through_data)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), shared, nn.Conv2d(8, 8, 3), shared)
    faulty = copy.deepcopy(model)
    FAULTS["kernel_gain"](faulty, "0")
    report = align.check(model, x, target_model=faulty, phases="forward,backward")
    assert [c.module for c in report.culprits] == ["0"], report
    assert "1#1 not isolated: it writes its parameters" in "\n".join(report.notes), report.notes
