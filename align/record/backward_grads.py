"""Which parameter gradients of a recorded step are one backward's own (align.record.loop).

A module called once in a step gets, from its one call, the whole gradient of its own
parameters, so align.judge.step_isolation can re-run that call and judge its weight
gradient, and name the module whose weight-gradient kernel is wrong. That holds for the
gradient the step's one backward wrote into an empty `.grad` (None, or zeroed in place;
not one accumulated across micro-batches or steps), taken as it was written: the Recorder
copies it then, before any clipping, loss-scaler unscaling or all-reduce changes it, and
makes no second copy where the optimizer receives it unchanged. A gradient hook (before
accumulation) and a post-accumulate hook tell these apart without a copy and without
waiting for a device (version counters: align.numerics.versions keeps them true under
align's dispatch modes; a `.grad` zeroed in place is read once the step is over).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["BackwardGrads"]


class BackwardGrads:
    """Watches `model`'s parameters during one step; `on_accumulated(name, p)` is called
    after each accumulation (to record the gradient then)."""

    def __init__(
        self, model: nn.Module, on_accumulated: Callable[[str, torch.Tensor], None] | None
    ):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._on_accumulated = on_accumulated
        self._fires: dict[str, int] = {}
        # `.grad` was empty when the gradient came: None, or zeroed in place (a script's
        # `zero_grad(set_to_none=False)`), which a device tensor tells at the step's end
        # (reading it in backward would wait for the device at every parameter)
        self._fresh: dict[str, bool | torch.Tensor] = {}
        self._task: dict[str, int] = {}  # the backward pass (graph task) of the first gradient
        self._left: dict[str, tuple[torch.Tensor, int]] = {}  # `.grad` as backward left it

    def install(self, stack: contextlib.ExitStack) -> None:
        """Hook every parameter until `stack` closes."""
        for name, p in self.params.items():
            for hook in (
                p.register_hook(self._arriving(name, p)),
                p.register_post_accumulate_grad_hook(self._accumulated(name)),
            ):
                stack.callback(hook.remove)

    def _arriving(self, name: str, p: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            self._fires[name] = self._fires.get(name, 0) + 1
            if self._fires[name] == 1:
                self._task[name] = torch._C._current_graph_task_id()
                self._fresh[name] = _empty(p.grad)

        return hook

    def _accumulated(self, name: str):
        def hook(p: torch.Tensor) -> None:
            self._left[name] = (p.grad, p.grad._version)
            if self._on_accumulated is not None:
                self._on_accumulated(name, p)

        return hook

    def may_own(self, name: str) -> bool:
        """Whether `name`'s gradient came from one backward so far (`own` tells, once the
        step is over, whether its `.grad` was empty)."""
        return self._fires.get(name) == 1

    def empty_before(self, name: str) -> bool:
        """Whether `.grad` was empty (None or zeros) when `name`'s first gradient came."""
        fresh = self._fresh.get(name, False)
        if isinstance(fresh, torch.Tensor):
            fresh = self._fresh[name] = bool(fresh)
        return fresh

    def task(self, name: str) -> int | None:
        """The backward pass (graph task id) `name`'s first gradient came in."""
        return self._task.get(name)

    def own(self, name: str) -> bool:
        """Whether `name`'s gradient came from one backward into an empty `.grad`."""
        return self._fires.get(name) == 1 and self.empty_before(name)

    def unchanged(self, name: str) -> bool:
        """Whether `name`'s `.grad` is still, unmodified, what backward left."""
        left = self._left.get(name)
        grad = self.params[name].grad
        return left is not None and grad is left[0] and grad._version == left[1]


def _empty(grad: torch.Tensor | None) -> bool | torch.Tensor:
    """Whether `.grad` holds nothing: None, or zeros (a device tensor, read later); a
    sparse one, no entries."""
    if grad is None:
        return True
    if grad.layout != torch.strided:
        return grad._nnz() == 0
    return grad.detach().eq(0).all()
