"""Command lines: python -m align.check / align.compare / align.dump.

Exit codes: 0 aligned, 1 not aligned, 2 usage, data or environment error.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

from align.errors import AlignError

EXIT_ALIGNED, EXIT_NOT_ALIGNED, EXIT_ERROR = 0, 1, 2


def _guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn AlignError into a one-line message and exit code 2 (argparse already uses 2)."""

    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except AlignError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except Exception:  # a bug must not exit 1, which means "not aligned"
            traceback.print_exc()
            print("error: internal error in align (traceback above)", file=sys.stderr)
            return EXIT_ERROR

    return run


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision", default="fp32", help="fp32, amp-fp16, amp-bf16, o2-fp16 (O1/O2 aliases)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=None, help="batch size of the inputs")
    parser.add_argument("--size", type=int, default=None, help="image size (classification)")


@_guarded
def check_main(argv: list[str] | None = None) -> int:
    """python -m align.check MODEL: alignment check on the best devices present."""
    import align
    from align.devices import resolve

    p = argparse.ArgumentParser(prog="python -m align.check", description=check_main.__doc__)
    p.add_argument("model", help="a registered case (python -m align.list) or a timm model name")
    p.add_argument("--target", default="auto", help="device under test (default: best present)")
    p.add_argument("--reference", default="cpu", help="reference device (default: cpu)")
    p.add_argument("--phases", default="forward,backward", help="forward,backward,train")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps of the train phase")
    p.add_argument(
        "--emulate",
        default=None,
        help="CPU target emulating a device's numerics (npu-fp32, cuda-fp32, ...); "
        "default npu-fp32 when the target is the reference's CPU; 'none' for off",
    )
    p.add_argument("--json", default=None, help="write the result JSON here")
    p.add_argument("--dump", default=None, help="also write reference/target/golden traces here")
    _common(p)
    args = p.parse_args(argv)
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
    report = align.check(
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
    return EXIT_ALIGNED if report.passed else EXIT_NOT_ALIGNED


def _dump_all(args: argparse.Namespace, target: str, emulate: str | None) -> None:
    from pathlib import Path

    reference = None  # target and golden take the reference's discrete choices
    for role, device, precision, emu, draws in (
        ("reference", args.reference, args.precision, emulate, 2),
        ("target", target, args.precision, emulate, 0),
        ("golden", "cpu", "fp64", None, 0),
    ):
        path, trace = _dump(
            args.model, device, precision, emu, args, Path(args.dump) / role, draws, reference
        )
        reference = reference or trace
        print(f"{role} trace: {path}")


def _dump(
    model: str, device: str, precision: str, emulate, args, out, draws: int = 0, decisions_of=None
):
    import align
    from align.models import resolve_model

    resolved = resolve_model(model, None, None, args.seed, args.batch, args.size)
    trace = align.capture(
        resolved.model,
        resolved.inputs,
        device=device,
        precision=precision,
        loss_fn=resolved.loss_fn,
        seed=args.seed,
        emulate=emulate,
        draws=draws,
        grad_inputs=resolved.grad_inputs,
        decisions_of=decisions_of,
    )
    trace.meta["case"] = resolved.case
    return trace.save(out), trace


@_guarded
def dump_main(argv: list[str] | None = None) -> int:
    """python -m align.dump MODEL --out DIR: write one run's trace (dump on each machine)."""
    p = argparse.ArgumentParser(prog="python -m align.dump", description=dump_main.__doc__)
    p.add_argument("model", help="a registered case or a timm model name")
    p.add_argument("--out", required=True, help="directory to write the trace to")
    p.add_argument("--device", default="auto")
    p.add_argument("--emulate", default=None)
    p.add_argument(
        "--golden",
        action="store_true",
        help="the float64 CPU golden run (ignores --device/--precision)",
    )
    p.add_argument(
        "--draws",
        type=int,
        default=0,
        help="honest draws to add (align.jitter): give the reference's dump 2, so the "
        "comparison does not rest on one draw of its rounding noise",
    )
    p.add_argument(
        "--decisions",
        default=None,
        metavar="REFERENCE_DIR",
        help="take the discrete choices (sort, max, max-pool indices) of the reference's "
        "dump, as target and golden dumps should (align.decisions): near-ties are then "
        "judged by one choice, not flagged as jumps",
    )
    _common(p)
    args = p.parse_args(argv)
    if args.draws < 0 or (args.golden and args.draws):
        raise AlignError("--draws is a count >= 0, for the reference's dump (not --golden)")
    device, precision = ("cpu", "fp64") if args.golden else (args.device, args.precision)
    from align.trace import load_trace

    reference = None if args.decisions is None else load_trace(args.decisions)
    path, _ = _dump(
        args.model, device, precision, args.emulate, args, args.out, args.draws, reference
    )
    print(f"trace written to {path}")
    return EXIT_ALIGNED


@_guarded
def compare_main(argv: list[str] | None = None) -> int:
    """python -m align.compare REFERENCE_DIR TARGET_DIR [--golden DIR]: judge two dumps."""
    import align

    p = argparse.ArgumentParser(prog="python -m align.compare", description=compare_main.__doc__)
    p.add_argument(
        "reference", help="reference dump directory (align trace, align.Recorder loop, msprobe)"
    )
    p.add_argument(
        "target", help="target dump directory (align trace, align.Recorder loop, msprobe)"
    )
    p.add_argument(
        "--golden", default=None, help="float64 golden trace (python -m align.dump --golden)"
    )
    p.add_argument("--json", default=None, help="write the result JSON here")
    args = p.parse_args(argv)
    report = align.compare(args.reference, args.target, args.golden)
    print(report)
    if args.json:
        report.save(args.json)
    return EXIT_ALIGNED if report.passed else EXIT_NOT_ALIGNED
