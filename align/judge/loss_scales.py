"""Loss scales that differ between two msprobe dumps of a mixed-precision run.

msprobe dumps gradients as backward produced them: multiplied by the loss scale. Two
devices' dynamic scalers part when one skips a step the other does not (an overflow on
one side only), or when they start from other scales; then every gradient of one dump is
the same power of two times the other's, and every backward row would fail on it though
each device's arithmetic is right. Where the first gradients of the backward pass (nearest
the loss, where two honest runs differ least) all differ by one power of two, the other
dump's gradients are judged divided by it, and the report says so: the scalers' parting
is a fact about the runs' histories, not an error of this step's kernels. A fault that
multiplies every gradient by exactly a power of two is the same thing seen from a dump.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from typing import Any

import torch

from align.record.trace import BACKWARD_SLOTS, Trace

SAMPLE = 8  # gradients looked at, first of the backward pass
SLACK = 0.05  # log2 distance from the power of two: 3.5%, far beyond honest rounding


def scale_exponent(ref: Trace, other: Trace) -> int:
    """k where `other`'s gradients are 2**k times `ref`'s throughout (0 where they are
    not, or where too few gradients say); `other` aligned with `ref` (align_calls)."""
    ratios = []
    for key, other_key in _backward_pairs(ref, other):
        a, b = _norm(ref.tensors.stats, key), _norm(other.tensors.stats, other_key)
        if a and b:
            ratios.append(math.log2(b / a))
        if len(ratios) == SAMPLE:
            break
    if len(ratios) < 2:
        return 0
    k = round(statistics.median(ratios))
    return k if k and all(abs(r - k) <= SLACK for r in ratios) else 0


def rescaled(trace: Trace, k: int) -> Trace:
    """`trace` with every gradient (and its statistics) divided by 2**k, exactly."""
    keys = {key for _, key in _backward_keys(trace)} | set(trace.param_grads.values())
    return replace(trace, tensors=_Rescaled(trace.tensors, keys, 2.0**-k))


def note(role: str, k: int) -> str:
    """What the report says of a `role` dump whose gradients are 2**k the reference's."""
    return (
        f"the {role}'s gradients are 2^{k} times the reference's throughout (the first "
        f"{SAMPLE} of the backward pass within {2**SLACK - 1:.1%} of it): its loss scale "
        "differs (a dynamic scaler that skipped a step the other did not, or started from "
        f"another scale); they were judged divided by 2^{k}. A fault that multiplies every "
        "gradient by exactly a power of two would look the same from a dump"
    )


def _backward_keys(trace: Trace) -> list[tuple[tuple[int, str, int], str]]:
    """((position, slot, index), key) of every gradient, in backward order."""
    order = list(dict.fromkeys([*trace.backward_order, *range(len(trace.calls))]))
    return [
        ((n, slot, i), key)
        for n in order
        for slot in BACKWARD_SLOTS
        for i, key in enumerate(getattr(trace.calls[n], slot))
        if key is not None
    ]


def _backward_pairs(ref: Trace, other: Trace) -> list[tuple[str, str]]:
    """(reference key, other key) of the gradients both hold, in the reference's order."""
    pairs = []
    for (n, slot, i), key in _backward_keys(ref):
        keys = getattr(other.calls[n], slot) if n < len(other.calls) else []
        if i < len(keys) and keys[i] is not None:
            pairs.append((key, keys[i]))
    return pairs


def _norm(stats: dict[str, dict[str, Any]], key: str) -> float | None:
    """The tensor's Norm as msprobe recorded it, where finite and positive."""
    value = stats.get(key, {}).get("Norm")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return value if number and 0 < value < math.inf else None


class _Rescaled:
    """A dump's tensors and statistics with the gradients among them multiplied by
    `factor` (a power of two: exact in any floating dtype, save under- and overflow)."""

    def __init__(self, tensors: Any, keys: set[str], factor: float) -> None:
        self._tensors, self._keys, self._factor = tensors, keys, factor
        self.stats = {
            key: _scaled_stats(entry, factor) if key in keys else entry
            for key, entry in tensors.stats.items()
        }

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        if key not in self._keys or not t.is_floating_point():
            return t
        if t.dtype == torch.float16:  # float32 holds it exactly below fp16's range
            return t.float() * self._factor
        return t * self._factor

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tensors, name)


def _scaled_stats(entry: dict[str, Any], factor: float) -> dict[str, Any]:
    return {
        s: v * factor if s in ("Max", "Min", "Mean", "Norm") and isinstance(v, float) else v
        for s, v in entry.items()
    }
