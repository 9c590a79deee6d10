"""align.report.history: the SQLite history of nights."""

from __future__ import annotations

import sqlite3

import pytest

from align.errors import AlignError
from align.report.history import History
from align.report.results import Outcome


def _outcome(case: str, passed: bool = True, value: float = 1e-7) -> Outcome:
    return Outcome(
        case, "forward", "fp32", "check", passed, "rel_rmse", value, 2e-6, None, f"{case}.json"
    )


def test_same_night_twice_updates_instead_of_duplicating(tmp_path):
    path = tmp_path / "h.sqlite"
    with History(path) as history:
        history.record("2025-01-01", [_outcome("a"), _outcome("b")])
        history.record("2025-01-01", [_outcome("a", passed=False, value=5e-6)])
    with History(path) as history:
        night = history.outcomes("2025-01-01")
    assert sorted(o.case for o in night.values()) == ["a", "b"]
    assert night[("a", "forward", "fp32", "check")].passed is False
    assert night[("a", "forward", "fp32", "check")].value == 5e-6
    count = sqlite3.connect(path).execute("SELECT COUNT(*) FROM outcomes").fetchone()[0]
    assert count == 2


def test_nights_are_ordered_by_label(tmp_path):
    with History(tmp_path / "h.sqlite") as history:
        for night in ("2025-01-03", "2025-01-01", "2025-01-02"):
            history.record(night, [_outcome("a", passed=night != "2025-01-02")])
        assert history.previous_night("2025-01-03") == "2025-01-02"
        assert history.previous_night("2025-01-01") is None
        assert history.nights("2025-01-02", 5) == [("2025-01-02", 1, 1), ("2025-01-01", 1, 0)]


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "h.sqlite"
    path.write_text("not sqlite " * 100)
    with pytest.raises(AlignError, match="h.sqlite: cannot open the history database"):
        History(path)
