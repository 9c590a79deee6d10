"""`align report RESULTS_DIR --history H --out report.html [--markdown M] [--night L]`
(= python -m align.report).

Exit codes: 0 when the report was written (whatever the verdicts), 2 on a usage or data
error (a malformed result file is named, no traceback).
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from align.commands.arguments import writable_file
from align.commands.command import Command
from align.commands.summaries import SUMMARIES
from align.errors import AlignError, ExitCode
from align.files import write_atomic
from align.report.diff import compare_nights
from align.report.history import History
from align.report.html import render_html
from align.report.markdown import render_markdown
from align.report.results import load_results

RECENT_NIGHTS = 14


def _arguments(parser: argparse.ArgumentParser) -> None:
    """The options of align report."""
    parser.add_argument(
        "results", type=Path, help="directory of result JSON files (searched recursively)"
    )
    parser.add_argument(
        "--history",
        type=writable_file,
        required=True,
        help="SQLite history file (created if absent)",
    )
    parser.add_argument("--out", type=writable_file, required=True, help="HTML report to write")
    parser.add_argument("--markdown", type=writable_file, help="also write a Markdown summary here")
    parser.add_argument(
        "--night",
        default=datetime.date.today().isoformat(),
        help="label of this night; nights are ordered by label (default: today, YYYY-MM-DD)",
    )
    parser.add_argument("--no-plots", action="store_true", help="leave the plots out (faster)")


def _report(args: argparse.Namespace) -> int:
    night = args.night.strip()
    if not night:
        raise AlignError("--night must not be empty")
    results = load_results(args.results)
    with History(args.history) as history:
        previous = history.previous_night(night)
        before = history.outcomes(previous) if previous else {}
        history.record(night, (o for r in results for o in r.outcomes))
        diff = compare_nights(previous, before, history.outcomes(night))
        nights = history.nights(night, RECENT_NIGHTS)
    write_atomic(args.out, render_html(night, results, diff, nights, with_plots=not args.no_plots))
    if args.markdown:
        write_atomic(args.markdown, render_markdown(night, results, diff, args.out.name))
    failing = sum(not o.passed for r in results for o in r.outcomes)
    print(
        f"align.report: night {night}: {len(results)} results, {failing} failing outcomes, "
        f"{len(diff.newly_failing)} newly failing; wrote {args.out}"
    )
    return ExitCode.PASSED


REPORT = Command(
    "report",
    SUMMARIES["report"],
    _arguments,
    _report,
    examples=("results/ --history history.sqlite --out report.html --markdown summary.md",),
    details="Records the night in a SQLite history and says which outcomes newly fail; exits 0 "
    "when the report was written, whatever the verdicts.",
)


def main(argv: list[str] | None = None) -> int:
    """`python -m align.report`: run the command line and return the exit code."""
    return REPORT.main(argv)
