"""`align list` (= python -m align.list): the zoo as a table no wider than 100 characters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from align.commands.list import format_marks, format_table, main
from align.zoo import get_case, list_cases
from align.zoo.golden import load_golden

ROOT = Path(__file__).resolve().parents[2]


def _words(text: str) -> str:
    """`text` with every run of whitespace one space: wrapped lines read as one."""
    return " ".join(text.split())


def test_table_has_every_case_figure_and_condition(capsys) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["case", "task", "source", "model"]
    assert max(len(line) for line in out.splitlines()) <= 100
    for name in list_cases():
        case = get_case(name)
        assert f"\n{name} " in out and _words(case.source_model) in _words(out)
        for fig in case.figures:
            assert f"{fig.metric} {fig.value:g}" in out
            assert _words(fig.conditions) in _words(out)
    skipped = sum(bool(get_case(n).skip) for n in list_cases())  # solov2 without mmcv's ops
    summary = f"{len(list_cases())} cases" + (f", {skipped} skipped here" if skipped else "")
    assert f"{summary}\n" in out


def test_pattern_filters_and_skip_reason_is_shown(capsys) -> None:
    assert main(["solov2*", "ssd3*"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[2:] if line and not line[0].isspace()]
    assert rows[:2] == ["solov2_r50", "ssd300"]
    skip = get_case("solov2_r50").skip
    assert (f"skip: {_words(skip or '')}" in _words(out)) == bool(skip)
    assert "skip: None" not in out
    assert "mask_ap 34.7" in out and "box_ap 25.6" in out
    assert ("2 cases, 1 skipped here" if skip else "2 cases\n") in out


def test_repeated_conditions_are_printed_once() -> None:
    table = format_table(["resnet50"])
    assert table.count("resnet50_8xb32_in1k") == 1
    assert "top1 76.4, top5 93.21: NPU, 8 cards" in table


def test_marks_of_the_source_pages_are_explained_in_a_footer(capsys) -> None:
    marked = ["cspresnext50", "densenet121"]  # (*) and (**) before their conditions
    assert main([*marked, "resnet50"]) == 0
    out = capsys.readouterr().out
    footer = out[out.index("marks of the source pages") :]
    for name, mark in zip(marked, ["(*)", "(**)"]):
        (note,) = [n for n in load_golden(name).notes if n.startswith(mark)]
        assert _words(f"{mark} {name}: {note[len(mark) :]}") in _words(footer)
    assert "resnet50" not in footer  # unmarked: nothing to explain
    assert format_marks(["resnet50"]) == ""


def test_exclude_and_no_match_exit_zero(capsys) -> None:
    assert main(["resnet*", "--exclude", "*cifar*"]) == 0
    out = capsys.readouterr().out
    assert "resnet50_cifar100" not in out and "resnetv1d152" in out
    assert main(["no-such-case"]) == 0
    assert "no case matches no-such-case" in capsys.readouterr().err


def test_module_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "align.list", "hrnet*"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "hrnet_w18" in proc.stdout and "timm:hrnet_w18" in proc.stdout
