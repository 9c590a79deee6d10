"""`python -m align.report RESULTS_DIR --history H --out report.html [--markdown M] [--night L]`.

Exit codes: 0 when the report was written (whatever the verdicts), 2 on a usage or data
error (a malformed result file is named, no traceback).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from align.errors import AlignError
from align.report.diff import compare_nights
from align.report.files import write_atomic
from align.report.history import History
from align.report.html import render_html
from align.report.markdown import render_markdown
from align.report.results import load_results

RECENT_NIGHTS = 14


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m align.report",
        description="Turn a directory of align result files into an HTML report and a "
        "Markdown summary, and record the night in a SQLite history.",
    )
    parser.add_argument(
        "results", type=Path, help="directory of result JSON files (searched recursively)"
    )
    parser.add_argument(
        "--history", type=Path, required=True, help="SQLite history file (created if absent)"
    )
    parser.add_argument("--out", type=Path, required=True, help="HTML report to write")
    parser.add_argument("--markdown", type=Path, help="also write a Markdown summary here")
    parser.add_argument(
        "--night",
        default=datetime.date.today().isoformat(),
        help="label of this night; nights are ordered by label (default: today, YYYY-MM-DD)",
    )
    parser.add_argument("--no-plots", action="store_true", help="leave the plots out (faster)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = _parser().parse_args(argv)
    night = args.night.strip()
    if not night:
        print("align.report: error: --night must not be empty", file=sys.stderr)
        return 2
    try:
        results = load_results(args.results)
        with History(args.history) as history:
            previous = history.previous_night(night)
            before = history.outcomes(previous) if previous else {}
            history.record(night, (o for r in results for o in r.outcomes))
            diff = compare_nights(previous, before, history.outcomes(night))
            nights = history.nights(night, RECENT_NIGHTS)
        write_atomic(
            args.out, render_html(night, results, diff, nights, with_plots=not args.no_plots)
        )
        if args.markdown:
            write_atomic(args.markdown, render_markdown(night, results, diff, args.out.name))
    except (AlignError, OSError) as exc:
        print(f"align.report: error: {exc}", file=sys.stderr)
        return 2
    failing = sum(not o.passed for r in results for o in r.outcomes)
    print(
        f"align.report: night {night}: {len(results)} results, {failing} failing outcomes, "
        f"{len(diff.newly_failing)} newly failing; wrote {args.out}"
    )
    return 0
