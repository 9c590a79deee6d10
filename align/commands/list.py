"""`align list [PATTERN ...]` (= `python -m align.list`): the case zoo, no wider than 100.

One line per case (name, task, source model), then each documented figure with its
conditions (figures measured under the same conditions share a line); a case that cannot
run here gets a `skip:` line with the reason. A footer explains the source pages' marks,
`(*)`, `(**)`, from the cases' golden files. PATTERNs are fnmatch wildcards (default:
every case). Exits 0.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Sequence

from align.commands.command import Command
from align.commands.summaries import SUMMARIES
from align.errors import ExitCode
from align.zoo import get_case, list_cases
from align.zoo.golden import load_golden

__all__ = ["LIST", "format_marks", "format_table", "main"]

WIDTH = 100
_HEADER = ("case", "task", "source model")
_MARK = re.compile(r"\((\*+)\)")  # a source page's footnote mark at the start of a text


def _wrap(text: str, first: str, rest: str) -> list[str]:
    """`text` in lines of at most WIDTH, starting with `first`, continued after `rest`
    (long words such as config names are kept whole, so they can be searched for)."""
    return textwrap.wrap(
        text,
        WIDTH,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    )


def format_table(names: Sequence[str]) -> str:
    """The table for the cases called `names`, as printed by `align list`."""

    cases = [get_case(name) for name in names]
    widths = [
        max(len(_HEADER[0]), *(len(c.name) for c in cases)),
        max(len(_HEADER[1]), *(len(c.task) for c in cases)),
    ]
    left = sum(widths) + 2 * len(widths)  # where the source model column starts

    def row(*cells: str) -> list[str]:
        start = "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  "
        return _wrap(cells[-1], start, " " * left)

    out = row(*_HEADER) + ["  ".join("-" * w for w in [*widths, WIDTH - left])]
    for case in cases:
        out += row(case.name, case.task, case.source_model)
        groups: list[tuple[list[str], str]] = []  # figures sharing conditions, in order
        for fig in case.figures:
            label = f"{fig.metric} {fig.value:g}"
            if groups and groups[-1][1] == fig.conditions:
                groups[-1][0].append(label)
            else:
                groups.append(([label], fig.conditions))
        for labels, conditions in groups:
            out += _wrap(
                f"{', '.join(labels)}: {conditions or '(no conditions given)'}", "  ", "      "
            )
        if not case.figures:
            out.append("  (no documented figure)")
        if case.skip:
            out += _wrap(f"skip: {case.skip}", "  ", "      ")
    return "\n".join(out)


def format_marks(names: Sequence[str]) -> str:
    """What the marks `(*)`, `(**)` before the conditions of these cases' figures mean,
    from their golden files' notes ("" when none is marked)."""

    lines = []
    for name in names:
        marks = {m.group(0) for f in get_case(name).figures if (m := _MARK.match(f.conditions))}
        for mark in sorted(marks):
            notes = [n for n in load_golden(name).notes if n.startswith(mark)]
            text = notes[0][len(mark) :].strip() if notes else "not explained in its golden file"
            lines += _wrap(f"{mark} {name}: {text}", "  ", "      ")
    if not lines:
        return ""
    return "\n".join(
        ["marks of the source pages, from align/zoo/golden_files/<case>.toml notes:", *lines]
    )


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "patterns", nargs="*", default=["*"], metavar="PATTERN", help="fnmatch wildcard (default *)"
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN", help="leave these out"
    )


def _list(args: argparse.Namespace) -> int:

    names = list_cases(args.patterns, exclude=args.exclude)
    if not names:
        print(
            f"no case matches {' '.join(args.patterns)}; registered: {', '.join(list_cases())}",
            file=sys.stderr,
        )
        return ExitCode.PASSED
    print(format_table(names))
    skipped = sum(1 for n in names if get_case(n).skip)
    print(f"\n{len(names)} cases" + (f", {skipped} skipped here" if skipped else ""))
    if marks := format_marks(names):
        print(marks)
    return ExitCode.PASSED


LIST = Command(
    "list",
    SUMMARIES["list"],
    _arguments,
    _list,
    examples=("", "'resnet*' --exclude '*cifar*'"),
)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m align.list`: print the zoo and return the exit code 0."""
    return LIST.main(argv)
