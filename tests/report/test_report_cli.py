"""python -m align.report: two nights end to end, exit codes, atomic outputs."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from align.commands.report import main


def _run(results, tmp_path, night, *extra):
    out = tmp_path / "out"
    return main(
        [str(results), "--history", str(tmp_path / "h.sqlite"), "--out", str(out / "report.html"),
         "--markdown", str(out / "summary.md"), "--night", night, "--no-plots", *extra]
    )  # fmt: skip


def test_two_nights_and_a_rerun(tmp_path, night_one, make_check, write, capsys):
    assert _run(night_one, tmp_path, "2025-01-01") == 0
    night_two = tmp_path / "night2"
    write(night_two, "resnet50.json", make_check("resnet50", culprit="layer1.0.conv1"))
    write(night_two, "vit.json", make_check("vit"))
    assert _run(night_two, tmp_path, "2025-01-02") == 0
    assert _run(night_two, tmp_path, "2025-01-02") == 0  # same night again: no duplicates
    rows = sqlite3.connect(tmp_path / "h.sqlite").execute(
        "SELECT night, COUNT(*) FROM outcomes GROUP BY night"
    )
    assert rows.fetchall() == [("2025-01-01", 5), ("2025-01-02", 4)]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Since night 2025-01-01" in page and "Newly failing (1)" in page
    summary = (tmp_path / "out" / "summary.md").read_text()
    newly = "**Newly failing** (1)\n- resnet50 forward fp32, culprit **layer1.0.conv1**"
    assert newly + ": rel\\_rmse 0.003 (limit 2e-06)" in summary
    assert "newly failing; wrote" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "report.html",
        "summary.md",
    ]  # no temp left


def test_malformed_result_exits_2_naming_the_file(tmp_path, night_one, capsys):
    (night_one / "broken.json").write_text('{"schema": "align.check/1", "case": ')
    assert _run(night_one, tmp_path, "2025-01-01") == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("align.report: error: ") and "broken.json: not a readable JSON result" in err
    )
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "h.sqlite").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (str(10**400), "number 10000000000000000000... is out of float range"),  # int > float
        ("1e400", "number 1e400 is out of float range"),  # a literal json reads as inf
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 32 levels"),  # RecursionError
    ],
)
def test_crafted_numbers_and_nesting_exit_2_naming_the_file(
    tmp_path, night_one, make_check, value, message, capsys
):
    result = make_check("crafted")
    result["rows"][0]["metrics"]["rel_rmse"] = "VALUE"
    text = json.dumps(result).replace('"VALUE"', value)
    (night_one / "crafted.json").write_text(text)
    assert _run(night_one, tmp_path, "2025-01-01") == 2
    err = capsys.readouterr().err
    assert (
        err == f"align.report: error: {night_one / 'crafted.json'}: not a readable JSON "
        f"result ({message})\n"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "h.sqlite").exists()


def test_usage_errors_exit_2(tmp_path):
    assert _run(tmp_path / "absent", tmp_path, "2025-01-01") == 2
    assert _run(tmp_path, tmp_path, " ") == 2
    process = subprocess.run(
        [sys.executable, "-m", "align.report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2 and "--history" in process.stderr
