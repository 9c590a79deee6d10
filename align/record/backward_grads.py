"""Which parameter gradients of a recorded step are one backward's own (align.record.loop).

A module called once in a step gets, from its one call, the whole gradient of its own
parameters, so align.judge.step_isolation can re-run that call and judge its weight
gradient, and name the module whose weight-gradient kernel is wrong. That holds for the
gradient the step's one backward wrote into an empty `.grad` (not one accumulated across
micro-batches or steps), taken as it was written: the Recorder copies it then, before any
clipping, loss-scaler unscaling or all-reduce changes it, and makes no second copy where
the optimizer receives it unchanged. A gradient hook (before accumulation) and a
post-accumulate hook tell these apart without reading a value: no copy, no
synchronization (version counters: align.numerics.versions keeps them true under align's
dispatch modes).
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
        self._fresh: dict[str, bool] = {}  # `.grad` was empty when the gradient came
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
            self._fresh[name] = p.grad is None

        return hook

    def _accumulated(self, name: str):
        def hook(p: torch.Tensor) -> None:
            self._left[name] = (p.grad, p.grad._version)
            if self._on_accumulated is not None:
                self._on_accumulated(name, p)

        return hook

    def own(self, name: str) -> bool:
        """Whether `name`'s gradient came from one backward into an empty `.grad`."""
        return self._fires.get(name) == 1 and self._fresh.get(name, False)

    def unchanged(self, name: str) -> bool:
        """Whether `name`'s `.grad` is still, unmodified, what backward left."""
        left = self._left.get(name)
        grad = self.params[name].grad
        return left is not None and grad is left[0] and grad._version == left[1]
