"""The user's model inside the wrappers torch.compile and data parallelism put around it:
align records and reports modules by the names the user's model gives them, whichever
wrappers a run adds (a compiled or DDP target compares with an eager reference)."""

from __future__ import annotations

from torch import nn

__all__ = ["unwrapped", "wrapped"]


def wrapped(model: nn.Module) -> tuple[nn.Module, bool]:
    """The user's model inside `model`'s wrappers (torch.compile, DataParallel,
    DistributedDataParallel), which call it (hooks on it see every call), and whether
    torch.compile wrapped it."""
    from torch._dynamo.eval_frame import OptimizedModule  # (torch._dynamo loads on use)

    compiled = False
    while True:
        if isinstance(model, OptimizedModule):
            model, compiled = model._orig_mod, True
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model, compiled


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's model inside torch.compile's and data parallelism's wrappers."""
    return wrapped(model)[0]
