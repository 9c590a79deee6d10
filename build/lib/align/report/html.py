"""The HTML page: one self-contained file (inline CSS, plots as inline PNG, no script).

Every string that came from a result file or the history goes through `_e` (html.escape)
before it reaches the page, so a crafted case or module name shows as text.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable
from typing import Any

from align.report import plots
from align.report.diff import NightDiff
from align.report.results import HEADLINE, Outcome, Result, worst_metric, worst_rows
from align.report.text import divergence, fmt, headline

WORST_LAYERS = 5
NONE_ISOLATED = '<li class="muted">none isolated</li>'
_PHASE_ORDER = {"forward": 0, "backward": 1, "train": 2}
_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1180px; padding: 0 16px; color: #1f2933; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px;
     border-bottom: 1px solid #d5dbe1; padding-bottom: 4px; } h3 { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #d5dbe1; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.pass { color: #1e7b34; font-weight: 600; } .fail { color: #b42318; font-weight: 600; }
td.pass { background: #ecf8ef; } td.fail { background: #fdecea; } td.none { color: #9aa5b1; }
.muted { color: #616e7c; } .small { font-size: 12px; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; background: #f3f5f7;
       padding: 0 3px; border-radius: 3px; }
ul.changes li { margin: 2px 0; } details { margin: 8px 0; } summary { cursor: pointer; }
img.plot { max-width: 100%; border: 1px solid #e4e7eb; margin: 4px 0; }
.box { border: 1px solid #d5dbe1; border-radius: 6px; padding: 8px 14px; margin: 12px 0; }
.box.failing { border-color: #f1a9a0; background: #fffafa; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _code(value: Any) -> str:
    return f"<code>{_e(value)}</code>"


def _verdict(passed: bool) -> str:
    return '<span class="pass">PASS</span>' if passed else '<span class="fail">FAIL</span>'


def _table(head: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """A table from already-escaped cell HTML."""
    header = "".join(f"<th>{h}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _num(value: Any) -> str:
    return f'<td class="num">{_e(fmt(value))}</td>'


def _img(data: str | None, alt: str) -> str:
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{data}">' if data else ""


def render_html(
    night: str,
    results: list[Result],
    diff: NightDiff,
    nights: list[tuple[str, int, int]],
    *,
    with_plots: bool = True,
) -> str:
    """The whole report page for one night."""
    anchors = {id(r): f"r{n}" for n, r in enumerate(results)}
    checks = [r for r in results if r.kind == "check"]
    runs = [r for r in results if r.kind == "run"]
    parts = [
        _header(night, results, diff),
        _changes(diff),
        _matrix(checks, anchors),
        _failures([r for r in checks if not r.passed], anchors),
        _details(checks, anchors, with_plots),
        _runs(runs, anchors, with_plots),
        _recent(nights),
    ]
    generated = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>align report {_e(night)}</title><style>{_CSS}</style></head><body>"
        + "".join(parts)
        + f'<p class="muted small">Generated {_e(generated)} by '
        + "<code>python -m align.report</code>.</p>"
        + "</body></html>\n"
    )


def _header(night: str, results: list[Result], diff: NightDiff) -> str:
    outcomes = [o for r in results for o in r.outcomes]
    failing = sum(not o.passed for o in outcomes)
    checks = sum(r.kind == "check" for r in results)
    previous = (
        f"compared with night {_code(diff.previous)}"
        if diff.previous
        else "no earlier night in the history"
    )
    status = (
        f'<span class="fail">{failing} failing</span>'
        if failing
        else '<span class="pass">all passing</span>'
    )
    return (
        f"<h1>align report: night {_e(night)}</h1>"
        f"<p>{checks} check results and {len(results) - checks} full runs; {len(outcomes)} "
        f"outcomes (case × phase × precision), {status}; {previous}.</p>"
    )


def _outcome_item(outcome: Outcome, extra: str = "") -> str:
    culprit = f" — culprit {_code(outcome.culprit)}" if outcome.culprit else ""
    figure = f' <span class="muted">{_e(headline(outcome))}</span>' if outcome.metric else ""
    name = f"<b>{_e(outcome.case)}</b> {_e(outcome.phase)} {_e(outcome.precision)}"
    return f"<li>{name}{culprit}{figure}{extra}</li>"


def _changes(diff: NightDiff) -> str:
    if diff.previous is None:
        return (
            '<h2 id="changes">Since the previous night</h2><p class="muted">Nothing to '
            "compare with yet: this is the first night in the history.</p>"
        )
    groups = [
        ("Newly failing", "fail", [_outcome_item(o) for o in diff.newly_failing]),
        ("Newly passing", "pass", [_outcome_item(o) for o in diff.newly_passing]),
        (
            "Drifted beyond noise",
            "",
            [_outcome_item(d.after, f" <span>({_e(d.why)})</span>") for d in diff.drifted],
        ),
        (
            "Missing tonight",
            "",
            [
                _outcome_item(o, ' <span class="muted">(ran the previous night)</span>')
                for o in diff.missing
            ],
        ),
        ("New tonight", "", [_outcome_item(o) for o in diff.new]),
        ("Still failing", "", [_outcome_item(o) for o in diff.still_failing]),
    ]
    body = "".join(
        f'<h3 class="{cls}">{title} ({len(items)})</h3><ul class="changes">{"".join(items)}</ul>'
        for title, cls, items in groups
        if items
    )
    return f'<h2 id="changes">Since night {_e(diff.previous)}</h2>' + (
        body or "<p>No change: same verdicts, no drift.</p>"
    )


def _columns(checks: list[Result]) -> list[tuple[str, str]]:
    found = {(o.precision, o.phase) for r in checks for o in r.outcomes}
    return sorted(found, key=lambda c: (c[0], _PHASE_ORDER.get(c[1], 9), c[1]))


def _matrix(checks: list[Result], anchors: dict[int, str]) -> str:
    if not checks:
        return ""
    columns = _columns(checks)
    cells: dict[str, dict[tuple[str, str], tuple[Outcome, Result]]] = {}
    for result in checks:
        for o in result.outcomes:
            cells.setdefault(o.case, {})[(o.precision, o.phase)] = (o, result)
    rows = []
    for case in sorted(cells):
        first = next(iter(cells[case].values()))[1].data
        devices = f"{first['reference']} → {first['target']}" + (
            f" (emulating {first['emulate']})" if first["emulate"] else ""
        )
        row = [f"<b>{_e(case)}</b>", _e(first["model"]), _e(devices)]
        for column in columns:
            if column not in cells[case]:
                row.append('<td class="none">not run</td>')
                continue
            outcome, result = cells[case][column]
            link = f'<a href="#{anchors[id(result)]}">{_verdict(outcome.passed)}</a>'
            culprit = f"<br>{_code(outcome.culprit)}" if outcome.culprit else ""
            row.append(f'<td class="{"pass" if outcome.passed else "fail"}">{link}{culprit}</td>')
        rows.append(row)
    head = ["case", "model", "reference → target"] + [f"{_e(p)}<br>{_e(ph)}" for p, ph in columns]
    return '<h2 id="checks">Alignment checks by phase and precision</h2>' + _table(head, rows)


def _worst_layers(data: dict[str, Any]) -> str:
    rows = []
    for row in worst_rows(data, WORST_LAYERS):
        metric, ratio = worst_metric(row)
        rows.append(
            [
                _code(row["module"]),
                _e(row["call"]),
                _e(row["phase"]),
                _e(row["tensor"]),
                _num(row["metrics"].get(HEADLINE)),
                _num(row["reference"].get(HEADLINE)),
                _num(row["limits"].get(HEADLINE)),
                _e(f"{metric} {fmt(row['metrics'].get(metric))} / {fmt(row['limits'].get(metric))}")
                if metric
                else "",
                _num(ratio),
                _verdict(row["passed"]),
            ]
        )
    head = [
        "module",
        "call",
        "phase",
        "tensor",
        "target rel_rmse",
        "reference rel_rmse",
        "limit",
        "worst metric / limit",
        "× limit",
        "",
    ]
    return _table(head, rows) if rows else ""


def _failures(failing: list[Result], anchors: dict[int, str]) -> str:
    if not failing:
        return ""
    boxes = []
    for result in failing:
        data, first = result.data, result.data["first_divergence"]
        phases = ", ".join(o.phase for o in result.outcomes if not o.passed)
        culprits = "".join(f"<li>{_e(divergence(c))}</li>" for c in data["culprits"])
        parts = [
            f'<div class="box failing"><h3><a href="#{anchors[id(result)]}">{_e(result.case)}</a> '
            f"{_e(result.precision)}: {_e(phases)}</h3>",
            "<p>Culprits (wrong in isolation, most upstream first):</p>",
            f"<ul>{culprits or NONE_ISOLATED}</ul>",
        ]
        if first:
            parts.append(f"<p>First divergence (execution order): {_e(divergence(first))}")
            if first["message"]:
                parts.append(f'<br><span class="muted">{_e(first["message"])}</span>')
            parts.append("</p>")
        parts.append(f"<p>Worst layers:</p>{_worst_layers(data)}</div>")
        boxes.append("".join(parts))
    return '<h2 id="failures">Failures</h2>' + "".join(boxes)


def _kv(mapping: dict[str, Any]) -> str:
    return _table(["key", "value"], [[_e(k), _e(v)] for k, v in mapping.items()]) if mapping else ""


def _details(checks: list[Result], anchors: dict[int, str], with_plots: bool) -> str:
    if not checks:
        return ""
    blocks = []
    for result in sorted(checks, key=lambda r: (r.passed, r.case, r.precision)):
        data = result.data
        phases = ", ".join(o.phase for o in result.outcomes)
        parts = [
            f'<details id="{anchors[id(result)]}"{"" if result.passed else " open"}><summary>'
            f"{_verdict(result.passed)} <b>{_e(result.case)}</b> {_e(result.precision)} "
            f'<span class="muted">({_e(result.source)})</span></summary>',
            f'<p class="small muted">model {_e(data["model"])}; phases {_e(phases)}; '
            f"{_e(data['reference'])} → {_e(data['target'])}; "
            f"created {_e(data.get('created', ''))}</p>",
        ]
        if with_plots and data["rows"]:
            parts.append(
                "<p>Per-layer error (relative RMSE against the float64 golden, execution "
                f"order):</p>{_img(plots.layer_errors(data['rows']), 'per-layer error')}"
            )
        if with_plots and data["train"]["steps"]:
            loss = plots.loss_curves(data["train"]["steps"])
            parts.append(f"<p>Training loss:</p>{_img(loss, 'loss curves')}" if loss else "")
        if data["notes"]:
            notes = "".join(f"<li>{_e(n)}</li>" for n in data["notes"])
            parts.append(f"<p>Notes:</p><ul>{notes}</ul>")
        for title, key in (("Timings (s)", "timings"), ("Environment", "environment")):
            if data[key]:
                parts.append(f"<details><summary>{title}</summary>{_kv(data[key])}</details>")
        blocks.append("".join(parts) + "</details>")
    return '<h2 id="details">Check details</h2>' + "".join(blocks)


def _runs(runs: list[Result], anchors: dict[int, str], with_plots: bool) -> str:
    if not runs:
        return ""
    rows, curves = [], []
    for result in runs:
        data, outcome = result.data, result.outcomes[0]
        documented = data["documented"]
        rows.append(
            [
                f'<b id="{anchors[id(result)]}">{_e(result.case)}</b>',
                _e(data["device"]),
                _e(data["world_size"]),
                _e(result.precision),
                _e(f"{outcome.metric} {fmt(outcome.value)}" if outcome.metric else ""),
                _e(
                    f"{fmt(documented.get('value'))} ({documented.get('source', '')})"
                    if documented
                    else ""
                ),
                _verdict(outcome.passed),
                _e(data["verdict"]["reason"]),
                _num(data.get("images_per_s")),
            ]
        )
        curve = plots.epoch_curves(data["epochs"]) if with_plots and data["epochs"] else None
        if curve:
            title = f"{_e(result.case)} {_e(result.precision)}: loss and Top-1 per epoch"
            curves.append(f"<details><summary>{title}</summary>{_img(curve, 'epochs')}</details>")
    head = [
        "case",
        "device",
        "cards",
        "precision",
        "final",
        "documented (source)",
        "verdict",
        "reason",
        "images/s",
    ]
    return '<h2 id="runs">Full training runs</h2>' + _table(head, rows) + "".join(curves)


def _recent(nights: list[tuple[str, int, int]]) -> str:
    if not nights:
        return ""
    rows = [
        [
            _e(night),
            _num(total),
            f'<td class="num {"fail" if failing else "pass"}">{_e(failing)}</td>',
        ]
        for night, total, failing in nights
    ]
    return '<h2 id="history">Recent nights</h2>' + _table(["night", "outcomes", "failing"], rows)
