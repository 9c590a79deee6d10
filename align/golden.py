"""Golden files: a model's documented figures (with their source) and its tolerances.

One TOML file per case, `golden/<case>.toml`, parsed as data (tomllib, no code runs):

    [[figures]]               metric, value, source, conditions
    notes = [...]             free text: caveats of the source document
    [recipe] source = "..."   the config the training recipe mirrors
    [tolerance.fp32]          k, floor: err(target) <= k * err(reference) + floor * dtype floor
    [tolerance.forward.fp32]  the same for one phase only (overrides the precision table)

The case registry reads its figures from here, so a figure lives in exactly one place.
"""

from __future__ import annotations

import math
import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import AlignError

if TYPE_CHECKING:
    from align.cases._registry import Figure

__all__ = [
    "DEFAULT_TOLERANCE",
    "PHASES",
    "PRECISIONS",
    "Golden",
    "golden_dir",
    "load_golden",
]

PHASES = ("forward", "backward", "param_grad", "train")
PRECISIONS = ("fp32", "amp-fp16", "amp-bf16", "o2-fp16")
_ALIASES = {"O1": "amp-fp16", "O2": "o2-fp16", "o1": "amp-fp16", "o2": "o2-fp16"}

# DESIGN.md "The verdict": k about 2 for fp32 and 3 for fp16/bf16, the multipliers of
# PyTorch dynamo's accuracy check; floor is in units of the dtype's own floor.
DEFAULT_TOLERANCE: dict[str, dict[str, float]] = {
    "fp32": {"k": 2.0, "floor": 1.0},
    "amp-fp16": {"k": 3.0, "floor": 1.0},
    "amp-bf16": {"k": 3.0, "floor": 1.0},
    "o2-fp16": {"k": 3.0, "floor": 1.0},
}
_TOLERANCE_KEYS = ("k", "floor")
_FIGURE_KEYS = {"metric", "value", "source", "conditions"}


def golden_dir() -> Path:
    """The directory of golden files: $ALIGN_GOLDEN_DIR, else `golden/` at the repo root."""
    env = os.environ.get("ALIGN_GOLDEN_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "golden"


@dataclass(frozen=True)
class Golden:
    """A parsed golden file: figures, notes, recipe source and tolerance tables."""

    name: str
    path: Path
    figures: tuple[Figure, ...]
    notes: tuple[str, ...] = ()
    recipe_source: str = ""
    tolerances: Mapping[str, Any] = field(default_factory=dict)

    def tolerance(self, phase: str, precision: str) -> dict[str, float]:
        """`{"k", "floor"}` for `phase` at `precision`: defaults < precision table < phase table."""
        precision = _ALIASES.get(precision, precision)
        if precision not in PRECISIONS:
            raise AlignError(
                f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)} (aliases O1, O2)"
            )
        if phase not in PHASES:
            raise AlignError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
        out = dict(DEFAULT_TOLERANCE[precision])
        out.update(self.tolerances.get(precision, {}))
        out.update(self.tolerances.get(phase, {}).get(precision, {}))
        return {key: float(value) for key, value in out.items()}


def load_golden(name: str, directory: str | os.PathLike[str] | None = None) -> Golden:
    """Parse `golden/<name>.toml`; AlignError naming the path if missing or malformed."""
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
    from align.cases._registry import Figure  # here: align.cases imports this module

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
        elif key in PHASES:
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
                f"nor a phase ({', '.join(PHASES)})"
            )

    return Golden(
        name=name,
        path=path,
        figures=tuple(figures),
        notes=tuple(notes),
        recipe_source=str(recipe.get("source", "")),
        tolerances=tolerances,
    )


def _check_tolerance_table(bad: Any, where: str, table: Any) -> None:
    if not isinstance(table, dict):
        raise bad(f"{where} must be a table")
    for key, value in table.items():
        if key not in _TOLERANCE_KEYS:
            raise bad(f"{where}.{key}: unknown key (known: {', '.join(_TOLERANCE_KEYS)})")
        if problem := tolerance_problem(value):
            raise bad(f"{where}.{key} {problem}")


def tolerance_problem(value: Any) -> str | None:
    """Why `value` cannot be a tolerance (k or floor), or None: a NaN, an infinite or a
    non-positive k or floor would let every target pass (or none), so none is ever used."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and math.isfinite(value) and value > 0:
        return None
    return f"must be a finite number > 0 (a non-negative number, not 0, NaN or inf), got {value!r}"


def case_tolerance(case: str, phases: tuple[str, ...], precision: str) -> dict[str, float]:
    """The tolerance golden/<case>.toml sets for these phases and precision; a missing or
    malformed file is an AlignError naming it, never the defaults in silence."""
    phase = "train" if tuple(phases) == ("train",) else "forward"
    return load_golden(case).tolerance(phase, precision)


if __name__ == "__main__":  # python -m align.golden calibrate CASE = align calibrate CASE
    from align.cli import main

    sys.exit(main(prog="python -m align.golden", only=("calibrate",)))
