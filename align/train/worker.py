"""One rank of a full run: train and validate the case's model under mmengine's Runner."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from align.runtime.environment import record as environment
from align.train import compat, datasets
from align.train.hooks import EpochRecorder, EpochSeed, FaultInjection, ProgressBar
from align.train.metrics import CocoBoxAP, TopKAccuracy
from align.train.model import Classifier, Detector, detector_at
from align.train.optim import optim_wrapper, param_schedulers
from align.train.options import RunOptions
from align.zoo import get_case

if TYPE_CHECKING:
    from mmengine.evaluator import BaseMetric
    from mmengine.model import BaseModel

LOG_INTERVAL = 50  # iterations between mmengine's log lines in rankN.log


@record
def run_worker(opts: RunOptions) -> dict[str, Any] | None:
    """Train this rank (RANK, LOCAL_RANK... set by the launcher); rank 0 returns the report.

    Everything the rank prints goes to `<work_dir>/rank<N>.log`; rank 0 keeps the
    terminal for its progress bar. `@record` hands an exception to the launcher.
    """
    rank = int(os.environ["RANK"])
    terminal = _redirect_output(opts.work_dir / f"rank{rank}.log")
    try:
        return _train(opts, rank, terminal if rank == 0 else None)
    except BaseException:
        import traceback

        traceback.print_exc()  # into rankN.log; the launcher reports the message
        raise


def _redirect_output(log: Path) -> IO[str]:
    """Send this process's stdout and stderr to `log`; return a stream on the old stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return terminal


def _set_numerics(opts: RunOptions) -> None:
    """Deterministic algorithms where the device has them, and a fair share of CPU threads."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism
    torch.use_deterministic_algorithms(True, warn_only=opts.device != "cpu")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if opts.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.cards_per_node))


@dataclass(frozen=True)
class _Task:
    """What a task (classification, detection) brings to the same training loop."""

    splits: datasets.Splits
    model: BaseModel
    metric: BaseMetric
    collate: Any  # mmengine's collate_fn: a config dict or a function
    final: tuple[str, ...]  # the validation metrics a result reports, the first to judge


def _task(opts: RunOptions) -> _Task:
    """The data, model and metric of `opts.case`, with the same initial weights everywhere."""

    case, recipe = get_case(opts.case), opts.recipe
    torch.manual_seed(opts.seed)  # the same initial weights on every rank and every run
    if case.task == "detection":
        from torchvision.models.detection.ssd import SSD

        net = detector_at(case.build(), recipe.image_size)
        splits = datasets.load_detection(
            opts.data,
            opts.seed,
            augment="ssd" if isinstance(net, SSD) else "flip",
            fill=tuple(net.transform.image_mean),
            repeat=recipe.repeat_dataset,
        )
        metric = CocoBoxAP(str(splits.annotations))
        return _Task(splits, Detector(net), metric, datasets.collate_lists, ("box_ap", "box_ap50"))

    model = Classifier(case.build(), recipe.label_smoothing)
    splits = datasets.load(recipe.dataset, opts.data, recipe.image_size, opts.seed)
    return _Task(splits, model, TopKAccuracy(), {"type": "default_collate"}, ("top1", "top5"))


def _train(opts: RunOptions, rank: int, terminal: IO[str] | None) -> dict[str, Any] | None:
    from mmengine.evaluator import Evaluator
    from mmengine.hooks import SyncBuffersHook
    from mmengine.runner import Runner

    _set_numerics(opts)
    compat.init_process_group(opts.backend, opts.device, opts.timeout_s)
    recipe, world = opts.recipe, opts.world_size
    task = _task(opts)
    splits = task.splits
    model = compat.wrap_ddp(task.model, opts.device)
    iters_per_epoch = math.ceil(len(splits.train) / world) // recipe.batch_per_card

    recorder = EpochRecorder(task.final[0])
    # SyncBuffersHook averages BatchNorm statistics over ranks after each epoch, before
    # the checkpoint: every rank validates with the checkpointed statistics, so a resumed
    # run validates exactly as the uninterrupted one.
    hooks = [recorder, EpochSeed(opts.seed), compat.WeightsOnlyCheckpoint(), SyncBuffersHook()]
    hooks += [ProgressBar(terminal)] if terminal is not None else []
    fault = FaultInjection.from_env()
    hooks += [fault] if fault is not None else []
    loader = partial(
        _loader, splits=splits, batch=recipe.batch_per_card, opts=opts, collate=task.collate
    )
    runner = Runner(
        model=model,
        work_dir=str(opts.work_dir),
        experiment_name=f"{opts.case}-seed{opts.seed}",
        train_dataloader=loader(splits.train, train=True),
        val_dataloader=loader(splits.val, train=False),
        val_evaluator=Evaluator([task.metric]),
        train_cfg={"by_epoch": True, "max_epochs": recipe.epochs, "val_interval": 1},
        val_cfg={},
        optim_wrapper=optim_wrapper(recipe, recipe.precision, opts.device),
        param_scheduler=param_schedulers(recipe, recipe.epochs, iters_per_epoch),
        default_hooks={
            "checkpoint": {"type": "CheckpointHook", "interval": 1, "max_keep_ckpts": 2},
            "logger": {"type": "LoggerHook", "interval": LOG_INTERVAL},
        },
        custom_hooks=hooks,
        launcher="pytorch",  # the process group is up already (compat gap 1)
        env_cfg={"dist_cfg": {"backend": opts.backend}},
        randomness={"seed": opts.seed},
        resume=opts.resume,
    )
    runner.train()
    if rank != 0:
        return None
    last = recorder.epochs[-1]
    return {
        "epochs": recorder.epochs,
        "final": {name: last[name] for name in task.final},
        "n_val": len(splits.val),
        "precision_note": compat.precision_switch(recipe.precision, runner.optim_wrapper),
        "environment": environment({"train": opts.device}),
        "resumed_from": recorder.resumed_from,
    }


def _loader(
    dataset, *, splits: datasets.Splits, batch: int, opts: RunOptions, collate: Any, train: bool
) -> dict:
    """mmengine dataloader config: seeded DefaultSampler, the task's collate, full last batch."""
    return {
        "dataset": dataset,
        "batch_size": batch,
        "num_workers": splits.loader_workers,
        "persistent_workers": False,  # workers re-pickle the dataset after set_epoch
        "pin_memory": opts.device != "cpu",
        "drop_last": train,
        "sampler": {"type": "DefaultSampler", "shuffle": train, "seed": opts.seed},
        "collate_fn": collate,
    }
