"""Discrete decisions: recorded on one run, replayed on another (align/numerics/decisions.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import align
from align.numerics.decisions import Decisions
from align.testing import FAULTS, FusedDropout, fused_dropout_kernel, perturb

OPS = {
    "sort": lambda x: x.sort(dim=1, descending=True)[0],
    "topk": lambda x: x.topk(3, dim=1).values,
    "max": lambda x: x.max(dim=1).values,
    "min_keepdim": lambda x: x.min(dim=0, keepdim=True).values,
    "kthvalue": lambda x: x.kthvalue(2, dim=1).values,
    "cummax": lambda x: x.cummax(dim=1).values,
    "max_pool2d": lambda x: F.max_pool2d(x.view(1, 1, *x.shape), 2, ceil_mode=True),
    "adaptive_max_pool2d": lambda x: F.adaptive_max_pool2d(x.view(1, 1, *x.shape), 2),
    "argmax": lambda x: x.argmax(dim=1).float(),
    # values continuous; the backward sends the gradient where input == max (eq replayed)
    "amax": lambda x: x.amax(dim=1),
    "max_all": lambda x: x.max(),
}


def _run(op, x, mode):
    x = x.detach().clone().requires_grad_(True)
    with mode:
        out = OPS[op](x)
        if out.requires_grad:
            out.sum().backward()
    return out.detach(), x.grad


@settings(max_examples=30, deadline=None)
@given(op=st.sampled_from(sorted(OPS)), seed=st.integers(0, 2**16))
def test_replaying_a_runs_own_choices_changes_nothing(op, seed):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
    record = Decisions()
    out, grad = _run(op, x, record)
    replay = Decisions(record.log)
    out2, grad2 = _run(op, x, replay)
    assert torch.equal(out, out2)
    assert (grad is None and grad2 is None) or torch.equal(grad, grad2)
    assert replay.summary() == "" and replay.unmatched == 0


@pytest.mark.parametrize("op", ["sort", "max", "max_pool2d", "argmax", "amax", "max_all"])
def test_a_flipped_choice_follows_the_record_in_values_and_gradients(op):
    x = torch.tensor([[1.0, 1.0 + 2e-7, 0.5, 0.0], [0.0, 0.3, 0.5 - 2e-7, 0.1]])
    record = Decisions()
    _run(op, x, record)
    flipped = x.clone()
    flipped[0, 0], flipped[1, 2] = x[0, 0] + 4e-7, x[1, 2] + 4e-7  # near-ties, other side
    replay = Decisions(record.log)
    out, grad = _run(op, flipped, replay)
    own_out, own_grad = _run(op, flipped, Decisions())
    assert not torch.equal(out, own_out) or not torch.equal(grad, own_grad)
    again, again_grad = _run(op, x, Decisions(record.log))  # the record's choice, exactly
    if op != "argmax":
        assert torch.equal(grad, again_grad)  # same positions chosen
        assert torch.allclose(out, again, atol=1e-6)  # values from the run's own input
    stats = replay.stats
    (name,) = stats
    assert stats[name].differed >= 1 and stats[name].gap < 1e-6
    assert f"{name} {stats[name].differed} of" in replay.summary()


def test_a_call_the_record_does_not_have_keeps_its_own_choice():
    record = Decisions()
    _run("sort", torch.randn(4, 6), record)
    replay = Decisions(record.log)
    x = torch.randn(5, 6)
    out, _ = _run("sort", x, replay)  # another shape: not matched
    assert torch.equal(out, x.sort(dim=1, descending=True)[0])
    assert replay.unmatched == 1 and "not matched" in replay.summary()


class NearTiedSelection(nn.Module):
    """Scores that tie in pairs on these inputs: row 2i+1 of the weight is row 2i plus a
    vector orthogonal to every input, so only rounding orders them. The output keeps the
    top half, as SSD's hard negative mining keeps the hardest anchors, and each pair's
    rows get different gradients by their rank. `reverse` sums every dot product the
    other way round: an honest target that breaks the ties otherwise."""

    def __init__(self, x: torch.Tensor, reverse: bool = False):
        super().__init__()
        self.reverse = reverse
        gen = torch.Generator().manual_seed(0)
        rows = torch.randn(8, x.shape[1], generator=gen, dtype=torch.float64)
        q, _ = torch.linalg.qr(x.double().T)  # an orthonormal basis of the inputs' span
        v = torch.randn(8, x.shape[1], generator=gen, dtype=torch.float64)
        v = v - (v @ q) @ q.T
        weight = torch.stack([rows, rows + v], 1).reshape(16, -1)
        self.weight = nn.Parameter(weight.float())

    def forward(self, x):
        w = self.weight
        if self.reverse:
            w, x = w.flip(1), x.flip(1)
        return (x @ w.T).topk(8, dim=1).values


def _check_near_tied(target: nn.Module, x: torch.Tensor):
    return align.check(
        NearTiedSelection(x), (x,), target_model=target, target="cpu", isolate_modules=False
    )


def test_check_judges_a_near_tied_selection_sharply_by_the_references_choice():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    report = _check_near_tied(NearTiedSelection(x, reverse=True), x)
    note = next((n for n in report.notes if "target would have made" in n), "")
    assert "topk" in note, report.notes  # the target did break ties otherwise
    assert report.passed, str(report)
    # the golden took the reference's choices too: the reference's error is rounding, so
    # the limits are sharp (each choice on its own: the reference's error was 0.78)
    assert max(r.reference["rel_rmse"] for r in report.rows) < 1e-6

    faulty = NearTiedSelection(x, reverse=True)
    with torch.no_grad():
        faulty.weight[3] *= 1 + 1e-4
    assert not _check_near_tied(faulty, x).passed


class _StemPool(nn.Module):
    """conv, ReLU, a 3x3 max pool with padding 1 (a ResNet stem); `pad` pads beforehand
    with that value and pools without padding, as another device's decomposition may."""

    def __init__(self, pad: float | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pad = pad

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if self.pad is None:
            return nn.functional.max_pool2d(h, 3, 2, 1)
        return nn.functional.max_pool2d(nn.functional.pad(h, (1, 1, 1, 1), value=self.pad), 3, 2)


def test_a_pool_on_an_input_padded_beforehand_keeps_its_own_indices():
    """The reference's indices point into the unpadded plane: replayed into the padded
    one they would gather other elements (measured: timm resnet26d's maxpool gave -inf)."""
    torch.manual_seed(0)
    model, x = _StemPool(), torch.randn(2, 3, 16, 16)
    honest = copy.deepcopy(model)
    honest.pad = float("-inf")
    report = align.check(model, x, target_model=honest, target="cpu")
    assert report.passed, str(report)
    faulty = copy.deepcopy(model)  # (zeros would tie with ReLU's: no change at all)
    faulty.pad = 0.1
    report = align.check(model, x, target_model=faulty, target="cpu")
    assert not report.passed and report.first_divergence.tensor == "output[0]", str(report)


def test_a_caller_writing_into_replayed_indices_leaves_the_record_alone():
    x = torch.randn(3, 5)
    record = Decisions()
    with record:
        x.max(dim=0)
    for _ in range(2):  # torchvision's Matcher marks unmatched anchors with -1 in place
        with Decisions(record.log):
            _, idx = x.max(dim=0)
            idx[:] = -1
    assert (record.log[0][1] >= 0).all()


# -- branches of piecewise ops and random draws ----------------------------------------------

IMAGE = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(0))
BRANCHING = {
    "relu": F.relu,
    "relu_inplace": lambda x: F.relu(x * 1.0, inplace=True),
    "threshold": lambda x: F.threshold(x, 0.1, -1.0),
    "relu6": F.relu6,
    "hardtanh": lambda x: F.hardtanh(x, -0.5, 0.5),
    "clamp": lambda x: x.clamp(-0.5, 0.5),
    "clamp_min": lambda x: x.clamp(min=0.2),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.1),
    "hardswish": lambda x: F.hardswish(x * 4),
    "hardsigmoid": lambda x: F.hardsigmoid(x * 4),
    "maximum": lambda x: torch.maximum(x, x.flip(0)),
    "minimum": lambda x: torch.minimum(x, 0.5 * x.flip(1)),
    "where_gt": lambda x: torch.where(x > 0.2, x, 2 * x),
    "abs": torch.abs,
    "prelu": lambda x: F.prelu(x, torch.tensor([0.25])),
    "clamp_min_inplace": lambda x: (x * 1.0).clamp_min_(0.2),
    "elu": lambda x: F.elu(x, 0.5),
    "selu": F.selu,
    "celu": lambda x: F.celu(x, 2.0),
    "hardshrink": lambda x: F.hardshrink(x, 0.2),
    "softshrink": lambda x: F.softshrink(x, 0.2),
    "rrelu_eval": lambda x: F.rrelu(x, training=False),
    "rrelu_eval_inplace": lambda x: F.rrelu(x * 1.0, training=False, inplace=True),
    "round": lambda x: x * (3 * x).round(),
    "floor": lambda x: x * (3 * x).floor(),
    "floor_divide": lambda x: x * (3 * x.detach() // 0.7),  # it has no derivative
    "div_floor": lambda x: x * torch.div(3 * x, x.flip(0).abs() + 0.5, rounding_mode="floor"),
    "div_trunc": lambda x: x * torch.div(3 * x, 0.7, rounding_mode="trunc"),
    "remainder": lambda x: torch.remainder(3 * x, x.flip(0).abs() + 0.5),
    "remainder_inplace": lambda x: (3 * x).remainder_(0.7),
    "fmod": lambda x: torch.fmod(3 * x, 0.7),
    "to_long": lambda x: x * (3 * x).long(),
    "to_bool": lambda x: x * (x - 0.2).bool(),
    "bucketize": lambda x: x * torch.bucketize(x, torch.tensor([-0.5, 0.0, 0.7])),
    "searchsorted": lambda x: x * torch.searchsorted(torch.tensor([-0.5, 0.0, 0.7]), x),
    "grid_sample": lambda x: F.grid_sample(IMAGE, x.view(1, 4, 3, 2), align_corners=False),
    "grid_sample_3d": lambda x: F.grid_sample(
        IMAGE.unsqueeze(2).expand(-1, -1, 3, -1, -1),
        x.view(1, 2, 2, 2, 3),
        padding_mode="border",
        align_corners=False,
    ),
    "eq_where": lambda x: torch.where(x == x.amax(dim=1, keepdim=True), 2 * x, x),
    "dropout": lambda x: F.dropout(x, 0.5, training=True),
    "drop_path": lambda x: x * x.new_empty(x.shape[0], 1).bernoulli_(0.7).div_(0.7),
    "randn_like": lambda x: x + torch.randn_like(x),
    "randperm": lambda x: x[torch.randperm(x.shape[0])],
    "rrelu": lambda x: F.rrelu(x, training=True),
    "rrelu_inplace": lambda x: F.rrelu(x * 1.0, training=True, inplace=True),
    "fractional_max_pool2d": lambda x: F.fractional_max_pool2d(
        x.view(1, 1, *x.shape), 2, output_size=(2, 3)
    ),
}
DRAWS = {"dropout", "drop_path", "randn_like", "randperm", "rrelu", "rrelu_inplace"}
DRAWS |= {"fractional_max_pool2d"}


def _run_fn(fn, x, mode):
    x = x.detach().clone().requires_grad_(True)
    with mode:
        out = fn(x)
        (out * torch.arange(out.numel()).view(out.shape)).sum().backward()
    return out.detach(), x.grad


@settings(max_examples=40, deadline=None)
@given(op=st.sampled_from(sorted(BRANCHING)), seed=st.integers(0, 2**16))
def test_replaying_a_runs_own_branches_and_draws_changes_nothing(op, seed):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    record = Decisions()
    out, grad = _run_fn(BRANCHING[op], x, record)
    assert record.log, "the op made no recorded decision"
    torch.manual_seed(seed + 1)  # another generator state: the draws must come from the record
    replay = Decisions(record.log)
    out2, grad2 = _run_fn(BRANCHING[op], x, replay)
    assert torch.equal(out, out2)
    assert torch.equal(grad, grad2)
    assert replay.unmatched == 0
    if op not in DRAWS:  # a draw's own values differ from the record's: branches do not
        assert all(s.differed == 0 for s in replay.stats.values())


@pytest.mark.parametrize(
    "op",
    ["relu", "relu_inplace", "leaky_relu", "where_gt", "abs", "elu", "selu", "hardshrink"]
    + ["rrelu_eval"],
)
def test_a_flipped_branch_follows_the_record_in_values_and_gradients(op):
    x = torch.tensor([[1.0, -3e-8, 0.5, -0.7], [0.2 + 3e-8, 0.3, -0.5, 2.0]])
    record = Decisions()
    _, grad = _run_fn(BRANCHING[op], x, record)
    flipped = x.clone()
    flipped[0, 1], flipped[1, 0] = 3e-8, 0.2 - 3e-8  # rounding put them across
    _, own_grad = _run_fn(BRANCHING[op], flipped, Decisions())
    replay = Decisions(record.log)
    out, replayed_grad = _run_fn(BRANCHING[op], flipped, replay)
    assert not torch.equal(own_grad, grad)  # on its own the run would jump
    assert torch.allclose(replayed_grad, grad, rtol=1e-6, atol=1e-6)  # with replay it does not
    assert replay.summary() and all(s.gap < 1e-6 for s in replay.stats.values())


def test_a_value_rounded_across_an_integer_takes_the_records_integer():
    """round / floor jump by 1 where rounding moves their input across a (half-)integer."""
    below, above = torch.tensor(0.5).nextafter(torch.tensor(0.0)), torch.tensor(0.5)
    above = above.nextafter(torch.tensor(1.0))
    x = torch.stack([below, torch.tensor(2.0).nextafter(torch.tensor(3.0)), torch.tensor(7.3)])
    flipped = torch.stack([above, torch.tensor(2.0).nextafter(torch.tensor(0.0)), x[2]])
    record = Decisions()
    with record:
        expected = (x.round(), x.floor())
    replay = Decisions(record.log)
    with replay:
        got = (flipped.round(), flipped.floor())
    assert torch.equal(flipped.round(), torch.tensor([1.0, 2.0, 7.0]))  # on its own: jumps
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert "round 1 of 3" in replay.summary() and "floor 1 of 3" in replay.summary()


# each jumps where its input crosses 1.0
QUOTIENTS = {
    "floor_divide": lambda x: x // 1.0,
    "div_floor": lambda x: torch.div(x, torch.ones_like(x), rounding_mode="floor"),
    "div_trunc": lambda x: torch.div(x, 1.0, rounding_mode="trunc"),
    "remainder": lambda x: torch.remainder(x, 1.0),
    "fmod": lambda x: torch.fmod(x, torch.ones_like(x)),
    "to_int": lambda x: x.to(torch.int32),
    "bucketize": lambda x: torch.bucketize(x, torch.tensor([0.5, 1.0])),
    "searchsorted": lambda x: torch.searchsorted(torch.tensor([0.5, 1.0]), x, right=True),
}


@pytest.mark.parametrize("op", sorted(QUOTIENTS))
def test_a_quotient_rounded_across_a_whole_number_takes_the_records_side(op):
    """Floor and trunc division, remainder, fmod, a cast to an integer and bucketing jump
    where their input crosses a whole quotient or a boundary (mmdet's SOLOv2 assigns grid
    cells so): a run whose honest rounding crossed takes the reference's side."""
    one = torch.tensor(1.0)
    below, above = one.nextafter(torch.tensor(0.0)), one.nextafter(torch.tensor(2.0))
    x, flipped = torch.stack([below, torch.tensor(2.3)]), torch.stack([above, torch.tensor(2.3)])
    record = Decisions()
    with record:
        expected = QUOTIENTS[op](x)
    replay = Decisions(record.log)
    with replay:
        got = QUOTIENTS[op](flipped)
    own = QUOTIENTS[op](flipped)
    assert (own - expected).abs().max() > 0.5  # on its own the run jumps
    assert torch.allclose(got.double(), expected.double(), atol=1e-6)
    assert replay.unmatched == 0
    stats = list(replay.stats.values())
    assert sum(s.differed for s in stats) == 1 and all(s.gap < 1e-6 for s in stats)


def test_a_remainder_replayed_keeps_the_kernels_exact_quotient():
    """fmod's kernel is exact: 1.0 rem 0.1f is 0.0999999 (quotient 9), where a float32
    1.0 / 0.1f rounds to 10. A run one ulp below the reference must keep its own value."""
    b = torch.tensor([0.1])
    one = torch.tensor([1.0])
    record = Decisions()
    with record:
        expected = torch.remainder(one, b)
    replay = Decisions(record.log)
    below = one.nextafter(torch.tensor([0.0]))
    with replay:
        got = torch.remainder(below, b)
    assert torch.allclose(got, expected, atol=1e-6) and torch.equal(got, torch.remainder(below, b))


def test_the_golden_takes_the_references_whole_numbers():
    """A floor of a layer's output: the float64 golden is one fp32 rounding away from the
    reference, and must take its whole numbers (else its error is a whole unit)."""

    class Floors(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(1, 1, bias=False)
            nn.init.constant_(self.fc.weight, 0.7)

        def forward(self, x):
            return self.fc(x).floor() * x

    x = (torch.arange(1.0, 200.0) / 0.7).unsqueeze(1)
    model = Floors()
    report = align.check(model, x, target_model=perturb(model, ulps=1.0))
    assert report.passed, str(report)
    assert max(r.limits["rel_rmse"] for r in report.rows) < 1e-4, str(report)


def test_nms_keeps_the_references_boxes_by_index_into_the_runs_own():
    """Two boxes overlapping by about the IoU threshold: the reference suppresses the
    second, a run whose rounding moved it to just under the threshold would keep it."""
    from torchvision.ops import nms

    def boxes(shift: float) -> torch.Tensor:
        return torch.tensor([[0.0, 0.0, 10.0, 10.0], [shift, 0.0, shift + 10.0, 10.0]])

    scores = torch.tensor([0.9, 0.8])
    record = Decisions()
    with record:
        assert nms(boxes(3.333), scores, 0.5).tolist() == [0]
    assert nms(boxes(3.334), scores, 0.5).tolist() == [0, 1]  # on its own: both kept
    replay = Decisions(record.log)
    with replay:
        assert nms(boxes(3.334), scores, 0.5).tolist() == [0]
    assert replay.stats["nms"].differed == 1 and replay.stats["nms"].gap < 1e-4
    other = Decisions(record.log)
    with other:  # another threshold is another decision: its own kept
        assert nms(boxes(3.334), scores, 0.6).tolist() == [0, 1]
    assert other.unmatched == 1


def test_a_detector_in_eval_mode_is_checked_with_the_references_boxes():
    """torchvision's SSDlite in eval mode, random weights: its NMS kept 272 boxes on the
    reference and 295 in the float64 golden, and the check stopped on the shape."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5, score_thresh=0.01
    ).eval()
    images = [torch.rand(3, 320, 320) for _ in range(2)]
    report = align.check(model, (images,), target_model=perturb(model), phases="forward")
    assert report.passed, str(report)
    assert "nms " in " ".join(report.notes)


def test_a_plain_division_or_a_cast_between_floats_makes_no_decision():
    """Only a division that rounds and a cast to an integer dtype have breakpoints: replaying
    a continuous op's output would hide a wrong kernel."""
    x, record = torch.randn(4), Decisions()
    with record:
        torch.div(x, 3.0)
        x.to(torch.float64)
        torch.div(x, 3.0, rounding_mode="floor")
    assert [key.split("(")[0] for key, _ in record.log] == ["aten.div.Tensor_mode"]
    assert "rounding_mode='floor'" in record.log[0][0]


class GridPool(nn.Module):
    """Features weighted by the grid cell their predicted position falls in (a user's own
    SOLOv2-style assignment), with positions that land exactly on cell edges."""

    def __init__(self, cell: float = 0.25):
        super().__init__()
        self.cell = cell
        self.pos, self.feat, self.cells = nn.Linear(8, 2), nn.Linear(8, 16), nn.Embedding(16, 16)
        with torch.no_grad():
            self.pos.weight.zero_()
            self.pos.weight[0, 0] = self.pos.weight[1, 1] = 1.0
            self.pos.bias.zero_()

    def forward(self, x):
        at = torch.div(self.pos(x), self.cell, rounding_mode="floor").clamp(0, 3).long()
        return self.feat(x) * self.cells(at[:, 0] * 4 + at[:, 1])


def test_grid_cells_assigned_across_an_edge_by_honest_rounding_are_the_references():
    """Before floor division was replayed, half the honest target's positions fell into
    the next cell, and so did the golden's: the reference missed every tensor from the
    cells on by 121%, and they were reported as carrying no signal, not judged. Now their
    limits are rounding-sized, and a 0.3% fault still fails."""
    torch.manual_seed(0)
    model = GridPool()
    x = torch.rand(64, 8)
    x[:, :2] = torch.randint(0, 4, (64, 2)) * 0.25
    report = align.check(model, x, target_model=perturb(model, ulps=1.0))
    assert report.passed, str(report)
    assert max(r.limits["rel_rmse"] for r in report.rows) < 1e-4, str(report)
    assert "div " in " ".join(report.notes)
    faulty = perturb(model, ulps=1.0)
    FAULTS["kernel_gain"](faulty, "feat")
    assert not align.check(model, x, target_model=faulty).passed


class Resampler(nn.Module):
    """A learned grid (a linear map of base coordinates) sampling a fixed image
    bilinearly, every point on the edge of a pixel's cell."""

    def __init__(self, corners: bool = False):
        super().__init__()
        self.corners = corners
        self.warp = nn.Linear(2, 2)
        with torch.no_grad():
            self.warp.weight.copy_(torch.eye(2))
            self.warp.bias.zero_()
        image = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        self.register_buffer("image", image)

    def forward(self, base):
        image = self.image.expand(base.shape[0], -1, -1, -1)
        return F.grid_sample(image, self.warp(base), align_corners=self.corners)


def test_grid_cells_that_honest_rounding_moved_a_point_across_take_the_references_slope():
    """Before the backward replayed the reference's cells, 104 of 144 points of the honest
    target took the next cell's slope, and so did the golden's: the warp's gradients were
    left unjudged as carrying no signal (reference off by 79% to 213%). Now they are judged
    at rounding size, and a kernel sampling with the corners aligned still fails."""
    c = (torch.arange(1, 7) * 2 + 1) / 8 - 1  # pixel centers: whole pixel coordinates
    base = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).expand(4, 6, 6, 2).contiguous()
    model = Resampler()
    report = align.check(model, base, target_model=perturb(model, ulps=1.0))
    assert report.passed, str(report)
    assert max(r.limits["rel_rmse"] for r in report.rows) < 1e-4, str(report)
    assert "grid_sampler_2d_backward" in " ".join(report.notes)
    cornered = perturb(model, ulps=1.0)
    cornered.corners = True
    assert not align.check(model, base, target_model=cornered).passed


def test_ties_broken_by_honest_rounding_keep_the_references_gradient():
    """A max over pairs of equal features (duplicated weights): the reference splits each
    gradient between the tied pair, and a target whose honest rounding breaks the ties
    would send it all to one. Before equalities were replayed, the check could only list
    those tensors as carrying no signal; now they are judged, and pass."""

    class TiedMax(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.SELU(), nn.Linear(8, 4)
            with torch.no_grad():
                self.fc1.weight[1::2] = self.fc1.weight[0::2]
                self.fc1.bias[1::2] = self.fc1.bias[0::2]

        def forward(self, x):
            h = self.act(self.fc1(x))
            return self.fc2(h.view(h.shape[0], 8, 2).amax(-1))

    torch.manual_seed(0)
    model = TiedMax().train()
    report = align.check(model, torch.randn(16, 8), target_model=perturb(model, ulps=1.0))
    assert report.passed, str(report)
    notes = " ".join(report.notes)
    assert "eq " in notes and "no signal" not in notes, notes


def _slopes_differ(module: nn.Module, args: tuple) -> None:
    torch.rand(3)  # another device's generator: RReLU draws other slopes


def test_rrelu_in_training_replays_the_references_slopes_and_checks_its_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.RReLU(), nn.Linear(32, 4)).train()
    target = perturb(model, ulps=1.0)
    target.register_forward_pre_hook(_slopes_differ)
    report = align.check(model, torch.randn(8, 16), target_model=target)
    assert report.passed, str(report)
    assert "rrelu_with_noise" in " ".join(report.notes)  # its own slopes were others

    aten, x = torch.ops.aten, torch.randn(64)
    record = Decisions()
    with record:
        F.rrelu(x, training=True)

    class Wrong(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            return out * 1.1 if func is aten.rrelu_with_noise.default else out

    replay = Decisions(record.log, where=lambda: ("act", 0, 1))
    with Wrong(), replay:  # the kernel below, the replay above it
        out = F.rrelu(x, training=True)
    assert torch.equal(out, x * record.log[0][1])  # the reference's slopes
    (fault,) = replay.faults
    assert fault.module == "act" and "slope" in fault.message


def test_an_op_with_another_breakpoint_is_not_replayed_over():
    """A threshold argument is part of the record: a moved breakpoint keeps its own
    branches, so its values differ from the reference's and are judged as such."""
    x = torch.randn(64)
    record = Decisions()
    with record:
        F.threshold(x, 0.0, 0.0)
    replay = Decisions(record.log)
    with replay:
        out = F.threshold(x, 0.05, 0.0)
    assert torch.equal(out, F.threshold(x, 0.05, 0.0))
    assert replay.unmatched == 1


def test_calls_in_another_order_each_take_the_record_of_their_shape():
    """A target whose graph orders its calls otherwise (its backward, once an in-place ReLU
    became an out-of-place threshold) still takes each call's own record; before, a record
    of another shape was used up and every later call of the op took its neighbour's."""
    a, b, c = torch.randn(2, 3), torch.randn(5), torch.randn(2, 3)
    record = Decisions()
    with record:
        expected = [torch.relu(t) for t in (a, b, c)]
    replay = Decisions(record.log)
    with replay:
        b_out, a_out, c_out = torch.relu(b), torch.relu(a), torch.relu(c)
    assert replay.unmatched == 0 and not replay.summary()
    assert all(torch.equal(x, y) for x, y in zip((a_out, b_out, c_out), expected))


def test_an_honest_threshold_for_an_inplace_relu_is_aligned():
    """F.threshold(x, 0, 0) is ReLU: a target computing it so passes, though its backward
    runs in another order than the in-place ReLU's (timm resnest14d's split attention failed
    by cos_err 0.5 at the stem before records were matched by shape)."""
    timm = pytest.importorskip("timm")

    class Threshold(nn.Module):
        def forward(self, x):
            return F.threshold(x, 0.0, 0.0)

    torch.manual_seed(0)
    model = timm.create_model("resnest14d", num_classes=4).train()
    target = copy.deepcopy(model)
    target.layer2[0].conv2.act1 = Threshold()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    report = align.check(model, x, target_model=target, target="cpu", precision="fp32")
    assert report.passed, str(report)


class _Dropper(nn.Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(16, 32), nn.Dropout(p), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class _WrongScaleDropout(nn.Dropout):
    """Drops with the mask the generator gives, but scales by 1/(1-p) twice."""

    def forward(self, x):
        return super().forward(x) / (1 - self.p)


class _UnscaledDropout(nn.Dropout):
    """Draws its own mask and forgets the 1/(1-p) scale."""

    def forward(self, x):
        return x * (torch.rand_like(x) >= self.p)


def _draw_first(module: nn.Module, args: tuple) -> None:
    torch.rand(7)  # another device's generator: every later draw differs


def test_a_model_with_dropout_in_train_mode_is_aligned_with_an_honest_target():
    torch.manual_seed(0)
    model = _Dropper().train()
    target = perturb(model, ulps=1.0)
    target.register_forward_pre_hook(_draw_first)
    report = align.check(model, torch.randn(8, 16), target_model=target, target="cpu")
    assert report.passed, str(report)
    assert report.rows and report.local_rows
    assert "bernoulli_" in " ".join(report.notes)  # its own masks were other masks


@pytest.mark.parametrize("faulty", [_WrongScaleDropout, _UnscaledDropout])
def test_a_wrong_dropout_fails_and_is_named(faulty):
    torch.manual_seed(0)
    model = _Dropper().train()
    target = copy.deepcopy(model)
    target.drop = faulty(0.5)
    report = align.check(model, torch.randn(8, 16), target_model=target, target="cpu")
    assert not report.passed
    assert report.culprits and report.culprits[0].module == "drop", str(report)


def test_a_fused_dropout_kernel_is_checked_against_its_own_mask():
    """native_dropout (the fused kernel of CUDA and NPU builds) returns (output, mask): a
    kernel whose output is not input * mask / (1 - p) is a fault, named where it ran."""
    aten = torch.ops.aten
    x = torch.randn(64)
    record = Decisions()
    with record:
        aten.native_dropout(x, 0.5, True)

    class Wrong(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            return (out[0] * 0.9, out[1]) if func is aten.native_dropout.default else out

    replay = Decisions(record.log, where=lambda: ("head.drop", 0, 3))
    with Wrong(), replay:  # the kernel below, the replay above it
        out, mask = aten.native_dropout(x, 0.5, True)
    assert torch.equal(mask, record.log[0][1])
    assert torch.allclose(out, x * mask * 2.0)
    (fault,) = replay.faults
    assert fault.module == "head.drop" and "mask" in fault.message
    clean = Decisions(record.log)
    with clean:
        aten.native_dropout(x, 0.5, True)
    assert not clean.faults


def test_dumps_carry_random_draws(tmp_path):
    torch.manual_seed(0)
    model = _Dropper().train()
    x = torch.randn(8, 16)
    ref = align.capture(model, x, seed=1, draws=1)
    ref.save(tmp_path / "ref")
    loaded = align.load_trace(tmp_path / "ref")
    assert any("bernoulli" in key or "dropout" in key for key, _ in loaded.decisions)
    tgt = align.capture(model, x, seed=2, decisions_of=loaded)  # another generator state
    gold = align.capture(model, x, precision="fp64", seed=3, decisions_of=loaded)
    assert align.compare(loaded, tgt, gold).passed
    own = align.capture(model, x, seed=2)
    assert not align.compare(loaded, own, gold).passed


def _replayed(reference_model, target_model, x):
    """The reference's trace (seed 1), and the comparison of a target (seed 2: another
    generator state) and a golden that replay its decisions."""
    ref = align.capture(reference_model, x, seed=1)
    tgt = align.capture(target_model, x, seed=2, decisions_of=ref)
    gold = align.capture(reference_model, x, precision="fp64", seed=3, decisions_of=ref)
    return ref, align.compare(ref, tgt, gold)


@pytest.mark.parametrize("p", [0.5, 0.2])
@pytest.mark.parametrize("fused_side", ["reference", "target"])
def test_a_fused_dropout_replays_the_mask_a_cpu_dropout_drew_and_back(p, fused_side):
    """A CPU reference draws dropout masks with bernoulli_, a GPU or NPU target with the
    fused native_dropout: each replays the other's masks, under another generator state."""
    torch.manual_seed(0)
    cpu = _Dropper().train()
    cpu.drop.p = p
    fused = copy.deepcopy(cpu)
    fused.drop = FusedDropout(p)
    ref_model, tgt_model = (fused, cpu) if fused_side == "reference" else (cpu, fused)
    _, report = _replayed(ref_model, tgt_model, torch.randn(8, 16))
    assert report.passed, str(report)
    assert "not matched" not in " ".join(report.notes)


def test_a_dumped_target_carries_its_fused_dropout_fault(tmp_path):
    """A target dump that replayed the reference's masks holds the right values even from a
    wrong fused kernel: the fault travels in the dump, and the comparison fails it."""
    torch.manual_seed(0)
    model = _Dropper().train()
    fused = copy.deepcopy(model)
    fused.drop = FusedDropout(0.5)
    x = torch.randn(8, 16)
    ref = align.capture(model, x, seed=1)
    ref.save(tmp_path / "ref")
    with fused_dropout_kernel(1.1):
        align.capture(fused, x, seed=2, decisions_of=ref).save(tmp_path / "bad")
    gold = align.capture(model, x, precision="fp64", seed=3, decisions_of=ref)
    (fault,) = align.load_trace(tmp_path / "bad").faults
    assert (fault.module, fault.op) == ("drop", "native_dropout")
    report = align.compare(tmp_path / "ref", tmp_path / "bad", gold)
    assert not report.passed
    assert report.first_divergence.module == "drop" and "mask" in report.first_divergence.message
    clean = align.capture(fused, x, seed=2, decisions_of=ref)
    assert align.compare(ref, clean, gold).passed


def test_a_replayed_draw_written_in_place_leaves_the_record_as_drawn():
    """The model may scale its noise in place: each replay must still get the draw itself."""

    def noisy(x):
        noise = torch.randn_like(x)
        noise.mul_(2.0)  # in place, as dropout-like layers do with their masks
        return x + noise

    x = torch.zeros(64)
    record = Decisions()
    with record:
        reference = noisy(x)
    for _ in range(2):  # the second replay would see the first one's doubled record
        with Decisions(record.log):
            assert torch.equal(noisy(x), reference)


class _Attention(nn.Module):
    """Self-attention through F.scaled_dot_product_attention and nn.MultiheadAttention."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.qkv = nn.Linear(16, 48)
        self.mha = nn.MultiheadAttention(16, 2, dropout=p, batch_first=True)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        p = self.p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).flatten(2)
        return self.mha(y, y, y, need_weights=False)[0]


def test_attention_with_dropout_draws_a_replayable_mask_where_only_fused_kernels_exist():
    """A fused attention kernel draws its dropout mask inside (here the CPU's flash kernel
    stands in for CUDA's and the NPU's: made the only backend, it cannot drop at all).
    Under Decisions attention with dropout runs the math backend, whose mask is recorded
    and replayed; without dropout the fused kernel runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model, x = _Attention(0.2).train(), torch.randn(2, 6, 16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ref, report = _replayed(model, model, x)
        assert report.passed, str(report)
        assert sum(key.startswith("aten.bernoulli_") for key, _ in ref.decisions) == 2
        model.p = 0.0
        with Decisions() as record:
            model(x)
    assert "_scaled_dot_product_flash_attention_for_cpu" in record.ran


class _ClampReLU(nn.Module):
    """A ReLU computed as a clamp: the same function, another op (no relu record taken)."""

    def forward(self, x):
        return x.clamp_min(0.0)


def test_a_relu_computed_by_another_op_leaves_its_record_to_no_later_call():
    """The target computes its first ReLU as a clamp: the reference's record of that call
    is not taken, and each later ReLU of the same shape must still get its own record,
    not the one before (which disagrees with it in about half its elements)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(32, 3))
    target = copy.deepcopy(model)
    target[1] = _ClampReLU()
    _, report = _replayed(model, target, torch.randn(16, 32))
    assert report.passed, str(report)
    assert "relu" not in " ".join(report.notes), report.notes  # no branch taken otherwise


def test_a_branch_compared_by_numpy_is_torchs_comparison():
    from align.numerics.pieces import _above

    x = torch.tensor([-1.0, -0.0, 0.0, 1e-45, float("nan"), 2.0])
    for t in (x, x.double(), x.half(), x[::2], x.view(2, 3).t(), torch.tensor(0.5), x[:0]):
        for threshold in (0, 0.0, -0.0, 1e-45, 1, True, 7e4):
            assert torch.equal(_above(t, threshold), t > threshold), (t, threshold)
