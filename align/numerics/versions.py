"""Version counters of the tensors a list op writes in place under a dispatch mode.

torch's foreach ops (`_foreach_mul_`: clipping, optimizers; `_amp_foreach_non_finite_check_
and_unscale_`: GradScaler) do not bump their tensors' version counters when they run under
a TorchDispatchMode (torch 2.14: a plain `mul_` does). align keys identities on versions
(align.record.capture's snapshot reuse, align.record.backward_grads), so the modes a
recorded step runs under bump them after such an op, as it runs without them.
"""

from __future__ import annotations

from typing import Any

from torch.autograd.graph import increment_version

__all__ = ["WRITES_LISTS", "bump_written_lists"]


class _ListsWritten(dict):
    """op -> positions of the tensor lists it writes in place, read from its schema once
    (a dict lookup per op after that: the modes see every op)."""

    def __missing__(self, func: Any) -> tuple[int, ...]:
        positions = tuple(
            i
            for i, a in enumerate(func._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write and "List" in str(a.type)
        )
        self[func] = positions
        return positions


WRITES_LISTS = _ListsWritten()


def bump_written_lists(func: Any, args: tuple) -> None:
    """Bump the version of every tensor in the lists `func` wrote in place (call it where
    `WRITES_LISTS[func]` is not empty)."""
    for i in WRITES_LISTS[func]:
        if i < len(args):
            increment_version([t for t in args[i] if not t.is_inference()])
