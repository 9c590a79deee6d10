"""Discrete decisions: recorded on one run, replayed on another (align/decisions.py)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import align
from align.decisions import Decisions

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


@pytest.mark.parametrize("op", ["sort", "max", "max_pool2d", "argmax"])
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
