"""Training throughput of `python -m align.run` against a bare torch DDP loop.

Both train the digits case's recipe (timm test_resnet, 32 px, 32 per card, SGD) on the
same data with the same number of gloo workers, started by the same elastic launcher,
and count global training images per second over the training part of each epoch
(validation excluded), as result.json's images_per_s does.

    python bench/bench_run.py [--epochs 4] [--cards 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from align.train import datasets, full_run
from align.zoo import get_case


def bare_worker(epochs: int, cards: int) -> float:
    """One rank of a plain DDP loop on the digits recipe; global images/s (rank 0)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cards))
    dist.init_process_group("gloo")
    case = get_case("digits")
    recipe = case.recipe
    splits = datasets.load(recipe.dataset, None, recipe.image_size, seed=0)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(case.build())
    sampler = torch.utils.data.DistributedSampler(splits.train, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(
        splits.train, batch_size=recipe.batch_per_card, sampler=sampler, drop_last=True
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    criterion = torch.nn.CrossEntropyLoss()
    images = seconds = 0.0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        start = time.perf_counter()
        for inputs, labels in loader:
            loss = criterion(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            images += len(labels) * dist.get_world_size()
        seconds += time.perf_counter() - start
    dist.destroy_process_group()
    return images / seconds


def bare(epochs: int, cards: int) -> float:
    """Global images/s of the bare loop on `cards` gloo workers."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=cards,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        run_id="bench-bare",
        max_restarts=0,
        monitor_interval=0.5,
    )
    return elastic_launch(config, bare_worker)(epochs, cards)[0]


def align_run(epochs: int, cards: int) -> float:
    """Global images/s that python -m align.run reports for the same training."""
    with tempfile.TemporaryDirectory() as work:
        opts = full_run.prepare(
            "digits", epochs=epochs, cards=cards, device="cpu", work_dir=Path(work)
        )
        return full_run.run(opts)["images_per_s"]


def main() -> None:
    """Measure both, print them and the overhead ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--cards", type=int, default=2)
    args = p.parse_args()
    raw = bare(args.epochs, args.cards)
    ours = align_run(args.epochs, args.cards)
    setup = f"{args.cards} gloo workers, {args.epochs} epochs"
    print(f"bare torch DDP loop : {raw:8.1f} images/s ({setup})")
    print(f"python -m align.run : {ours:8.1f} images/s")
    print(f"overhead ratio      : {raw / ours:8.3f} (bare / align.run; 1.0 = no overhead)")


if __name__ == "__main__":
    main()
