"""align.pytest_records: JUnit properties and result files of the pytest plugin's checks."""

from __future__ import annotations

import json

from align.pytest_records import junit_properties, result_filename, write_result

DIVERGENCE = {"module": "layer1.0.conv2", "phase": "forward", "tensor": "output[0]",
              "metric": "rel_rmse", "value": 0.003, "limit": 2e-06}  # fmt: skip
NODEID = "cases/test_classification.py::test_alignment[resnet50-npu-forward-fp32]"


def test_a_failing_result_has_what_ran_and_its_key_figures():
    culprit = {**DIVERGENCE, "isolated": True}
    result = {"schema": "align.check/1", "case": "resnet50", "model": None, "variant": "npu",
              "target": "npu:1", "phase": "forward", "precision": "fp32",
              "reproduce": f"pytest '{NODEID}' --align-target npu:1", "passed": False,
              "first_divergence": DIVERGENCE, "culprits": [culprit], "rows": []}  # fmt: skip
    assert junit_properties(result) == [
        ("align_case", "resnet50"),  # model None: left out
        ("align_variant", "npu"),
        ("align_target", "npu:1"),
        ("align_phase", "forward"),
        ("align_precision", "fp32"),
        ("align_reproduce", f"pytest '{NODEID}' --align-target npu:1"),
        ("align_passed", "false"),
        ("align_culprit", "layer1.0.conv2 forward output[0]"),
        ("align_first_divergence", "layer1.0.conv2 forward output[0]"),
        ("align_first_divergence_metric", "rel_rmse"),
        ("align_first_divergence_value", "0.003"),
        ("align_first_divergence_limit", "2e-06"),
    ]


def test_a_passing_result_has_only_the_verdict():
    result = {"schema": "align.check/1", "passed": True, "first_divergence": None}
    assert junit_properties(result) == [("align_passed", "true")]


def test_results_are_written_whole_and_atomically(tmp_path):
    result = {"schema": "align.check/1", "case": "resnet50", "passed": False, "nodeid": NODEID}
    path = write_result(NODEID, result, tmp_path / "results")
    assert path.parent == tmp_path / "results"
    assert path.name.startswith("cases_test_classification.py_test_alignment_resnet50-npu-")
    assert json.loads(path.read_text()) == result
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_filenames_are_safe_and_distinct():
    names = {
        result_filename(n)
        for n in ("a/b.py::t[x/y]", "a/b.py::t[x_y]", "../../etc/passwd", "x" * 500)
    }
    assert len(names) == 4
    assert all("/" not in n and not n.startswith(".") and len(n) < 140 for n in names)


def test_written_results_are_what_the_report_reads(tmp_path):
    from align.report.results import load_results

    result = {"schema": "align.check/1", "case": "tiny", "phases": ["forward"], "passed": False,
              "first_divergence": DIVERGENCE, "culprits": [], "rows": [],
              "nodeid": "cases/test_x.py::test_align[tiny]"}  # fmt: skip
    write_result(result["nodeid"], result, tmp_path)
    (loaded,) = load_results(tmp_path)
    assert [(o.case, o.phase, o.passed) for o in loaded.outcomes] == [("tiny", "forward", False)]
