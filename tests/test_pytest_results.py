"""align.pytest_results: result files and JUnit properties for --align-report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from align.pytest_results import record_result, result_filename


@dataclass
class FakeItem:
    nodeid: str
    user_properties: list = field(default_factory=list)


DIVERGENCE = {"module": "layer1.0.conv2", "phase": "forward", "tensor": "output[0]",
              "metric": "rel_rmse", "value": 0.003, "limit": 2e-06}  # fmt: skip


def test_failing_result_is_written_with_its_key_figures(tmp_path):
    item = FakeItem("cases/test_classification.py::test_align[resnet50-npu-fp32]")
    culprit = {**DIVERGENCE, "isolated": True}
    report = {"schema": "align.check/1", "case": "resnet50", "passed": False,
              "first_divergence": DIVERGENCE, "culprits": [culprit]}  # fmt: skip
    path = record_result(item, report, tmp_path / "results")
    assert path.parent == tmp_path / "results"
    assert path.name.startswith("cases_test_classification.py_test_align_resnet50-npu-fp32.")
    assert json.loads(path.read_text()) == {**report, "nodeid": item.nodeid}
    assert "nodeid" not in report  # the caller's dict is left alone
    assert dict(item.user_properties) == {
        "align_passed": "false",
        "align_culprit": "layer1.0.conv2 forward output[0]",
        "align_first_divergence": "layer1.0.conv2 forward output[0]",
        "align_first_divergence_metric": "rel_rmse",
        "align_first_divergence_value": "0.003",
        "align_first_divergence_limit": "2e-06",
    }
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_passing_result_has_only_the_verdict(tmp_path):
    item = FakeItem("t.py::test_ok")
    record_result(
        item, {"schema": "align.check/1", "passed": True, "first_divergence": None}, tmp_path
    )
    assert item.user_properties == [("align_passed", "true")]


def test_filenames_are_safe_and_distinct():
    names = {
        result_filename(n)
        for n in ("a/b.py::t[x/y]", "a/b.py::t[x_y]", "../../etc/passwd", "x" * 500)
    }
    assert len(names) == 4
    assert all("/" not in n and not n.startswith(".") and len(n) < 140 for n in names)


def test_written_results_are_what_the_report_reads(tmp_path):
    from align.report.results import load_results

    item = FakeItem("cases/test_x.py::test_align[tiny]")
    report = {"schema": "align.check/1", "case": "tiny", "phases": ["forward"], "passed": False,
              "first_divergence": DIVERGENCE, "culprits": [], "rows": []}  # fmt: skip
    record_result(item, report, tmp_path)
    (result,) = load_results(tmp_path)
    assert [(o.case, o.phase, o.passed) for o in result.outcomes] == [("tiny", "forward", False)]
