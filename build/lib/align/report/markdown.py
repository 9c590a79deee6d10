"""The Markdown summary for CI comments: verdict counts, what changed, the failures."""

from __future__ import annotations

import html
import re
from typing import Any

from align.report.diff import NightDiff
from align.report.results import Outcome, Result
from align.report.text import headline

_SPECIAL = re.compile(r"([\\`*_\[\]|#~])")


def md(value: Any) -> str:
    """Text from a file as inert Markdown: HTML escaped, Markdown syntax backslashed, one line."""
    text = " ".join(str(value).split())
    return _SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def _item(outcome: Outcome, extra: str = "") -> str:
    culprit = f", culprit **{md(outcome.culprit)}**" if outcome.culprit else ""
    figure = f": {md(headline(outcome))}" if outcome.metric else ""
    return f"- {md(outcome.label)}{culprit}{figure}{extra}"


def render_markdown(
    night: str, results: list[Result], diff: NightDiff, report_name: str | None = None
) -> str:
    """The summary for one night."""
    outcomes = [o for r in results for o in r.outcomes]
    failing = [o for o in outcomes if not o.passed]
    verdict = (
        f"{len(failing)} of {len(outcomes)} failing" if failing else f"all {len(outcomes)} passing"
    )
    lines = [f"## align nightly {md(night)}: {verdict}", ""]
    if diff.previous is None:
        lines.append("First night in the history: nothing to compare with.")
    else:
        lines.append(f"Compared with night {md(diff.previous)}.")
        sections = [
            ("Newly failing", [_item(o) for o in diff.newly_failing]),
            ("Newly passing", [_item(o) for o in diff.newly_passing]),
            ("Drifted beyond noise", [_item(d.after, f"; {md(d.why)}") for d in diff.drifted]),
            ("Missing tonight", [_item(o) for o in diff.missing]),
        ]
        for title, items in sections:
            if items:
                lines += ["", f"**{title}** ({len(items)})", *items]
        if not any(items for _, items in sections):
            lines.append("No change: same verdicts, no drift.")
    if failing:
        lines += ["", "| case | phase | precision | culprit | headline |", "|---|---|---|---|---|"]
        for o in failing:
            cells = (o.case, o.phase, o.precision, o.culprit or "", headline(o))
            lines.append("| " + " | ".join(md(c) for c in cells) + " |")
    if report_name:
        lines += ["", f"Full report: {md(report_name)}"]
    return "\n".join(lines) + "\n"
