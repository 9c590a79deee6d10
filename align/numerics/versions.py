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

__all__ = ["bump_written_lists"]

_WRITTEN: dict[Any, tuple[int, ...]] = {}  # op -> positions of the tensor lists it writes


def _written(func: Any) -> tuple[int, ...]:
    positions = _WRITTEN.get(func)
    if positions is None:
        positions = tuple(
            i
            for i, a in enumerate(func._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write and "List" in str(a.type)
        )
        _WRITTEN[func] = positions
    return positions


def bump_written_lists(func: Any, args: tuple) -> None:
    """Bump the version of every tensor in the lists `func` wrote in place."""
    for i in _written(func):
        if i < len(args):
            increment_version([t for t in args[i] if not t.is_inference()])
