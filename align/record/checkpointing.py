"""Activation checkpointing run plainly inside align's own runs.

torch.utils.checkpoint's reentrant variant (`use_reentrant=True`, still what an unset
`use_reentrant` means, with a warning, and common in training code) runs its function
under no_grad and runs it again inside backward: the module calls inside it took no
gradient hooks in the forward, their backward happened in a second call, and a re-run of
a module containing them refuses `torch.autograd.grad` (measured: a fault in a
checkpointed block's backward was caught but named no culprit, and no module was
isolated). Checkpointing changes memory, not values:
align's runs are small, so while `plain_checkpoints()` is active the reentrant function is
called once, as the model without checkpointing would call it. The non-reentrant variant
keeps its graph and hooks and is left alone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint


class _CalledOnce:
    """Stands in for `torch.utils.checkpoint.CheckpointFunction`: `apply` calls the
    function, with autograd as the reentrant checkpoint gives it (outputs require grad
    only where an input does, so parameters inside take gradients only then)."""

    @staticmethod
    def apply(function: Any, preserve_rng_state: bool, *args: Any) -> Any:
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function(*args)
        with torch.no_grad():
            return function(*args)


_lock = threading.Lock()
_active = 0  # entered contexts, in every thread: the stand-in is installed while above 0
_saved: Any = None


@contextlib.contextmanager
def plain_checkpoints() -> Iterator[None]:
    """Reentrant checkpoints call their function once, plainly, while any is active (the
    module's attribute is process-wide: counted, so contexts may nest and interleave)."""
    global _active, _saved
    with _lock:
        if _active == 0:
            _saved, torch_checkpoint.CheckpointFunction = (
                torch_checkpoint.CheckpointFunction,
                _CalledOnce,
            )
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                torch_checkpoint.CheckpointFunction = _saved
