"""Result files: read and validate check ("align.check/1") and full-run ("align.run/1") JSON.

Every `*.json` under the results directory must be one of the two; a file that is not
valid JSON, has another schema or lacks a required field is an `AlignError` naming it.
Optional fields may be missing. Each result becomes `Outcome`s, one per (case, phase,
precision, kind): the rows the history keeps and the nights are compared on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import AlignError
from align.files import read_json

CHECK = "align.check/1"
RUN = "align.run/1"
KINDS = {CHECK: "check", RUN: "run"}
RUN_PHASE = "full-run"
HEADLINE = "rel_rmse"  # the per-layer metric a check phase is summarized by
_ROW_PHASE = {"param_grad": "backward"}  # parameter gradients belong to the backward phase
_REQUIRED = object()


@dataclass(frozen=True)
class Outcome:
    """The verdict of one (case, phase, precision, kind) on one night, and its headline figure.

    Checks: `value` is the worst relative RMSE of the phase's tensors and `limit` that
    tensor's limit. Full runs: `value` is the final task metric and `limit` the documented
    figure it is judged against.
    """

    case: str
    phase: str
    precision: str
    kind: str
    passed: bool
    metric: str | None = None
    value: float | None = None
    limit: float | None = None
    culprit: str | None = None
    source: str = ""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.case, self.phase, self.precision, self.kind)

    @property
    def label(self) -> str:
        return f"{self.case} {self.phase} {self.precision}"


@dataclass(frozen=True)
class Result:
    """One result file: its validated content and the outcomes it yields."""

    source: str  # path relative to the results directory
    kind: str
    data: dict[str, Any]
    outcomes: tuple[Outcome, ...]

    @property
    def case(self) -> str:
        return self.data["case"]

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes)


def number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, NaN, inf, text, bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def worst_metric(row: dict[str, Any]) -> tuple[str | None, float]:
    """The row's metric furthest past (or closest to) its limit, and value/limit (NaN: inf)."""
    name, worst = None, 0.0
    for metric, limit in row["limits"].items():
        raw, bound = row["metrics"].get(metric), number(limit)
        if isinstance(raw, float) and math.isnan(raw):
            return metric, math.inf
        value = number(raw)
        if value is not None and bound and abs(value) / bound > worst:
            name, worst = metric, abs(value) / bound
    return name, worst


def worst_rows(data: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """The `count` rows of a check result furthest past (or closest to) their limits."""
    ranked = sorted(data["rows"], key=lambda r: (not r["passed"], worst_metric(r)[1]), reverse=True)
    return ranked[:count]


def load_results(directory: str | Path) -> list[Result]:
    """Read every *.json under `directory` (recursively), sorted by path."""
    root = Path(directory)
    if not root.is_dir():
        raise AlignError(f"{root}: not a directory of result files")
    results = [load_result(path, root) for path in sorted(root.rglob("*.json")) if path.is_file()]
    if not results:
        raise AlignError(f"{root}: no result files (*.json) found")
    seen: dict[tuple[str, str, str, str], str] = {}
    for result in results:
        for outcome in result.outcomes:
            if outcome.key in seen:
                raise AlignError(
                    f"{result.source} and {seen[outcome.key]} both report {outcome.label} "
                    f"({outcome.kind}); keep one result per case, phase and precision"
                )
            seen[outcome.key] = result.source
    return results


def load_result(path: Path, root: Path | None = None) -> Result:
    """One result file, validated; `root`: the directory its `source` is relative to."""
    source = str(path.relative_to(root)) if root else str(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise AlignError(f"{path}: a result must be a JSON object")
    schema = data.get("schema")
    if not isinstance(schema, str) or schema not in KINDS:
        raise AlignError(
            f"{path}: schema {schema!r} is not one of {sorted(KINDS)}; only align results "
            "belong in the results directory"
        )
    fields = _Fields(path, data)
    if schema == CHECK:
        return Result(source, "check", data, _check_outcomes(fields, source))
    return Result(source, "run", data, _run_outcomes(fields, source))


class _Fields:
    """Typed access to a result's fields; defaults fill optional ones in `data`."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    def get(
        self,
        key: str,
        kind: type,
        default: Any = _REQUIRED,
        where: dict | None = None,
    ) -> Any:
        where = self.data if where is None else where
        if key not in where or where[key] is None:
            if default is _REQUIRED:
                raise AlignError(f"{self.path}: required field {key!r} is missing")
            where[key] = default
            return default
        value = where[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise AlignError(
                f"{self.path}: field {key!r} should be {kind.__name__}, not {type(value).__name__}"
            )
        return value


def _divergence(fields: _Fields, value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise AlignError(f"{fields.path}: {what} should be an object")
    fields.get("module", str, where=value)
    fields.get("phase", str, "forward", where=value)
    for key in ("metric", "tensor", "message"):
        fields.get(key, str, "", where=value)
    return value


def _row(fields: _Fields, value: Any, n: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise AlignError(f"{fields.path}: rows[{n}] should be an object")
    fields.get("module", str, where=value)
    fields.get("phase", str, where=value)
    fields.get("passed", bool, where=value)
    fields.get("call", int, 0, where=value)
    fields.get("tensor", str, "", where=value)
    for key in ("metrics", "reference", "limits"):
        fields.get(key, dict, {}, where=value)
    return value


def _phase(name: str) -> str:
    return _ROW_PHASE.get(name, name)


def _check_outcomes(fields: _Fields, source: str) -> tuple[Outcome, ...]:
    case = fields.get("case", str)
    passed = fields.get("passed", bool)
    precision = fields.get("precision", str, "fp32")
    rows = [_row(fields, r, n) for n, r in enumerate(fields.get("rows", list, []))]
    first = fields.get("first_divergence", dict, {})
    if first:
        _divergence(fields, first, "first_divergence")
    culprits = [_divergence(fields, c, "culprits[]") for c in fields.get("culprits", list, [])]
    for key in ("model", "reference", "target", "emulate"):
        fields.get(key, str, "")
    fields.get("notes", list, [])
    fields.get("environment", dict, {})
    fields.get("timings", dict, {})
    train = fields.get("train", dict, {})
    for step in fields.get("steps", list, [], where=train):
        if not isinstance(step, dict):
            raise AlignError(f"{fields.path}: train.steps should be a list of objects")
        fields.get("loss", dict, {}, where=step)
    declared = fields.get("phases", list, [])
    if not all(isinstance(p, str) for p in declared):
        raise AlignError(f"{fields.path}: phases should be a list of names")
    phases = list(dict.fromkeys(declared + [_phase(r["phase"]) for r in rows]))
    if not phases:
        raise AlignError(f"{fields.path}: neither 'phases' nor 'rows' say which phases ran")

    divergences = culprits + ([first] if first else [])
    failing = {_phase(r["phase"]) for r in rows if not r["passed"]}
    failing |= {_phase(d["phase"]) for d in divergences}
    if passed:
        failing = set()
    elif not failing & set(phases):
        failing = set(phases)  # failed for a reason no row names (e.g. training): all phases
    outcomes = []
    for phase in phases:
        phase_rows = [r for r in rows if _phase(r["phase"]) == phase]
        worst = max(phase_rows, key=_headline, default=None)
        culprit = next((d for d in divergences if _phase(d["phase"]) == phase), None)
        outcomes.append(
            Outcome(
                case=case,
                phase=phase,
                precision=precision,
                kind="check",
                passed=phase not in failing,
                metric=HEADLINE if worst else None,
                value=number(worst["metrics"].get(HEADLINE)) if worst else None,
                limit=number(worst["limits"].get(HEADLINE)) if worst else None,
                culprit=culprit["module"] if culprit and phase in failing else None,
                source=source,
            )
        )
    return tuple(outcomes)


def _headline(row: dict[str, Any]) -> float:
    value = row["metrics"].get(HEADLINE)
    if isinstance(value, float) and math.isnan(value):
        return math.inf
    return number(value) or 0.0


def _run_outcomes(fields: _Fields, source: str) -> tuple[Outcome, ...]:
    case = fields.get("case", str)
    verdict = fields.get("verdict", dict)
    passed = fields.get("passed", bool, where=verdict)
    fields.get("reason", str, "", where=verdict)
    precision = fields.get("precision", str, "fp32")
    final = fields.get("final", dict, {})
    documented = fields.get("documented", dict, {})
    epochs = fields.get("epochs", list, [])
    if not all(isinstance(e, dict) for e in epochs):
        raise AlignError(f"{fields.path}: epochs should be a list of objects")
    for key in ("device", "created"):
        fields.get(key, str, "")
    fields.get("world_size", int, 1)
    fields.get("n_val", int, 0)
    fields.get("environment", dict, {})
    metric = documented.get("metric") if isinstance(documented.get("metric"), str) else None
    metric = metric or next(iter(final), None)
    return (
        Outcome(
            case=case,
            phase=RUN_PHASE,
            precision=precision,
            kind="run",
            passed=passed,
            metric=metric,
            value=number(final.get(metric)) if metric else None,
            limit=number(documented.get("value")),
            source=source,
        ),
    )
