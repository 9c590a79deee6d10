"""`align compare` (python -m align.compare): judge a target dump against a reference (and
a float64 golden) dump: align traces, align.Recorder loop dumps, msprobe dumps."""

from __future__ import annotations

import argparse
import logging

from align.api import compare
from align.commands.arguments import model_factory, writable_file
from align.commands.command import Command
from align.commands.summaries import SUMMARIES
from align.errors import ExitCode

log = logging.getLogger(__name__)


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "reference", help="reference dump directory (align trace, align.Recorder loop, msprobe)"
    )
    p.add_argument(
        "target", help="target dump directory (align trace, align.Recorder loop, msprobe)"
    )
    p.add_argument("--golden", default=None, help="float64 golden trace (align dump --golden)")
    p.add_argument("--json", type=writable_file, help="write the result JSON here")
    p.add_argument(
        "--model",
        type=model_factory,
        metavar="MODULE:FUNCTION",
        help="align.Recorder dumps: the function that builds the model the script trains "
        "(e.g. train:build_model); the first failing (else first) step's modules are "
        "re-run alone from the dumps to name the culprits",
    )


def _compare(args: argparse.Namespace) -> int:
    log.info("judging %s against %s", args.target, args.reference)
    report = compare(args.reference, args.target, args.golden, model=args.model)
    print(report)
    if args.json:
        report.save(args.json)
    return ExitCode.of(report.passed)


COMPARE = Command(
    "compare",
    SUMMARIES["compare"],
    _compare_arguments,
    _compare,
    examples=(
        "gpu_dump npu_dump --golden golden_dump --json result.json",
        "gpu_dump npu_dump --golden golden_dump --model train:build_model",
    ),
)
