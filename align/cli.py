"""The `align` command: one subcommand per job, the same code as `python -m align.<job>`.

    align --help                     # the subcommands, one line each
    align check resnet50             # = python -m align.check resnet50
    align calibrate resnet50         # = python -m align.golden calibrate resnet50

Each subcommand is a `Command` (its arguments, its body, an example) defined next to its
code: check, compare and dump here, list in align.list, run in align.run, report in
align.report.cli, calibrate in align.calibrate. Every command exits with an
align.errors.ExitCode: 0 aligned or confirmed, 1 not, 2 a usage, data or environment
error (one line on stderr; a bug adds its traceback). Progress goes to stderr through
`logging` (-q quiets it, -v adds debug lines); stdout holds the report.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from align.arguments import positive_int, precision, writable_dir, writable_file
from align.errors import AlignError, ExitCode

if TYPE_CHECKING:
    from align.trace import Trace

__all__ = ["CHECK", "COMPARE", "DUMP", "Command", "commands", "main"]

log = logging.getLogger(__name__)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (the usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Command:
    """One subcommand: a one-line summary, its arguments, its body and examples."""

    name: str
    summary: str  # its line in `align --help`, and the first line of its own --help
    arguments: Callable[[argparse.ArgumentParser], None]
    body: Callable[[argparse.Namespace], int]
    examples: tuple[str, ...]  # arguments after the command name, shown by --help
    details: str = ""  # the rest of its description

    def main(self, argv: Sequence[str] | None = None) -> int:
        """`python -m align.<name> ...`: the same command under its module's name."""
        parser = Parser(prog=f"python -m align.{self.name}")
        self._configure(parser)
        return _execute(parser.parse_args(argv))

    def add_to(self, subparsers: argparse._SubParsersAction) -> None:
        """Add this command to the subcommands of `align` (or of python -m align.golden)."""
        self._configure(subparsers.add_parser(self.name))

    def _configure(self, parser: argparse.ArgumentParser) -> None:
        details = textwrap.fill(self.details, 88) if self.details else ""
        parser.description = "\n\n".join(filter(None, (self.summary, details)))
        parser.epilog = ("examples:\n" if len(self.examples) > 1 else "example:\n") + "\n".join(
            f"  {parser.prog} {e}".rstrip() for e in self.examples
        )
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        self.arguments(parser)
        talk = parser.add_mutually_exclusive_group()
        talk.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
        talk.add_argument("-v", "--verbose", action="store_true", help="debug lines too")
        label = parser.prog.removeprefix("python -m ")  # how its errors name the command
        parser.set_defaults(command=self, label=label)


def commands() -> tuple[Command, ...]:
    """Every subcommand of `align`, in the order `align --help` lists them."""
    from align.calibrate import CALIBRATE  # here: those modules import Command from this one
    from align.list import LIST
    from align.report.cli import REPORT
    from align.run import RUN

    return (CHECK, COMPARE, DUMP, LIST, RUN, REPORT, CALIBRATE)


def main(
    argv: Sequence[str] | None = None, *, prog: str = "align", only: Sequence[str] = ()
) -> int:
    """`align COMMAND ...` (the console script); `only` offers some commands alone, as
    `python -m align.golden calibrate` does."""
    offered = [c for c in commands() if not only or c.name in only]
    parser = Parser(
        prog=prog,
        usage="%(prog)s COMMAND [OPTIONS ...]",
        description="Cross-device accuracy alignment of PyTorch models.\n\ncommands:\n"
        + "\n".join(f"  {c.name:<10} {c.summary}" for c in offered),
        epilog=textwrap.fill(
            f"`{prog} COMMAND --help` shows a command's options and an example; "
            "`python -m align.COMMAND` runs the same command (calibrate: python -m "
            "align.golden calibrate). Exit codes: 0 aligned or confirmed, 1 not, 2 a usage, "
            "data or environment error.",
            88,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(
        metavar="COMMAND", required=True, help=argparse.SUPPRESS, prog=prog
    )
    for command in offered:
        command.add_to(subparsers)
    return _execute(parser.parse_args(argv))


class _Stderr(logging.Handler):
    """Writes to the sys.stderr of the moment (pytest and embedding callers swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


def _log_progress(args: argparse.Namespace) -> None:
    """Send align's stage lines to stderr at the level -q / -v ask for (once per run)."""
    logger = logging.getLogger("align")
    logger.setLevel(
        logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    )
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)


def _execute(args: argparse.Namespace) -> int:
    """Run the parsed command: AlignError or OSError is one line and exit 2, and so is a
    bug (with its traceback): nothing but a verdict exits 1, "not aligned"."""
    _log_progress(args)
    try:
        return args.command.body(args)
    except (AlignError, OSError) as exc:  # OSError: a file that cannot be read or written
        print(f"{args.label}: error: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except Exception:
        traceback.print_exc()
        print(f"{args.label}: error: internal error in align (traceback above)", file=sys.stderr)
        return ExitCode.ERROR


# -- check, dump, compare ------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    """Options that make the model and inputs, shared by check and dump."""
    parser.add_argument(
        "--precision",
        type=precision,
        default="fp32",
        help="fp32, amp-fp16, amp-bf16, o2-fp16 (aliases O1, O2, bf16)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=positive_int, default=None, help="batch size of the inputs")
    parser.add_argument(
        "--size", type=positive_int, default=None, help="image size (classification)"
    )


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a registered case (align list) or a timm model name")
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
    _common(p)


def _check(args: argparse.Namespace) -> int:
    import align
    from align.devices import resolve

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
    return ExitCode.of(report.passed)


def _dump_all(args: argparse.Namespace, target: str, emulate: str | None) -> None:
    """check --dump: the reference (with 2 honest draws), target and golden traces."""
    reference = None  # target and golden take the reference's discrete choices
    for role, device, precision_, emu, draws in (
        ("reference", args.reference, args.precision, emulate, 2),
        ("target", target, args.precision, emulate, 0),
        ("golden", "cpu", "fp64", None, 0),
    ):
        path, trace = _dump(args, device, precision_, emu, args.dump / role, draws, reference)
        reference = reference or trace
        print(f"{role} trace: {path}")


def _dump(
    args: argparse.Namespace,
    device: str,
    precision_: str,
    emulate: str | None,
    out: Path,
    draws: int = 0,
    decisions_of: Trace | None = None,
) -> tuple[Path, Trace]:
    """Capture one run of args.model and save it to `out`: (its path, the trace)."""
    import align
    from align.models import resolve_model

    resolved = resolve_model(args.model, None, None, args.seed, args.batch, args.size)
    log.info("capturing %s on %s at %s", resolved.label, device, precision_)
    trace = align.capture(
        resolved.model,
        resolved.inputs,
        device=device,
        precision=precision_,
        loss_fn=resolved.loss_fn,
        seed=args.seed,
        emulate=emulate,
        draws=draws,
        grad_inputs=resolved.grad_inputs,
        decisions_of=decisions_of,
    )
    trace.meta["case"] = resolved.case
    return trace.save(out), trace


def _dump_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a registered case (align list) or a timm model name")
    p.add_argument(
        "--out", type=writable_dir, required=True, help="directory to write the trace to"
    )
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


def _dump_one(args: argparse.Namespace) -> int:
    if args.draws < 0 or (args.golden and args.draws):
        raise AlignError("--draws is a count >= 0, for the reference's dump (not --golden)")
    device, precision_ = ("cpu", "fp64") if args.golden else (args.device, args.precision)
    from align.trace import load_trace

    reference = None if args.decisions is None else load_trace(args.decisions)
    path, _ = _dump(args, device, precision_, args.emulate, args.out, args.draws, reference)
    print(f"trace written to {path}")
    return ExitCode.PASSED


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "reference", help="reference dump directory (align trace, align.Recorder loop, msprobe)"
    )
    p.add_argument(
        "target", help="target dump directory (align trace, align.Recorder loop, msprobe)"
    )
    p.add_argument("--golden", default=None, help="float64 golden trace (align dump --golden)")
    p.add_argument("--json", type=writable_file, help="write the result JSON here")


def _compare(args: argparse.Namespace) -> int:
    import align

    log.info("judging %s against %s", args.target, args.reference)
    report = align.compare(args.reference, args.target, args.golden)
    print(report)
    if args.json:
        report.save(args.json)
    return ExitCode.of(report.passed)


CHECK = Command(
    "check",
    "check a model's alignment: reference and target against a float64 golden",
    _check_arguments,
    _check,
    examples=("resnet50", "resnet18 --precision bf16 --batch 2 --size 64 --json result.json"),
    details="Runs the model on the reference and the target, judges every layer against a "
    "float64 golden run relative to the reference's own error, and isolates the modules that "
    "are wrong on their own.",
)
DUMP = Command(
    "dump",
    "write one run's trace, to compare runs across machines",
    _dump_arguments,
    _dump_one,
    examples=(
        "resnet50 --device cuda --draws 2 --out gpu_dump",
        "resnet50 --golden --decisions gpu_dump --out golden_dump",
    ),
)
COMPARE = Command(
    "compare",
    "judge a target dump against a reference (and golden) dump",
    _compare_arguments,
    _compare,
    examples=("gpu_dump npu_dump --golden golden_dump --json result.json",),
)
