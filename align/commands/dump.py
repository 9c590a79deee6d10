"""`align dump` (python -m align.dump): one run's trace, to compare runs across machines."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from align.api import capture
from align.commands.arguments import model_options, writable_dir
from align.commands.command import Command
from align.commands.summaries import SUMMARIES
from align.errors import AlignError, ExitCode
from align.record.readers import load_trace
from align.record.trace import Trace
from align.zoo.models import resolve_model

log = logging.getLogger(__name__)


def dump_run(
    args: argparse.Namespace,
    device: str,
    precision_: str,
    emulate: str | None,
    out: Path,
    draws: int = 0,
    decisions_of: Trace | None = None,
) -> tuple[Path, Trace]:
    """Capture one run of args.model and save it to `out`: (its path, the trace)."""
    resolved = resolve_model(args.model, None, None, args.seed, args.batch, args.size)
    log.info("capturing %s on %s at %s", resolved.label, device, precision_)
    trace = capture(
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
    p.add_argument(
        "model", help="a registered case (align list), a timm model name, or MODULE:FUNCTION"
    )
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
        help="honest draws to add (align.numerics.jitter): give the reference's dump 2, so the "
        "comparison does not rest on one draw of its rounding noise",
    )
    p.add_argument(
        "--decisions",
        default=None,
        metavar="REFERENCE_DIR",
        help="take the discrete choices (sort, max, max-pool indices) of the reference's "
        "dump, as target and golden dumps should (align.numerics.decisions): near-ties are then "
        "judged by one choice, not flagged as jumps",
    )
    model_options(p)


def _dump_one(args: argparse.Namespace) -> int:
    if args.draws < 0 or (args.golden and args.draws):
        raise AlignError("--draws is a count >= 0, for the reference's dump (not --golden)")
    device, precision_ = ("cpu", "fp64") if args.golden else (args.device, args.precision)
    reference = None if args.decisions is None else load_trace(args.decisions)
    path, _ = dump_run(args, device, precision_, args.emulate, args.out, args.draws, reference)
    print(f"trace written to {path}")
    return ExitCode.PASSED


DUMP = Command(
    "dump",
    SUMMARIES["dump"],
    _dump_arguments,
    _dump_one,
    examples=(
        "resnet50 --device cuda --draws 2 --out gpu_dump",
        "resnet50 --golden --decisions gpu_dump --out golden_dump",
    ),
)
