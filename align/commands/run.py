"""`align run` (= python -m align.run): train a case as documented and confirm its figure.

    python -m align.run resnet50 --epochs 200 --cards 8 --data PATH --device npu
    python -m align.run digits --cards 2            # the embedded case: about a minute on a CPU
    python -m align.run retinanet_r50 --cards 8 --device npu --data /data/coco --repeat 3
    python -m align.run --compare work_dirs/a/result.json work_dirs/b/result.json

Exit status: 0 the documented figure is confirmed, 1 it is not, 2 a usage, data or
environment error (or a training rank that failed).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from align.commands.arguments import positive_float, positive_int
from align.commands.command import Command
from align.commands.summaries import SUMMARIES
from align.errors import AlignError, ExitCode, require_extra


def _arguments(p: argparse.ArgumentParser) -> None:
    """The options of align run."""
    p.add_argument("case", nargs="?", help="a registered case (align list)")
    p.add_argument("--epochs", type=positive_int, help="default: the recipe's")
    p.add_argument(
        "--cards", type=positive_int, help="workers per node (default: the recipe's cards)"
    )
    p.add_argument("--device", help="cpu, cuda or npu (default: the best present)")
    p.add_argument("--precision", help="fp32, amp-fp16, amp-bf16, o2-fp16 (aliases O1, O2, bf16)")
    p.add_argument(
        "--data", help="dataset root: ImageNet folders, CIFAR-100, COCO (detection cases)"
    )
    p.add_argument("--batch-size", type=positive_int, help="per card (default: the recipe's)")
    p.add_argument(
        "--lr", type=positive_float, help="default: the recipe's, scaled to the global batch"
    )
    p.add_argument("--work-dir", help="default: work_dirs/<case>")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument(
        "--repeat", type=positive_int, default=1, metavar="K", help="K runs, seeds seed..seed+K-1"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nnodes", type=positive_int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument(
        "--master-port", type=positive_int, help="rendezvous port (several nodes: 29500)"
    )
    p.add_argument(
        "--compare", nargs="+", metavar="RESULT", help="judge result.json files together"
    )


def _run(args: argparse.Namespace) -> int:
    return _compare(args.compare) if args.compare else _train(args)


def _train(args: argparse.Namespace) -> int:
    full_run, result = _train_modules()
    if not args.case:
        raise AlignError("name a case (python -m align.list shows them) or use --compare")
    if args.repeat > 1 and args.resume:
        raise AlignError("--repeat K cannot be combined with --resume")
    opts = full_run.prepare(
        args.case,
        epochs=args.epochs,
        cards=args.cards,
        device=args.device,
        precision=args.precision,
        data=args.data,
        batch_size=args.batch_size,
        lr=args.lr,
        work_dir=args.work_dir,
        resume=args.resume,
        seed=args.seed,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        runs=args.repeat,
    )
    if args.repeat == 1:
        out = full_run.run(opts)
        if out is None:
            print(f"node {opts.node_rank} finished; node 0 writes the result and the verdict")
            return ExitCode.PASSED
        print(result.summary(out))
        print(f"  result: {opts.work_dir / full_run.RESULT}")
        return ExitCode.of(out["verdict"]["passed"])
    runs, verdict = full_run.repeat(opts, args.repeat)
    for out in runs:
        print(result.summary(out))
    summary_path = opts.work_dir / "repeat.json"
    result.write(
        summary_path,
        {
            "schema": result.SCHEMA,
            "kind": "repeat",
            "case": opts.case,
            "results": [str(opts.work_dir / f"seed{r['seed']}" / full_run.RESULT) for r in runs],
            "verdict": verdict.to_dict(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    return _print_verdict(verdict, summary_path)


def _compare(paths: list[str]) -> int:
    full_run, result = _train_modules()
    verdict = full_run.compare([result.read(Path(p)) for p in paths])
    return _print_verdict(verdict, None)


def _train_modules():
    """align.train's full_run and result: imported on use, as they need the `run` extra
    (mmengine's Runner), which `align check` and the other commands do not."""
    require_extra("mmengine", "run", "align run (a full training run)")
    from align.train import full_run, result

    return full_run, result


def _print_verdict(verdict, path: Path | None) -> int:
    print(f"{'PASS' if verdict.passed else 'FAIL'}: {verdict.reason}")
    if verdict.runs:
        print("  values: " + ", ".join(f"{v:.2f}" for v in verdict.runs["values"]))
    if path is not None:
        print(f"  written: {path}")
    return ExitCode.of(verdict.passed)


RUN = Command(
    "run",
    SUMMARIES["run"],
    _arguments,
    _run,
    examples=(
        "digits --cards 2                 # the embedded case: about a minute on a CPU",
        "resnet50 --epochs 200 --cards 8 --device npu --data /data/imagenet",
        "--compare work_dirs/a/result.json work_dirs/b/result.json",
    ),
    details="Judges the final Top-1 / box AP against the documented figure, with evaluation "
    "noise and run-to-run spread taken into account; result.json in the work dir holds the "
    "per-epoch metrics.",
)


def main(argv: list[str] | None = None) -> int:
    """`python -m align.run`: run the command line and return the exit status."""
    return RUN.main(argv)
