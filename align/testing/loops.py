"""Training loops as users write them, recorded by align.Recorder: what tests of the
recorder and of comparisons of its dumps run."""

from __future__ import annotations

import os

import torch
from torch import nn

import align


def fp16_scaled_step(model: nn.Module, out: str | os.PathLike, scale: float = 65536.0) -> None:
    """Record one SGD step of `model` (taking 4x8x8x8 inputs) under fp16 autocast with a
    GradScaler at `scale` into `out`: its gradients are fp16 at the loss scale."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    x = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with align.Recorder(model, out, steps=[0], optimizer=opt, scaler=scaler) as rec:
        with rec.step(0):
            with torch.autocast("cpu", torch.float16):
                y = model(x)
            scaler.scale(y.float().square().mean() * 1e-3).backward()
            scaler.step(opt)
            scaler.update()
