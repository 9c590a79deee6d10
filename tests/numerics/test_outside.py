"""align.numerics.outside: decisions the dispatcher does not see, wrapped while a run
records or replays its decisions, and put back after."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import align
from align.numerics import outside
from align.numerics.decisions import Decisions
from align.testing import perturb


def _fake_extension(monkeypatch) -> types.SimpleNamespace:
    """A module whose NMS binding keeps every box scored over 0.5 (no dispatched op)."""
    ext = types.SimpleNamespace(
        nms=lambda boxes, scores, iou_threshold, offset=0: torch.tensor(
            [i for i, s in enumerate(scores.tolist()) if s > 0.5], dtype=torch.long
        )
    )
    module = types.ModuleType("fake_ops")
    module.ext_module = ext
    monkeypatch.setitem(sys.modules, "fake_ops", module)
    monkeypatch.setattr(outside, "NMS", (("fake_ops", "ext_module.nms"), ("absent", "nms")))
    return ext


def test_a_wrapped_binding_routes_its_calls_and_is_put_back(monkeypatch):
    ext = _fake_extension(monkeypatch)
    original, calls = ext.nms, []

    def route(name, function, args, kwargs, kind):
        calls.append((name, kind))
        return function(*args, **kwargs)

    restore = outside.wrap(route)
    try:
        kept = ext.nms(torch.zeros(2, 4), torch.tensor([0.9, 0.1]), iou_threshold=0.5)
    finally:
        restore()
    assert kept.tolist() == [0] and calls == [("fake_ops.ext_module.nms", "nms")]
    assert ext.nms is original  # a module not imported ("absent") is left alone


def test_a_decision_outside_the_dispatcher_is_recorded_and_replayed(monkeypatch):
    ext = _fake_extension(monkeypatch)
    original, boxes = ext.nms, torch.zeros(3, 4)
    outer, inner = Decisions(), Decisions()
    with outer, inner:  # nested runs: wrapped once, the innermost takes the call
        ext.nms(boxes, torch.tensor([0.9, 0.6, 0.1]), iou_threshold=0.5)
    assert len(inner.log) == 1 and not outer.log and ext.nms is original
    record = Decisions()
    with record:
        ext.nms(boxes, torch.tensor([0.9, 0.6, 0.1]), iou_threshold=0.5)
    replay = Decisions(record.log)
    with replay:  # scores that rounding moved across 0.5
        kept = ext.nms(boxes, torch.tensor([0.9, 0.4, 0.1]), iou_threshold=0.5)
    assert kept.tolist() == [0, 1]
    assert replay.stats["fake_ops.ext_module.nms"].differed == 1
    assert ext.nms is original


def test_mmcv_nms_outside_the_dispatcher_keeps_the_references_boxes():
    """mmcv's NMS (mmdet's) runs in its C++ extension, unseen by the dispatcher: it is
    wrapped while a run records or replays, and put back after."""
    nms_module = pytest.importorskip("mmcv.ops.nms", reason="mmcv's compiled ops are absent")
    original = nms_module.ext_module.nms

    def boxes(shift: float) -> torch.Tensor:
        return torch.tensor([[0.0, 0.0, 10.0, 10.0], [shift, 0.0, shift + 10.0, 10.0]])

    scores = torch.tensor([0.9, 0.8])
    record = Decisions()
    with record:
        assert nms_module.nms(boxes(3.333), scores, 0.5)[1].tolist() == [0]
    assert nms_module.nms(boxes(3.334), scores, 0.5)[1].tolist() == [0, 1]  # on its own
    replay = Decisions(record.log)
    with replay:
        assert nms_module.nms(boxes(3.334), scores, 0.5)[1].tolist() == [0]
    assert replay.stats["mmcv.ops.nms.ext_module.nms"].differed == 1
    assert nms_module.ext_module.nms is original


def _hungarian(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows), torch.as_tensor(cols)


class Matched(nn.Module):
    """Predicted points matched to targets by the Hungarian algorithm in scipy (DETR's
    matcher), each prediction halfway between two targets: a tie that rounding breaks."""

    def __init__(self, match):
        super().__init__()
        self.match = match
        self.head = nn.Linear(8, 2)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[0, 0] = self.head.weight[1, 1] = 1.0
            self.head.bias.zero_()
        k = torch.arange(8.0)
        targets = torch.stack([torch.cat([2 * k, 2 * k + 1]), 0 * k.repeat(2)], 1)
        self.register_buffer("targets", targets)

    def forward(self, x):
        p = self.head(x)
        rows, cols = self.match(torch.cdist(p, self.targets))
        return (p[rows] - self.targets[cols]).pow(2).sum(1)


@pytest.mark.parametrize("marked", [False, True])
def test_a_users_matching_in_scipy_marked_as_a_decision_is_the_references(marked):
    """Unmarked, the honest target and the golden matched other pairs: the reference
    missed the head's gradients by more than their size, and they were left unjudged.
    Marked `align.decision`, every run takes the reference's matching and they are judged
    at rounding size."""
    torch.manual_seed(0)
    model = Matched(align.decision(_hungarian) if marked else _hungarian)
    k = torch.arange(8.0)
    x = torch.rand(16, 8)
    x[:, 0] = (2 * k + 0.5).repeat(2)
    x[:, 1] = torch.cat([torch.full((8,), 0.1), torch.full((8,), -0.1)])
    report = align.check(model, x, target_model=perturb(model, ulps=1.0))
    assert report.passed, str(report)
    grads = [r for r in report.rows if r.module == "head" and r.phase == "param_grad"]
    unjudged = [r for r in grads if r.limits["rel_rmse"] > 1e-4]
    assert bool(unjudged) != marked, str(report)
    assert ("_hungarian" in " ".join(report.notes)) == marked


def test_a_marked_function_runs_unchanged_outside_align():
    marked = align.decision(_hungarian)
    rows, cols = marked(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    assert marked.__name__ == "_hungarian"
