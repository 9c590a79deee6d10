"""align.judge.comparison on traces made to differ in one respect."""

from __future__ import annotations

import copy

import torch
from torch import nn

import align
from align.judge.comparison import compare_traces
from align.numerics.verdict import Tolerance
from align.record.trace import Trace


def test_a_running_statistic_one_side_writes_and_the_other_leaves_is_compared():
    # levit_128s under amp-bf16: a BatchNorm fed two exactly opposite rows (a BatchNorm
    # over two values, then a linear layer without bias) has batch mean 0. The reference's
    # rounding wrote a running mean of noise; an honest channels_last target's left it at
    # 0, as the golden did. Before, the target's buffer was "missing": a false alarm.
    bn = nn.BatchNorm1d(8)
    row = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    exact = torch.cat([row, -row])
    rounded = exact.clone()
    rounded[1] += 1e-6 * exact[1]  # the reference's rounding: the sum no longer cancels
    ref = align.capture(copy.deepcopy(bn), rounded, backward=False)
    tgt = align.capture(copy.deepcopy(bn), exact, backward=False)
    gold = align.capture(copy.deepcopy(bn).double(), exact.double(), backward=False)
    written = ref.by_key()[("", 0)]
    assert written.wrote(0) and not tgt.by_key()[("", 0)].wrote(0)
    rows = compare_traces(ref, tgt, gold, tol=Tolerance(), phases=("forward",))
    mean = next(r for r in rows if r.tensor == "buffer running_mean")
    assert "missing" not in mean.failed and mean.passed, mean.message
    assert "no signal" in mean.message  # the reference's running mean is noise about 0


def test_buffers_no_side_writes_are_not_rows():
    bn = nn.BatchNorm1d(8).eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    ref = align.capture(copy.deepcopy(bn), x, backward=False)
    gold = align.capture(copy.deepcopy(bn).double(), x.double(), backward=False)
    rows = compare_traces(ref, ref, gold, tol=Tolerance(), phases=("forward",))
    assert [r.tensor for r in rows] == ["output[0]"]


def test_state_is_left_to_isolation_when_asked():
    # align.check judges each call's running statistics in isolation, on the reference's
    # inputs, not across the whole network (`compare_traces(state=False)` says why)
    bn = nn.BatchNorm1d(8)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    ref = align.capture(copy.deepcopy(bn), x, backward=False)
    gold = align.capture(copy.deepcopy(bn).double(), x.double(), backward=False)
    kept = compare_traces(ref, ref, gold, tol=Tolerance(), phases=("forward",))
    assert [r.tensor for r in kept] == ["output[0]", "buffer running_mean", "buffer running_var"]
    left = compare_traces(ref, ref, gold, tol=Tolerance(), phases=("forward",), state=False)
    assert [r.tensor for r in left] == ["output[0]"]


def test_without_a_golden_a_deeper_tensor_is_allowed_the_roundings_it_went_through():
    """Without a golden, the floors are the limits; a tensor computed through n calls
    carries n calls' roundings on each side, a random walk: sqrt(n) floors. The same
    relative difference that fails on the first layer's output passes on the sixteenth's,
    and ten times as much still fails there."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(32, 32) for _ in range(16)))
    ref = align.capture(model, torch.randn(8, 32), backward=False)
    first, last = (ref.by_key()[(f"{n}", 0)].outputs[0] for n in (0, 15))

    def target(key: str, rel: float) -> Trace:
        tgt = copy.copy(ref)
        tgt.tensors = dict(ref.tensors)
        r = ref.tensors[key]
        noise = torch.randn(r.shape, generator=torch.Generator().manual_seed(1))
        tgt.tensors[key] = r + rel * r.norm() / noise.norm() * noise
        return tgt

    def failed(key: str, rel: float) -> bool:
        rows = compare_traces(ref, target(key, rel), None, tol=Tolerance(), phases=("forward",))
        return any(r.failed for r in rows)

    assert failed(first, 2.5e-5) and not failed(last, 2.5e-5)
    assert failed(last, 2.5e-4)
