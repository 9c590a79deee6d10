"""The user's model inside the wrappers torch.compile and data parallelism put around it:
align records and reports modules by the names the user's model gives them, whichever
wrappers a run adds (a compiled or DDP target compares with an eager reference)."""

from __future__ import annotations

import torch
from torch import nn

from align.errors import AlignError

__all__ = ["unwrapped", "wrapped"]


def wrapped(model: nn.Module) -> tuple[nn.Module, bool]:
    """The user's model inside `model`'s wrappers (torch.compile, DataParallel,
    DistributedDataParallel), which call it (hooks on it see every call), and whether
    torch.compile wrapped it. A TorchScript module is an AlignError: its modules run no
    Python hooks, and the eager model is not inside it. So is a lazy module not yet
    initialized (nn.LazyLinear): every run would draw its weights anew."""
    from torch._dynamo.eval_frame import OptimizedModule  # (torch._dynamo loads on use)

    compiled = False
    while True:
        scripted = next((m for m in model.modules() if isinstance(m, torch.jit.ScriptModule)), None)
        if scripted is not None:
            raise AlignError(
                f"{scripted.original_name} is a TorchScript module (torch.jit.script or "
                "trace), whose modules align cannot hook: give the eager model it was made "
                "from (with its weights: eager.load_state_dict(scripted.state_dict()))"
            )
        lazy = next((m for m in model.modules() if _uninitialized(m)), None)
        if lazy is not None:
            raise AlignError(
                f"{type(lazy).__name__}'s parameters are not initialized yet (a lazy module, "
                "which makes them in its first forward): run the model once on a batch "
                "first (under torch.no_grad()), as torch's lazy modules ask, then give it to "
                "align; a target copied from it after that holds the same weights (a lazy "
                "module the forward never calls stays so: leave it out of the model)"
            )
        if isinstance(model, OptimizedModule):
            model, compiled = model._orig_mod, True
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model, compiled


def _uninitialized(module: nn.Module) -> bool:
    return any(
        isinstance(t, nn.parameter.UninitializedTensorMixin)
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    )


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's model inside torch.compile's and data parallelism's wrappers."""
    return wrapped(model)[0]
