"""align.numerics.outside: decisions the dispatcher does not see, wrapped while a run
records or replays its decisions, and put back after."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from align.numerics import outside
from align.numerics.decisions import Decisions


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
    restore = outside.wrap(lambda name, fn, args, kwargs: calls.append(name) or fn(*args, **kwargs))
    kept = ext.nms(torch.zeros(2, 4), torch.tensor([0.9, 0.1]), iou_threshold=0.5)
    restore()
    assert kept.tolist() == [0] and calls == ["fake_ops.ext_module.nms"]
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
