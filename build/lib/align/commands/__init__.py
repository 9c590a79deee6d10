"""The `align` command and its subcommands; each is also `python -m align.<name>`.

    align --help                     # the subcommands, one line each
    align check resnet50             # = python -m align.check resnet50
    align calibrate resnet50         # = python -m align.golden calibrate resnet50

Index (one module per subcommand, each defining its `Command`):
    command.py    Command, its parser, the guard that maps errors to exit codes
    arguments.py  argparse types: positive numbers, precisions, writable paths
    check.py      align check: a model on two devices against a float64 golden
    dump.py       align dump: one run's trace, for comparing across machines
    compare.py    align compare: judge dumps (align traces, Recorder loops, msprobe)
    list.py       align list: the cases with their documented figures
    run.py        align run: a full training run by a case's recipe, confirmed
    report.py     align report: HTML and Markdown report of a night's results
    calibrate.py  align calibrate: measure a case's honest noise, write its tolerances

Exit codes (align.errors.ExitCode): 0 aligned or confirmed, 1 not, 2 a usage, data or
environment error (one line on stderr; a bug adds its traceback). Progress goes to stderr
through `logging` (-q quiets it, -v adds debug lines); stdout holds the report.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence

from align.commands.calibrate import CALIBRATE
from align.commands.check import CHECK
from align.commands.command import Command, Parser, execute
from align.commands.compare import COMPARE
from align.commands.dump import DUMP
from align.commands.list import LIST
from align.commands.report import REPORT
from align.commands.run import RUN

__all__ = ["COMMANDS", "main"]

COMMANDS: tuple[Command, ...] = (CHECK, COMPARE, DUMP, LIST, RUN, REPORT, CALIBRATE)


def main(
    argv: Sequence[str] | None = None, *, prog: str = "align", only: Sequence[str] = ()
) -> int:
    """`align COMMAND ...` (the console script); `only` offers some commands alone, as
    `python -m align.golden calibrate` does."""
    offered = [c for c in COMMANDS if not only or c.name in only]
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
    return execute(parser.parse_args(argv))
