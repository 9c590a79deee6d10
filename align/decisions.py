"""Discrete decisions of a run, recorded on the reference and replayed on the others.

Sorting, top-k, max/argmax and max-pooling return indices: a choice, not a value. Two
near-equal candidates can be chosen either way by honest rounding, and a different
choice is a jump that no tolerance can tell from a fault (SSD's hard negative mining
sorts the anchors' nearly equal losses; a max-pool window can hold a tie). Measured on
ssd512: the emulated npu-fp32 target picked other negatives than the reference, and the
classification head's bias gradient was 18,000x the reference's error.

So the reference run records every such op's indices, and the target, golden and honest
draws use the reference's indices instead of their own: their values are taken from
their own inputs at the reference's positions (a gather), and the backward follows the
same choice. What is judged is then continuous. How many choices a run made differently,
and how far apart the values of the two choices were (relative to the values' scale: a
near-tie is tiny, a wrong kernel is not), are reported, not hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops returning (values, indices) with values == input.gather(dim, indices)
_ALONG_DIM = {
    aten.sort.default,
    aten.sort.stable,
    aten.topk.default,
    aten.max.dim,
    aten.min.dim,
    aten.kthvalue.default,
    aten.median.dim,
    aten.nanmedian.dim,
    aten.mode.default,
    aten.cummax.default,
    aten.cummin.default,
}
# ops returning indices only
_INDICES_ONLY = {aten.argmax.default, aten.argmin.default}
# max-pool: (values, indices), indices flat within each plane of the last `n` dims
_POOLS = {
    aten.max_pool2d_with_indices.default: 2,
    aten.adaptive_max_pool2d.default: 2,
    aten.max_pool3d_with_indices.default: 3,
    aten.adaptive_max_pool3d.default: 3,
}
DECIDING = _ALONG_DIM | _INDICES_ONLY | set(_POOLS)

Choices = list[tuple[str, torch.Tensor]]  # (op name, indices) in call order


@dataclass
class Differed:
    """How one run's own choices compared with the replayed ones, per op."""

    calls: int = 0
    choices: int = 0  # index elements
    differed: int = 0  # of which the run would have chosen otherwise
    gap: float = 0.0  # largest |own value - replayed value| / largest |value|, over calls


class Decisions(TorchDispatchMode):
    """Records (`replay=None`) or replays the indices of every deciding op, in call order.

    One instance per run; enter it around the run's forward and backward.
    """

    def __init__(self, replay: Choices | None = None) -> None:
        super().__init__()
        self.replay = replay
        self.log: Choices = []  # what a recording run chose
        self.stats: dict[str, Differed] = {}  # how a replaying run's own choices compared
        self.unmatched = 0  # calls that matched no record (other op or shape): own choice kept
        self._next = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in DECIDING:
            return out
        own = out if func in _INDICES_ONLY else out[1]
        if self.replay is None:
            self.log.append((str(func), own.detach().clone()))
            return out
        recorded = self._recorded(func, own)
        if recorded is None:
            self.unmatched += 1
            return out
        indices = recorded.to(own.device, copy=True)  # the caller may write into it in place
        if func in _INDICES_ONLY:
            self._count(func, own, indices, None)
            return indices
        values = _gather(func, args, kwargs, indices)
        self._count(func, own, indices, (out[0], values))
        return (values, indices)

    @property
    def choices(self) -> Choices:
        """The choices this run went by: its own, or the ones it replayed."""
        return self.log if self.replay is None else self.replay

    def _recorded(self, func, own: torch.Tensor) -> torch.Tensor | None:
        log = self.replay
        if self._next >= len(log):
            return None
        name, indices = log[self._next]
        self._next += 1
        if name != str(func) or indices.shape != own.shape:
            return None
        return indices

    def _count(self, func, own, replayed, values) -> None:
        s = self.stats.setdefault(func.overloadpacket.__name__, Differed())
        s.calls += 1
        s.choices += own.numel()
        differ = int((own != replayed).sum())
        s.differed += differ
        if differ and values is not None:
            mine, theirs = (v.detach().double() for v in values)
            scale = float(mine.abs().max()) or 1.0
            s.gap = max(s.gap, float((mine - theirs).abs().max()) / scale)

    def summary(self) -> str:
        """One line: the choices this run would have made otherwise; '' if none."""
        parts = [
            f"{name} {s.differed} of {s.choices} (values {s.gap:.2g} apart)"
            for name, s in sorted(self.stats.items())
            if s.differed
        ]
        if self.unmatched:
            parts.append(f"{self.unmatched} calls not matched, their own choice kept")
        return "; ".join(parts)


def note(role: str, summary: str) -> str:
    """The report's note on a run that replayed choices it would have made otherwise."""
    return (
        f"the {role} would have made some discrete choices (sort, max, max-pool indices) "
        f"otherwise: {summary}; it used the reference's (align.decisions)"
    )


def _argument(func, args: tuple, kwargs: dict, name: str) -> Any:
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == name:
            if i < len(args):
                return args[i]
            return kwargs.get(name, arg.default_value)
    raise KeyError(name)


def _gather(func, args: tuple, kwargs: dict, indices: torch.Tensor) -> torch.Tensor:
    """The op's values at `indices`, taken from its own input."""
    source = args[0]
    if func in _POOLS:
        n = _POOLS[func]
        flat = source.flatten(start_dim=-n)
        return flat.gather(-1, indices.flatten(start_dim=-n)).view(indices.shape)
    dim = _argument(func, args, kwargs, "dim")
    dim = dim % max(source.dim(), 1)
    index = indices if indices.dim() == source.dim() else indices.unsqueeze(dim)
    values = source.gather(dim, index)
    return values if indices.dim() == source.dim() else values.squeeze(dim)
