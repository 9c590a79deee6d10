"""The verdict on users' own training loops: align.Recorder dumps of models nobody
calibrated, compared step by step with the culprit module named.

    python bench/recorder_catalogue.py                    # the default catalogue (~20 min)
    python bench/recorder_catalogue.py --models resnet26d --precisions amp-bf16 \
        --steps 4 5 --optimizer sgd --faults kernel_gain norm_eps --json out.json

Each model (a timm image classifier, built as bench/verdict_catalogue.py builds it: train
mode, dropout and drop-path on, 10 classes; or one of align.testing.USER_MODELS, its
cross-entropy over its output's dim 1) is trained by a plain loop (AdamW or SGD with
momentum, optional gradient clipping, optional accumulation over `--accumulate`
micro-batches, bf16 autocast for amp-bf16, fp16 autocast with a GradScaler for amp-fp16)
on seeded random batches, recording `--steps`: the reference,
its float64 golden (`golden=True`), two honest draws (`draw=1, 2`) and one target per
check, each replaying the reference's decisions. Honest targets (half-ulp, one-ulp, channels_last:
verdict_catalogue.target_for) must pass; faulty ones (align.testing.FAULTS, at the site
verdict_catalogue.fault_sites picks) must fail with the faulty module as the first
culprit of `align.compare(ref, target, golden, model=...)`. A fault that only changes the
weights once (norm_gain, weight_via_fp16) is left out when the first recorded step is not
step 0: a replaying run takes the reference's state there (align.record.loop), by design.
Prints one line per check and the totals.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from verdict_catalogue import (
    HONEST,
    HONEST_KINDS,
    build,
    fault_sites,
    not_a_fault,
    outcome,
    target_for,
    totals,
)

import align
from align.errors import AlignError
from align.testing import FAULTS

MODELS = ["resnet26d", "ghostnet_050", "efficientnet_b0", "mobilenetv3_small_050", "convnext_atto"]
AUTOCAST = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}
# faults that change the weights once, before training: after unrecorded steps a replaying
# run starts from the reference's state, so only a recorded step 0 can see them
STATE_FAULTS = {"norm_gain", "weight_via_fp16"}


def like(x: torch.Tensor, gen: torch.Generator, batch: int | None = None) -> torch.Tensor:
    """A random batch shaped like `x` (`batch` rows): normal values, or token ids below
    the largest of `x`'s (a user model's integer inputs)."""
    shape = (x.shape[0] if batch is None else batch, *x.shape[1:])
    if x.is_floating_point():
        return torch.randn(shape, generator=gen)
    return torch.randint(0, int(x.max()) + 1, shape, generator=gen)


def train(
    model: nn.Module,
    x: torch.Tensor,
    out: Path,
    *,
    steps: list[int],
    precision: str,
    optimizer: str,
    clip: bool,
    accumulate: int = 1,
    **recorder,
) -> None:
    """Train a private copy of `model` for max(steps) + 1 steps on batches shaped like `x`,
    `accumulate` of them a step (gradients accumulated over micro-batches, the loss divided
    by their count), recording `steps` into `out` (`recorder`: replay=, golden=, draw=)."""
    with torch.no_grad():
        shape = copy.deepcopy(model)(x).shape  # (batch, classes, positions...)
    model = copy.deepcopy(model)
    torch.manual_seed(0)  # the same dropout masks in every run's unrecorded steps
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (like(x, gen), torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen))
        for _ in range((max(steps) + 1) * accumulate)
    ]
    dtype = AUTOCAST.get(precision)
    autocast = dtype is not None and not recorder.get("golden")
    # fp16 trains with dynamic loss scaling, as Ascend's recipes do (apex O1/O2); the
    # float64 golden without (its gradients are recorded unscaled on every side)
    scaler = (
        torch.amp.GradScaler("cpu", enabled=not recorder.get("golden"))
        if precision == "amp-fp16"
        else None
    )
    with align.Recorder(model, out, steps=steps, optimizer=opt, scaler=scaler, **recorder) as rec:
        for n in range(max(steps) + 1):
            with rec.step(n):
                for inputs, labels in batches[n * accumulate : (n + 1) * accumulate]:
                    with torch.autocast("cpu", dtype or torch.bfloat16, enabled=autocast):
                        loss = nn.functional.cross_entropy(model(inputs).float(), labels)
                    loss = loss / accumulate
                    (loss if scaler is None else scaler.scale(loss)).backward()
                if scaler is not None:
                    scaler.unscale_(opt)
                if clip:
                    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                if scaler is None:
                    opt.step()
                else:
                    scaler.step(opt)
                    scaler.update()
                opt.zero_grad()


def run(args: argparse.Namespace, root: Path) -> list[dict]:
    results = []
    for name in args.models:
        model, x = build(name, args.size)
        x = like(x, torch.Generator().manual_seed(0), args.batch)
        sites = fault_sites(model, x)
        checks = [(kind, None) for kind in args.honest] + [
            (kind, site)
            for kind, site in sites.items()
            if (args.faults is None or kind in args.faults)
            and not (kind in STATE_FAULTS and min(args.steps) > 0)
        ]
        for precision in args.precisions:
            where = root / f"{name}-{precision}"
            loop = dict(
                steps=args.steps,
                precision=precision,
                optimizer=args.optimizer,
                clip=args.clip,
                accumulate=args.accumulate,
            )
            ref = where / "ref"
            train(model, x, ref, **loop)
            train(model, x, where / "golden", replay=ref, golden=True, **loop)
            for k in (1, 2):
                train(model, x, ref, draw=k, **loop)
            for kind, site in checks:
                if not_a_fault(precision, model, kind, site, x):
                    continue
                started = time.perf_counter()
                target = where / f"{kind}"
                train(target_for(model, kind, site), x, target, replay=ref, **loop)
                try:
                    report = align.compare(ref, target, where / "golden", model=model)
                except AlignError as exc:  # no verdict possible: said, not counted
                    print(f"{name:24s} {precision:9s} {kind:22s} not checkable: {exc}")
                else:
                    results.append(outcome(name, precision, kind, site, report, started))
                shutil.rmtree(target)  # a dump is GBs: one target on disk at a time
            shutil.rmtree(where)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--precisions", nargs="+", default=["fp32", "amp-bf16"])
    p.add_argument("--honest", nargs="*", default=list(HONEST), choices=HONEST_KINDS)
    p.add_argument("--faults", nargs="*", default=None, choices=list(FAULTS), help="default: all")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2], help="recorded (default 1 2)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--clip", action="store_true", help="clip the gradient norm to 1")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches a step (default 1)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="image size (default 64)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write every check's outcome here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="align-recorder-catalogue-") as tmp:
        results = run(args, Path(tmp))
    print(totals(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
