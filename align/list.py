"""`python -m align.list [PATTERN ...]`: the case zoo as a table.

One row per documented figure: case, source model, task, figure, conditions; a case
that cannot run here gets a `skip:` line with the reason. PATTERNs are fnmatch
wildcards (default: every case). Exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from align.cases import get_case, list_cases

__all__ = ["main", "format_table"]

_HEADER = ("case", "source model", "task", "figure", "conditions")


def _rows(names: Sequence[str]) -> list[tuple[str, ...] | str]:
    rows: list[tuple[str, ...] | str] = []
    for name in names:
        case = get_case(name)
        first = (case.name, case.source_model, case.task)
        blank = ("", "", "")
        previous = None
        for i, fig in enumerate(case.figures or ()):
            conditions = "" if fig.conditions == previous else fig.conditions
            rows.append((*(first if i == 0 else blank), f"{fig.metric} {fig.value:g}", conditions))
            previous = fig.conditions
        if not case.figures:
            rows.append((*first, "-", "(no documented figure)"))
        if case.skip:
            rows.append(f"  skip: {case.skip}")
    return rows


def format_table(names: Sequence[str]) -> str:
    """The table for the cases called `names`, as printed by `python -m align.list`."""
    rows = _rows(names)
    table = [_HEADER, *[r for r in rows if isinstance(r, tuple)]]
    widths = [max(len(r[i]) for r in table) for i in range(len(_HEADER) - 1)]

    def line(row: tuple[str, ...]) -> str:
        cells = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
        return "  ".join(cells).rstrip()

    out = [line(_HEADER), line(tuple("-" * w for w in widths) + ("-" * 10,))]
    out += [r if isinstance(r, str) else line(r) for r in rows]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the zoo (cases matching the PATTERNs) and return the exit code 0."""
    parser = argparse.ArgumentParser(
        prog="python -m align.list",
        description="List align's cases with their documented figures and conditions.",
    )
    parser.add_argument(
        "patterns", nargs="*", default=["*"], metavar="PATTERN", help="fnmatch wildcard (default *)"
    )
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN", help="leave these out"
    )
    args = parser.parse_args(argv)
    names = list_cases(args.patterns, exclude=args.exclude)
    if not names:
        print(
            f"no case matches {' '.join(args.patterns)}; registered: {', '.join(list_cases())}",
            file=sys.stderr,
        )
        return 0
    print(format_table(names))
    skipped = sum(1 for n in names if get_case(n).skip)
    print(f"\n{len(names)} cases" + (f", {skipped} skipped here" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
