"""The nightly history: one SQLite row per (night, case, phase, precision, kind).

Nights are ordered by their label (text order: ISO dates sort right). Recording a night
upserts in one transaction, so running the same night twice updates its rows instead of
duplicating them, and several report runs of one night (shards) add up.
"""

from __future__ import annotations

import datetime
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from align.errors import AlignError
from align.report.results import Outcome

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    night TEXT NOT NULL,
    case_name TEXT NOT NULL,
    phase TEXT NOT NULL,
    precision TEXT NOT NULL,
    kind TEXT NOT NULL,
    passed INTEGER NOT NULL,
    metric TEXT,
    value REAL,
    limit_value REAL,
    culprit TEXT,
    source TEXT NOT NULL,
    recorded TEXT NOT NULL,
    UNIQUE (night, case_name, phase, precision, kind)
)
"""
_COLUMNS = "case_name, phase, precision, kind, passed, metric, value, limit_value, culprit, source"
_UPSERT = f"""
INSERT INTO outcomes (night, {_COLUMNS}, recorded) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (night, case_name, phase, precision, kind) DO UPDATE SET
    passed = excluded.passed, metric = excluded.metric, value = excluded.value,
    limit_value = excluded.limit_value, culprit = excluded.culprit,
    source = excluded.source, recorded = excluded.recorded
"""

Outcomes = dict[tuple[str, str, str, str], Outcome]


class History:
    """An open history database; use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise AlignError(f"{self.path}: cannot open the history database ({exc})") from exc
        try:
            self.db.execute(_SCHEMA)
        except sqlite3.Error as exc:
            self.db.close()
            raise AlignError(f"{self.path}: cannot open the history database ({exc})") from exc

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()

    def record(self, night: str, outcomes: Iterable[Outcome]) -> None:
        """Upsert tonight's outcomes in one transaction."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        rows = [
            (night, o.case, o.phase, o.precision, o.kind, int(o.passed), o.metric, o.value,
             o.limit, o.culprit, o.source, now)
            for o in outcomes
        ]  # fmt: skip
        try:
            with self.db:
                self.db.executemany(_UPSERT, rows)
        except sqlite3.Error as exc:
            raise AlignError(f"{self.path}: cannot record night {night} ({exc})") from exc

    def outcomes(self, night: str) -> Outcomes:
        """Every outcome recorded for `night`, by key."""
        query = f"SELECT {_COLUMNS} FROM outcomes WHERE night = ?"
        found = [_outcome(row) for row in self._query(query, (night,))]
        return {o.key: o for o in found}

    def previous_night(self, night: str) -> str | None:
        """The latest night recorded before `night`, if any."""
        rows = self._query("SELECT MAX(night) FROM outcomes WHERE night < ?", (night,))
        return rows[0][0]

    def nights(self, up_to: str, count: int) -> list[tuple[str, int, int]]:
        """(night, outcomes, failing) for the last `count` nights up to `up_to`, newest first."""
        query = (
            "SELECT night, COUNT(*), SUM(passed = 0) FROM outcomes WHERE night <= ? "
            "GROUP BY night ORDER BY night DESC LIMIT ?"
        )
        return [tuple(row) for row in self._query(query, (up_to, count))]

    def _query(self, query: str, args: tuple) -> list[tuple]:
        try:
            return self.db.execute(query, args).fetchall()
        except sqlite3.Error as exc:
            raise AlignError(f"{self.path}: cannot read the history ({exc})") from exc


def _outcome(row: tuple) -> Outcome:
    case, phase, precision, kind, passed, metric, value, limit, culprit, source = row
    return Outcome(
        case, phase, precision, kind, bool(passed), metric, value, limit, culprit, source
    )
