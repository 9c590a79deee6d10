"""Golden files: a model's documented figures (with their source) and its tolerances.

One TOML file per case, `align/zoo/golden_files/<case>.toml`, parsed as data (tomllib, no
code runs):

    [[figures]]               metric, value, source, conditions
    notes = [...]             free text: caveats of the source document
    [recipe] source = "..."   the config the training recipe mirrors
    [tolerance.fp32]          k, floor: err(target) <= k * err(reference) + floor * dtype floor
    [tolerance.forward.fp32]  the same for one phase only (overrides the precision table)

The case registry reads its figures from here, so a figure lives in exactly one place.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from align.errors import AlignError
from align.numerics.names import DEFAULT_TOLERANCE, PRECISIONS, canonical_precision
from align.numerics.verdict import tolerance_problem
from align.zoo.registry import Figure

__all__ = [
    "TABLE_PHASES",
    "Golden",
    "golden_dir",
    "load_golden",
]

# the tables a golden file may hold: per precision, or per phase and precision
TABLE_PHASES = ("forward", "backward", "param_grad", "train")
_TOLERANCE_KEYS = ("k", "floor")
_FIGURE_KEYS = {"metric", "value", "source", "conditions"}


def golden_dir() -> Path:
    """The directory of golden files: $ALIGN_GOLDEN_DIR, else the package data
    align/zoo/golden_files/ (installed with the package, read through importlib.resources)."""
    env = os.environ.get("ALIGN_GOLDEN_DIR")
    if env:
        return Path(env)
    return Path(str(resources.files("align.zoo") / "golden_files"))


@dataclass(frozen=True)
class Golden:
    """A parsed golden file: figures, notes, recipe source and tolerance tables."""

    name: str
    path: Path
    figures: tuple[Figure, ...]
    notes: tuple[str, ...] = ()
    recipe_source: str = ""
    tolerances: Mapping[str, Any] = field(default_factory=dict)
    # [full_run]: the run-to-run spread of a full training's figure (metric, run_std, source)
    full_run: tuple[str, float, str] | None = None

    def tolerance(self, phase: str, precision: str) -> dict[str, float]:
        """`{"k", "floor"}` for `phase` at `precision`: defaults < precision table < phase table."""
        precision = canonical_precision(precision)
        if phase not in TABLE_PHASES:
            raise AlignError(f"unknown phase {phase!r}; known: {', '.join(TABLE_PHASES)}")
        out = dict(DEFAULT_TOLERANCE[precision])
        out.update(self.tolerances.get(precision, {}))
        out.update(self.tolerances.get(phase, {}).get(precision, {}))
        return {key: float(value) for key, value in out.items()}


def load_golden(name: str, directory: str | os.PathLike[str] | None = None) -> Golden:
    """Parse `golden_files/<name>.toml`; AlignError naming the path if missing or malformed."""
    path = Path(directory) if directory is not None else golden_dir()
    path = path / f"{name}.toml"
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise AlignError(
            f"golden file {path} not found: every case needs one "
            f"(documented figures with their source, and tolerances)"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise AlignError(f"golden file {path} is not valid TOML: {e}") from None
    return _parse(name, path, data)


def _parse(name: str, path: Path, data: dict[str, Any]) -> Golden:

    def bad(what: str) -> AlignError:
        return AlignError(f"golden file {path}: {what}")

    case = data.get("case", name)
    if case != name:
        raise bad(f"case = {case!r} but the file is named for {name!r}")

    raw_figures = data.get("figures", [])
    if not isinstance(raw_figures, list):
        raise bad("`figures` must be an array of tables ([[figures]])")
    figures = []
    for i, fig in enumerate(raw_figures):
        if not isinstance(fig, dict):
            raise bad(f"figures[{i}] must be a table")
        missing = {"metric", "value", "source"} - fig.keys()
        if missing:
            raise bad(f"figures[{i}] lacks {', '.join(sorted(missing))}")
        unknown = fig.keys() - _FIGURE_KEYS
        if unknown:
            raise bad(f"figures[{i}] has unknown keys {', '.join(sorted(unknown))}")
        value = fig["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"figures[{i}].value must be a number, got {value!r}")
        figures.append(
            Figure(
                metric=str(fig["metric"]),
                value=float(value),
                source=str(fig["source"]),
                conditions=str(fig.get("conditions", "")),
            )
        )

    notes = data.get("notes", [])
    if isinstance(notes, str):
        notes = [notes]
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise bad("`notes` must be a string or an array of strings")

    recipe = data.get("recipe", {})
    if not isinstance(recipe, dict):
        raise bad("`recipe` must be a table")

    tolerances = data.get("tolerance", {})
    if not isinstance(tolerances, dict):
        raise bad("`tolerance` must be a table")
    for key, table in tolerances.items():
        if key in PRECISIONS:
            _check_tolerance_table(bad, f"tolerance.{key}", table)
        elif key in TABLE_PHASES:
            if not isinstance(table, dict):
                raise bad(f"tolerance.{key} must be a table")
            for prec, sub in table.items():
                if prec not in PRECISIONS:
                    raise bad(
                        f"tolerance.{key}.{prec}: unknown precision "
                        f"(known: {', '.join(PRECISIONS)})"
                    )
                _check_tolerance_table(bad, f"tolerance.{key}.{prec}", sub)
        else:
            raise bad(
                f"tolerance.{key}: not a precision ({', '.join(PRECISIONS)}) "
                f"nor a phase ({', '.join(TABLE_PHASES)})"
            )

    return Golden(
        name=name,
        path=path,
        figures=tuple(figures),
        notes=tuple(notes),
        recipe_source=str(recipe.get("source", "")),
        tolerances=tolerances,
        full_run=_full_run(bad, data.get("full_run")),
    )


def _full_run(bad: Any, table: Any) -> tuple[str, float, str] | None:
    """`[full_run]` as (metric, run_std, source), or None without one."""
    if table is None:
        return None
    try:
        run_std = table["run_std"]
        if isinstance(run_std, bool) or not isinstance(run_std, (int, float)):
            raise TypeError
        return str(table["metric"]), float(run_std), str(table["source"])
    except (KeyError, TypeError):
        raise bad("[full_run] needs metric, run_std (a number) and source") from None


def _check_tolerance_table(bad: Any, where: str, table: Any) -> None:
    if not isinstance(table, dict):
        raise bad(f"{where} must be a table")
    for key, value in table.items():
        if key not in _TOLERANCE_KEYS:
            raise bad(f"{where}.{key}: unknown key (known: {', '.join(_TOLERANCE_KEYS)})")
        if problem := tolerance_problem(value):
            raise bad(f"{where}.{key} {problem}")


def case_tolerance(case: str, phases: tuple[str, ...], precision: str) -> dict[str, float]:
    """The tolerance the case's golden file sets for these phases and precision; a missing or
    malformed file is an AlignError naming it, never the defaults in silence."""
    phase = "train" if tuple(phases) == ("train",) else "forward"
    return load_golden(case).tolerance(phase, precision)
