"""Report: the verdict of one check, as a readable table and as JSON."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.files import write_json_atomic
from align.numerics.names import call_label
from align.numerics.verdict import Divergence, Row

SCHEMA = "align.check/1"


@dataclass
class Report:
    """The outcome of `align.check` / `align.compare`.

    rows: whole-network judgements in execution order; local_rows: isolated modules;
    culprits: modules whose own computation is wrong, most upstream first;
    origins: where a dump comparison sees errors start (comparison.origins: a call whose
    tensor fails while every recorded tensor it was computed from passes; no re-run).
    """

    rows: list[Row] = field(default_factory=list)
    local_rows: list[Row] = field(default_factory=list)
    culprits: list[Divergence] = field(default_factory=list)
    origins: list[Divergence] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    train: dict[str, Any] | None = None
    sensitivity: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        train_ok = self.train is None or self.train.get("passed", True)
        return train_ok and not self.culprits and all(r.passed for r in self.rows)

    @property
    def first_divergence(self) -> Divergence | None:
        """The first failing tensor of the whole-network run, in execution order."""
        row = next((r for r in self.rows if r.failed), None)
        if row is not None:
            return row.divergence()
        if self.train and not self.train.get("passed", True):
            return Divergence(**self.train["first_divergence"])
        return None

    def select(self, phase: str) -> Report:
        """The same report judged on one phase only ("backward" includes param_grad)."""
        keep = {"forward": ("forward",), "backward": ("backward", "param_grad")}.get(
            phase, (phase,)
        )
        return Report(
            rows=[r for r in self.rows if r.phase in keep],
            local_rows=[r for r in self.local_rows if r.phase in keep],
            culprits=[c for c in self.culprits if c.phase in keep],
            origins=[c for c in self.origins if c.phase in keep],
            meta={**self.meta, "phases": [phase]},
            notes=self.notes,
            train=self.train if phase == "train" else None,
            sensitivity=self.sensitivity,
        )

    def worst(self, n: int = 10) -> list[Row]:
        """The n whole-network rows closest to (or furthest beyond) their limits."""
        return sorted(self.rows, key=lambda r: r.ratio(r.worst()), reverse=True)[:n]

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "schema": SCHEMA,
            **{k: v for k, v in self.meta.items() if k != "environment"},
            "passed": self.passed,
            "first_divergence": None if first is None else vars(first),
            "culprits": [vars(c) for c in self.culprits],
            "origins": [vars(c) for c in self.origins],
            "rows": [r.to_dict() for r in self.rows],
            "local_rows": [r.to_dict() for r in self.local_rows if r.failed],
            "sensitivity": self.sensitivity,
            "train": self.train,
            "environment": self.meta.get("environment", {}),
            "notes": self.notes,
            "created": datetime.datetime.now(datetime.UTC).isoformat(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_dict())

    def __str__(self) -> str:
        m = self.meta
        verdict = "ALIGNED" if self.passed else "NOT ALIGNED"
        lines = [
            f"align: {verdict}  {m.get('case') or m.get('model', '')}  "
            f"precision {m.get('precision', '?')}  phases {','.join(m.get('phases', []))}",
            f"  reference {m.get('reference', '?')}  target {m.get('target', '?')}"
            + (f"  (emulated {m['emulate']} on the CPU)" if m.get("emulate") else ""),
            f"  {len(self.rows)} tensors compared, {sum(not r.passed for r in self.rows)} "
            f"failing; {len(self.local_rows)} isolated tensors judged",
        ]
        first = self.first_divergence
        if first is not None:
            lines.append(f"first divergence: {first}")
        if self.culprits:
            lines.append("culprits (wrong on their own, each re-run alone):")
            lines += _table([_div_cells(c) for c in self.culprits])
        elif not self.passed and self.local_rows:  # no isolation ran (dumps): nothing to say
            lines.append("culprits: none found in isolation (the error builds up across layers)")
        if self.origins:
            lines.append("errors start at (failing, computed from tensors that pass):")
            lines += _table([_div_cells(c) for c in self.origins[:8]])
        if self.train:
            lines.append(_train_line(self.train))
        if self.rows:
            lines.append("worst tensors of the whole network (value / limit):")
            lines += _table([_row_cells(r) for r in self.worst()])
        if self.sensitivity:
            lines.append("most sensitive layers to the emulated format (local error):")
            lines += _table(
                [["module", "emulated rel_rmse", "fp32 rel_rmse", "ratio"]]
                + [
                    [s["module"], f"{s['emulated']:.3g}", f"{s['fp32']:.3g}", f"{s['ratio']:.3g}"]
                    for s in self.sensitivity[:12]
                ],
                header=False,
            )
        lines += [f"note: {n}" for n in self.notes]
        if not self.passed and m.get("command"):
            lines.append(f"reproduce: {m['command']}")
        return "\n".join(lines)


def _div_cells(d: Divergence) -> list[str]:
    ref = "" if d.reference is None else f"{d.reference:.3g}"
    name = call_label(d.module, d.call)
    return [name, d.phase, d.tensor, d.metric, f"{d.value:.3g}", f"{d.limit:.3g}", ref]


def _row_cells(r: Row) -> list[str]:
    metric = r.worst()
    name = call_label(r.module, r.call)
    return [
        name,
        r.phase,
        r.tensor,
        metric,
        f"{r.metrics.get(metric, float('nan')):.3g}",
        f"{r.limits.get(metric, float('nan')):.3g}",
        f"{r.reference.get(metric, float('nan')):.3g}",
        "FAIL" if r.failed else "ok",
    ]


def _train_line(train: dict[str, Any]) -> str:
    status = "ok" if train.get("passed", True) else "FAIL"
    return f"train ({train.get('steps_run', '?')} steps): {status} {train.get('summary', '')}"


def _table(cells: list[list[str]], header: bool = True) -> list[str]:
    head = ["module", "phase", "tensor", "metric", "value", "limit", "reference", ""]
    rows = ([head[: len(cells[0])]] if header and cells else []) + cells
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
