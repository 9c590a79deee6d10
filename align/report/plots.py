"""Plots as inline PNG data (base64), drawn with matplotlib's Agg canvas (no display, no pyplot)."""

from __future__ import annotations

import base64
import io
from typing import Any

from align.errors import require_extra
from align.report.results import HEADLINE, number

_PHASE = {"forward": "fwd", "backward": "bwd", "param_grad": "grad", "train": "train"}
_TARGET, _REFERENCE, _LIMIT, _GOLDEN, _FAIL = "#c0392b", "#2471a3", "#7f8c8d", "#27ae60", "#e74c3c"


def _figure(width: float = 9.0, height: float = 3.2):
    require_extra("matplotlib", "report", "align report's plots (or pass --no-plots)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=96, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plain(text: str, limit: int = 40) -> str:
    """Text from a file, made safe for matplotlib (`$` would start mathtext) and short."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def layer_errors(rows: list[dict[str, Any]], max_labels: int = 12) -> str | None:
    """Relative RMSE of target and reference per row (execution order), log scale, with limits."""
    points = [
        (
            n,
            number(r["metrics"].get(HEADLINE)),
            number(r["reference"].get(HEADLINE)),
            number(r["limits"].get(HEADLINE)),
        )
        for n, r in enumerate(rows)
    ]
    positive = [v for p in points for v in p[1:] if v is not None and v > 0]
    if not positive:
        return None
    floor = min(positive) / 10  # zeros and missing values sit on the floor of the log axis

    def series(i: int) -> list[float]:
        return [p[i] if p[i] is not None and p[i] > 0 else floor for p in points]

    x = list(range(len(rows)))
    figure = _figure()
    axes = figure.add_subplot()
    axes.set_yscale("log")
    axes.step(x, series(3), where="mid", color=_LIMIT, linestyle="--", linewidth=1, label="limit")
    axes.plot(
        x, series(2), color=_REFERENCE, marker=".", linewidth=0.8, label="reference vs golden"
    )
    axes.plot(x, series(1), color=_TARGET, marker=".", linewidth=0.8, label="target vs golden")
    failing = [n for n, r in enumerate(rows) if not r["passed"]]
    if failing:
        axes.scatter(
            failing,
            [series(1)[n] for n in failing],
            s=60,
            facecolors="none",
            edgecolors=_FAIL,
            label="failing",
            zorder=3,
        )
    step = max(1, -(-len(rows) // max_labels))
    marked = failing[:3]  # the failing rows get labels; regular ones keep clear of them
    ticks = sorted(
        marked
        + [t for t in range(0, len(rows), step) if all(abs(t - m) > step // 2 for m in marked)]
    )
    axes.set_xticks(
        ticks,
        [
            plain(f"{rows[n]['module']} {_PHASE.get(rows[n]['phase'], rows[n]['phase'])}")
            for n in ticks
        ],
        rotation=30,
        ha="right",
        fontsize=7,
    )
    axes.set_ylabel(f"{HEADLINE} (log)")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1), ncol=4, frameon=False)
    return _png(figure)


def _pairs(items: list[Any], x: str, y) -> list[tuple[float, float]]:
    """(x, y) points of the dict items whose both values are finite numbers."""
    points = [(number(i.get(x)), number(y(i))) for i in items if isinstance(i, dict)]
    return [(a, b) for a, b in points if a is not None and b is not None]


def loss_curves(steps: list[dict[str, Any]]) -> str | None:
    """Per-step training loss of target, reference and golden."""
    sides = (  # drawn so that coinciding curves stay visible: wide golden, dashed reference
        ("golden", {"color": _GOLDEN, "linewidth": 4, "alpha": 0.35}),
        ("reference", {"color": _REFERENCE, "linestyle": "--"}),
        ("target", {"color": _TARGET, "marker": ".", "linewidth": 1}),
    )
    curves = [
        (s, c, _pairs(steps, "step", lambda i, s=s: (i.get("loss") or {}).get(s))) for s, c in sides
    ]
    curves = [curve for curve in curves if curve[2]]
    if not curves:
        return None
    figure = _figure(6.0, 2.8)
    axes = figure.add_subplot()
    for side, style, points in curves:
        axes.plot(*zip(*points), label=side, **style)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    return _png(figure)


def epoch_curves(epochs: list[dict[str, Any]]) -> str | None:
    """Per-epoch loss and Top-1 of a full run (two y axes)."""
    loss = _pairs(epochs, "epoch", lambda e: e.get("loss"))
    top1 = _pairs(epochs, "epoch", lambda e: e.get("top1"))
    if not loss and not top1:
        return None
    figure = _figure(6.0, 2.8)
    axes = figure.add_subplot()
    axes.set_xlabel("epoch")
    if loss:
        axes.plot(*zip(*loss), color=_TARGET, marker=".")
        axes.set_ylabel("loss", color=_TARGET)
    if top1:
        right = axes.twinx()
        right.plot(*zip(*top1), color=_REFERENCE, marker=".")
        right.set_ylabel("top1", color=_REFERENCE)
    axes.grid(True, alpha=0.3)
    return _png(figure)
