"""Isolation (align.judge.isolation): what an isolated call is given."""

import torch

from align.judge.isolation import _Payload, _Replay
from align.numerics.jitter import Jitter


def test_an_honest_draw_isolates_a_container_on_its_childrens_records_as_they_are():
    """A replayed child's outputs are records, not ops of the run: a draw's jitter nudges
    what the container computes, not them (a nudged record adds one rounding to every
    input of the container, and so to the honest spread its limits grow from)."""
    recorded = torch.randn(100)
    feed = torch.randn(1, requires_grad=True)
    with Jitter(3):
        (replayed,) = _Replay.apply(_Payload([recorded], [None]), feed)
        nudged = recorded * 1.0
    assert torch.equal(replayed, recorded)
    assert not torch.equal(nudged, recorded)  # the jitter is on: a computed op is nudged
