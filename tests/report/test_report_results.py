"""align.report.results: reading, validating and summarizing result files."""

from __future__ import annotations

import json

import pytest

from align.errors import AlignError
from align.report.results import load_results


def test_outcomes_per_phase_with_culprit(night_one):
    results = {r.case: r for r in load_results(night_one)}
    assert set(results) == {"resnet50", "vit", "resnet50-full"}
    assert results["vit"].source == "nested/vit.json"
    forward, backward = results["vit"].outcomes
    assert (forward.phase, forward.passed, forward.culprit) == ("forward", False, "layer1.0.conv2")
    assert (forward.metric, forward.value, forward.limit) == ("rel_rmse", 3e-3, 2e-6)
    assert (backward.phase, backward.passed, backward.culprit) == ("backward", True, None)
    (run,) = results["resnet50-full"].outcomes
    assert (run.phase, run.kind, run.metric, run.value, run.limit) == (
        "full-run",
        "run",
        "top1",
        76.1,
        76.1,
    )


def test_minimal_result_is_accepted(tmp_path, write):
    write(
        tmp_path,
        "a.json",
        {"schema": "align.check/1", "case": "c", "passed": False, "phases": ["train"]},
    )
    (result,) = load_results(tmp_path)
    (outcome,) = result.outcomes
    assert (outcome.phase, outcome.precision, outcome.passed, outcome.value) == (
        "train",
        "fp32",
        False,
        None,
    )


def test_failure_no_row_explains_fails_every_phase(tmp_path, make_check, write):
    data = make_check()
    data["passed"] = False  # e.g. the training phase diverged
    write(tmp_path, "a.json", data)
    assert [o.passed for o in load_results(tmp_path)[0].outcomes] == [False, False]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a readable JSON result"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({"schema": "other/1", "case": "x"}), "schema 'other/1' is not one of"),
        (
            json.dumps({"schema": "align.check/1", "passed": True}),
            "required field 'case' is missing",
        ),
        ({"passed": "yes"}, "field 'passed' should be bool, not str"),
        ({"rows": [{"module": "a"}]}, "required field 'phase' is missing"),
        ({"verdict": {}}, "required field 'passed' is missing"),
        ({"world_size": True}, "field 'world_size' should be int, not bool"),
        ({"n_val": "50000"}, "field 'n_val' should be int, not str"),
        ({"schema": ["align.check/1"]}, r"schema \['align.check/1'\] is not one of"),
        ({"train": {"steps": [1]}}, "train.steps should be a list of objects"),
        ({"train": {"steps": [{"loss": 2.3}]}}, "field 'loss' should be dict, not float"),
        ('{"schema": "align.check/1", "x": 1e400}', "number 1e400 is out of float range"),
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 32 levels"),
    ],
)
def test_malformed_results_name_the_file(tmp_path, make_check, make_run, content, message):
    if isinstance(content, dict):  # a valid result with these fields overridden
        base = make_run() if {"verdict", "world_size", "n_val"} & content.keys() else make_check()
        content = json.dumps({**base, **content})
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.json").write_text(content)
    with pytest.raises(AlignError, match=message) as info:
        load_results(tmp_path)
    assert str(tmp_path / "sub" / "bad.json") in str(info.value)


def test_duplicate_outcomes_and_empty_directory(tmp_path, make_check, write):
    with pytest.raises(AlignError, match="no result files"):
        load_results(tmp_path)
    write(tmp_path, "a.json", make_check())
    write(tmp_path, "b.json", make_check())
    with pytest.raises(AlignError, match="b.json and a.json both report resnet50 forward fp32"):
        load_results(tmp_path)
