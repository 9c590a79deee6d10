"""Workarounds for mmengine 0.10.7 under torch >= 2.6, each tested in tests/train/test_compat.py.

1. `mmengine.dist.init_dist` calls `torch.cuda.set_device` whatever the backend, which
   raises on a machine without CUDA even for gloo: `init_process_group` sets the
   process group up itself, and the Runner then skips `init_dist`.
2. The Runner wraps DDP with `device_ids=[LOCAL_RANK]`, which DDP rejects for a module on
   the CPU: `wrap_ddp` wraps the model itself (device_ids only for an accelerator), and a
   wrapped model is used by the Runner as it is.
3. torch >= 2.6 loads with `weights_only=True`, and mmengine's checkpoints hold its
   HistoryBuffer, so `resume` fails. Allowing HistoryBuffer and numpy's arrays is not
   enough: its `__getstate__` pickles its statistics methods as `getattr(HistoryBuffer,
   "min")`, and allowing `builtins.getattr` would let a crafted checkpoint call any
   attribute of any allowed class (`numpy.ndarray.tofile` writes files). The message
   hub's runtime info holds numpy scalars too (the ETA). `WeightsOnlyCheckpoint` stores
   the history as tensors and the scalars as Python numbers, and rebuilds the buffers on
   load, so align's checkpoints load with `weights_only=True` and no extra allowed global.

And one behaviour to record rather than fix: mmengine turns an fp32 optimizer into
AmpOptimWrapper on NPUs without full-precision support (`precision_switch`).
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.model import MMDistributedDataParallel
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from torch import nn

_HISTORY = "align.tensor_history"  # marks a HistoryBuffer stored as tensors


def init_process_group(backend: str, device: str, timeout_s: float) -> None:
    """Join the process group the launcher described in RANK/WORLD_SIZE/MASTER_* (gap 1).

    Selects this rank's accelerator first (cuda/npu), never touches CUDA otherwise. The
    timeout bounds every collective, so a rank whose peer died does not hang forever.
    """
    local_rank = int(os.environ["LOCAL_RANK"])
    if device in ("cuda", "npu"):
        getattr(torch, device).set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def wrap_ddp(model: nn.Module, device: str) -> MMDistributedDataParallel:
    """`model` on this rank's device, in mmengine's DDP wrapper (gap 2).

    device_ids names the accelerator for cuda/npu and is None on the CPU, where DDP
    rejects it. broadcast_buffers=False as mmengine's Runner does.
    """
    if device == "cpu":
        return MMDistributedDataParallel(module=model, device_ids=None, broadcast_buffers=False)
    local_rank = int(os.environ["LOCAL_RANK"])
    model = model.to(torch.device(device, local_rank))
    return MMDistributedDataParallel(module=model, device_ids=[local_rank], broadcast_buffers=False)


class WeightsOnlyCheckpoint(Hook):
    """Checkpoints hold only what torch.load(weights_only=True) reads (gap 3)."""

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        hub = checkpoint["message_hub"]
        hub["runtime_info"] = {
            key: value.item() if isinstance(value, np.generic) else value
            for key, value in hub["runtime_info"].items()
        }
        hub["log_scalars"] = {
            key: {
                _HISTORY: True,
                "log": torch.as_tensor(buffer.data[0], dtype=torch.float64),
                "count": torch.as_tensor(buffer.data[1], dtype=torch.int64),
                "max_length": int(buffer.max_length),
            }
            for key, buffer in hub["log_scalars"].items()
        }

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        hub = checkpoint.get("message_hub", {})
        hub["log_scalars"] = {
            key: HistoryBuffer(value["log"].tolist(), value["count"].tolist(), value["max_length"])
            if isinstance(value, dict) and value.get(_HISTORY)
            else value
            for key, value in hub.get("log_scalars", {}).items()
        }


def precision_switch(requested: str, optim_wrapper: OptimWrapper) -> str | None:
    """A note when mmengine trained in AMP although `requested` was fp32, else None."""
    if requested != "fp32" or not isinstance(optim_wrapper, AmpOptimWrapper):
        return None
    return (
        "fp32 was requested but mmengine trained with AmpOptimWrapper (mixed precision): "
        "this NPU has no full-precision training support "
        "(mmengine.device.is_npu_support_full_precision() is False), so "
        "mmengine.optim.build_optim_wrapper switched the optimizer to AMP"
    )
