"""mmengine hooks of a full run: epoch records, per-epoch seeding, progress bar, fault injection."""

from __future__ import annotations

import os
import random
import time
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist
from mmengine.hooks import Hook

# Test-only knob: ALIGN_FAULT="RANK:ITER" makes that rank raise after its ITER-th training
# iteration (counted from 1 over the whole run), to test how a failed worker ends a run.
FAULT_ENV = "ALIGN_FAULT"


class EpochRecorder(Hook):
    """Per epoch: mean training loss, last lr, global images/s, seconds, then val metrics.

    The records travel inside mmengine's checkpoints, so a resumed run reports every epoch.
    A checkpoint is written before its epoch's validation, so after a resume the missing
    validation of the resumed epoch is run again (same weights, same figures).
    """

    priority = "BELOW_NORMAL"  # after mmengine's timing hooks, before the checkpoint hook

    def __init__(self, metric: str = "top1") -> None:
        self.metric = metric  # a validation metric: an epoch that has it was validated
        self.epochs: list[dict[str, Any]] = []
        self.resumed_from: int | None = None

    def before_train(self, runner) -> None:
        if runner.epoch > 0:
            self.resumed_from = runner.epoch
            if self.epochs and self.metric not in self.epochs[-1]:
                runner.val_loop.run()

    def before_train_epoch(self, runner) -> None:
        self._start, self._loss, self._iters, self._images = time.perf_counter(), 0.0, 0, 0

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._loss += outputs["loss"].item()
        self._iters += 1
        self._images += len(data_batch[-1])
        self._lr = runner.optim_wrapper.get_lr()["lr"][0]

    def after_train_epoch(self, runner) -> None:
        seconds = time.perf_counter() - self._start
        totals = torch.tensor([self._loss, self._iters, self._images], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)
        loss, iters, images = totals.tolist()
        self.epochs.append(
            {
                "epoch": runner.epoch + 1,
                "loss": loss / iters,
                "lr": self._lr,
                "images_per_s": images / seconds,
                "images": int(images),
                "seconds": seconds,
            }
        )

    def after_val_epoch(self, runner, metrics: dict[str, float] | None = None) -> None:
        if self.epochs and metrics:
            self.epochs[-1].update(
                {k.split("/")[-1]: v for k, v in metrics.items() if k.split("/")[-1] != "n"}
            )

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint["align_epochs"] = self.epochs

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self.epochs = list(checkpoint.get("align_epochs", []))


class EpochSeed(Hook):
    """Reseed torch/numpy/random and the augmentation at each epoch from (seed, epoch, rank).

    mmengine reseeds once at start (and again on resume), so without this a resumed run
    would draw different dropout masks and augmentations than an uninterrupted one.
    """

    priority = "VERY_HIGH"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def before_train_epoch(self, runner) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        seed = (self.seed * 10_007 + runner.epoch) * 1_009 + rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        dataset = runner.train_dataloader.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(runner.epoch)


class ProgressBar(Hook):
    """A tqdm bar per training epoch and a line per validation, on rank 0's terminal."""

    priority = "LOW"

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def before_train_epoch(self, runner) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=len(runner.train_dataloader),
            desc=f"epoch {runner.epoch + 1}/{runner.max_epochs}",
            file=self.stream,
            unit="it",
            leave=False,
        )

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self.bar.set_postfix(loss=f"{outputs['loss'].item():.4f}", refresh=False)
        self.bar.update(1)

    def after_train_epoch(self, runner) -> None:
        self.bar.close()

    def after_val_epoch(self, runner, metrics: dict[str, float] | None = None) -> None:
        shown = "  ".join(
            f"{k.split('/')[-1]} {v:.2f}" for k, v in (metrics or {}).items() if k != "val/n"
        )
        print(f"epoch {runner.epoch}/{runner.max_epochs}  {shown}", file=self.stream, flush=True)


class FaultInjection(Hook):
    """Raise on rank `rank` after training iteration `iteration` (see FAULT_ENV)."""

    def __init__(self, rank: int, iteration: int) -> None:
        self.rank, self.iteration = rank, iteration

    @classmethod
    def from_env(cls) -> FaultInjection | None:
        """The hook FAULT_ENV asks for, or None when it is unset."""
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        rank, _, iteration = spec.partition(":")
        return cls(int(rank), int(iteration))

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if dist.get_rank() == self.rank and runner.iter + 1 == self.iteration:
            raise RuntimeError(f"injected fault ({FAULT_ENV}) at iteration {self.iteration}")
