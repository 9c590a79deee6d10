"""Plain-text pieces shared by the HTML and Markdown renderers (which escape them)."""

from __future__ import annotations

import math
from typing import Any

from align.report.results import Outcome, number


def fmt(value: Any) -> str:
    """A number for people: 3-4 significant digits; NaN, inf and missing spelled out."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    x = number(value)
    if x is None:
        return str(value) if isinstance(value, float) else "–"  # ±inf
    return f"{x:.4g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.3g}"


def divergence(div: dict[str, Any]) -> str:
    """`module phase tensor: metric value > limit` for a divergence dict."""
    where = " ".join(p for p in (div["module"] or "<model>", div["phase"], div["tensor"]) if p)
    if not div["metric"]:
        return where
    return f"{where}: {div['metric']} {fmt(div.get('value'))} > {fmt(div.get('limit'))}"


def headline(outcome: Outcome) -> str:
    """The outcome's headline figure: `rel_rmse 3.1e-07 (limit 2e-06)`."""
    if outcome.metric is None:
        return ""
    word = "documented" if outcome.kind == "run" else "limit"
    return f"{outcome.metric} {fmt(outcome.value)} ({word} {fmt(outcome.limit)})"
