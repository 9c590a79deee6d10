"""The `align` command and its subcommands; each is also `python -m align.<name>`.

    align --help                     # the subcommands, one line each
    align check resnet50             # = python -m align.check resnet50
    align calibrate resnet50         # = python -m align.golden calibrate resnet50

Index (one module per subcommand, each defining its `Command`):
    summaries.py  the subcommands' names and one-line summaries (`align --help`, no torch)
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
import importlib
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from align.commands.command import Command, Parser, execute
from align.commands.summaries import SUMMARIES

__all__ = ["COMMANDS", "get_command", "main"]


def get_command(name: str) -> Command:
    """The subcommand `name`, its module imported now (most import torch)."""
    return getattr(importlib.import_module(f"align.commands.{name}"), name.upper())


def __getattr__(name: str) -> Any:
    """COMMANDS, every subcommand in `align --help` order, built on first use."""
    if name == "COMMANDS":
        return tuple(get_command(n) for n in SUMMARIES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(
    argv: Sequence[str] | None = None, *, prog: str = "align", only: Sequence[str] = ()
) -> int:
    """`align COMMAND ...` (the console script); `only` offers some commands alone, as
    `python -m align.golden calibrate` does. Only the command named is imported: `align
    --help` lists them from their summaries without importing torch."""
    # (no builtins named like a subcommand here: `list` is the align.commands.list module
    # once it is imported)
    argv = [*(sys.argv[1:] if argv is None else argv)]
    offered = [name for name in SUMMARIES if not only or name in only]
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = Parser(
        prog=prog,
        usage="%(prog)s COMMAND [OPTIONS ...]",
        description="Cross-device accuracy alignment of PyTorch models.\n\ncommands:\n"
        + "\n".join(f"  {name:<10} {SUMMARIES[name]}" for name in offered),
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
    for name in offered:
        if name == chosen:
            get_command(name).add_to(subparsers)
        else:  # a name argparse knows, never parsed: only the command chosen is
            subparsers.add_parser(name)
    return execute(parser.parse_args(argv))
