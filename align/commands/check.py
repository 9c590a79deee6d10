"""`align check` (python -m align.check): a model's alignment on two devices against a
float64 golden; `--dump` also writes the three runs' traces (align dump)."""

from __future__ import annotations

import argparse

from align.api import check
from align.commands.arguments import model_options, positive_int, writable_dir, writable_file
from align.commands.command import Command
from align.commands.dump import dump_run
from align.commands.summaries import SUMMARIES
from align.errors import ExitCode
from align.runtime.devices import resolve


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="a registered case (align list), a timm model name, or MODULE:FUNCTION building "
        "your own: a model, (model, inputs) or (model, inputs, loss_fn)",
    )
    p.add_argument("--target", default="auto", help="device under test (default: best present)")
    p.add_argument("--reference", default="cpu", help="reference device (default: cpu)")
    p.add_argument("--phases", default="forward,backward", help="forward,backward,train")
    p.add_argument(
        "--steps", type=positive_int, default=5, help="optimizer steps of the train phase"
    )
    p.add_argument(
        "--emulate",
        default=None,
        help="CPU target emulating a device's numerics (npu-fp32, cuda-fp32, ...); "
        "default npu-fp32 when the target is the reference's CPU; 'none' for off",
    )
    p.add_argument("--json", type=writable_file, help="write the result JSON here")
    p.add_argument(
        "--dump", type=writable_dir, help="also write reference/target/golden traces here"
    )
    model_options(p)


def _check(args: argparse.Namespace) -> int:
    emulate = args.emulate
    target = resolve(args.target)
    if emulate is None and target.type == "cpu" and resolve(args.reference).type == "cpu":
        emulate = "npu-fp32"
        print(
            "no accelerator here: the target is the CPU emulating npu-fp32 numerics "
            "(--emulate none to turn off)"
        )
    if emulate == "none":
        emulate = None
    report = check(
        args.model,
        reference=args.reference,
        target=str(target),
        precision=args.precision,
        phases=args.phases,
        seed=args.seed,
        steps=args.steps,
        emulate=emulate,
        sensitivity=bool(emulate),
        batch=args.batch,
        image_size=args.size,
    )
    print(report)
    if args.json:
        report.save(args.json)
    if args.dump:
        _dump_all(args, str(target), emulate)
    return ExitCode.of(report.passed)


def _dump_all(args: argparse.Namespace, target: str, emulate: str | None) -> None:
    """check --dump: the reference (with 2 honest draws), target and golden traces."""
    reference = None  # target and golden take the reference's discrete choices
    for role, device, precision_, emu, draws in (
        ("reference", args.reference, args.precision, emulate, 2),
        ("target", target, args.precision, emulate, 0),
        ("golden", "cpu", "fp64", None, 0),
    ):
        path, trace = dump_run(args, device, precision_, emu, args.dump / role, draws, reference)
        reference = reference or trace
        print(f"{role} trace: {path}")


CHECK = Command(
    "check",
    SUMMARIES["check"],
    _check_arguments,
    _check,
    examples=(
        "resnet50",
        "resnet18 --precision bf16 --batch 2 --size 64 --json result.json",
        "train:build_model --phases forward,backward,train   # build_model() in ./train.py",
    ),
    details="Runs the model on the reference and the target, judges every layer against a "
    "float64 golden run relative to the reference's own error, and isolates the modules that "
    "are wrong on their own.",
)
