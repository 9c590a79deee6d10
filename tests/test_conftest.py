"""The root conftest.py as a pytest plugin: options, markers, registry parametrization,
device skips. Each test runs pytest in a subprocess on the real cases/ directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.cases import get_case, list_cases

ROOT = Path(__file__).resolve().parent.parent
ZOO = [n for n in list_cases() if get_case(n).family in ("classification", "detection")]


def pytest_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_markers_and_options_are_documented() -> None:
    proc = pytest_run("--markers")
    for marker in ("npu", "cuda", "cpu", "slow", "nightly"):
        assert f"@pytest.mark.{marker}:" in proc.stdout
    proc = pytest_run("--help")
    assert "align: cross-device accuracy alignment" in proc.stdout
    for option in (
        "--target",
        "--reference",
        "--precision",
        "--case",
        "--emulate",
        "--align-report",
    ):
        assert option in proc.stdout


def test_npu_marker_collects_every_npu_variant() -> None:
    proc = pytest_run("--collect-only", "-q", "-m", "npu", "cases/")
    ids = [line for line in proc.stdout.splitlines() if "::test_alignment[" in line]
    # every case x (forward, backward) x the default precisions (fp32, amp-bf16)
    assert len(ids) == len(ZOO) * 2 * 2
    assert all("-npu-" in i for i in ids)
    assert f"{len(ids)}/{len(ZOO) * 3 * 2 * 2} tests collected" in proc.stdout


def test_case_and_precision_options_shape_the_parametrization() -> None:
    proc = pytest_run(
        "--collect-only", "-q", "--case", "resnet50", "--precision", "O1,fp32", "cases/"
    )
    lines = [line for line in proc.stdout.splitlines() if "::test_alignment[" in line]
    ids = sorted(line.split("[", 1)[1].rstrip("]") for line in lines)
    # test_detection.py matches no case: pytest's empty parameter set, one skipped item
    assert ids.pop(0) == "NOTSET"
    assert ids == sorted(
        f"resnet50-{v}-{ph}-{pr}"
        for v in ("cpu", "cuda", "npu")
        for ph in ("forward", "backward")
        for pr in ("amp-fp16", "fp32")
    )


def test_unknown_precision_is_a_usage_error() -> None:
    proc = pytest_run("--collect-only", "-q", "--precision", "fp64", "cases/")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR
    assert "unknown precision 'fp64'" in proc.stderr


def test_absent_device_and_skipped_case_skip_with_their_reasons() -> None:
    proc = pytest_run(
        "-rs", "-m", "npu", "--precision", "fp32", "-k", "[resnet50-npu or solov2_r50", "cases/"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "align: reference=cpu target=auto precision=fp32 case=* emulate=npu-fp32" in proc.stdout
    assert "4 skipped" in proc.stdout
    # resnet50 forward and backward skip at setup, with the discovery's reason
    assert (
        "SKIPPED [2] cases/test_classification.py:11: no NPU: torch_npu is not installed"
        in proc.stdout
    )
    from align.cases import solov2

    reason = solov2.missing()  # without mmcv's ops the case's reason, else no NPU
    expected = f"solov2_r50: {reason[:40]}" if reason else "SKIPPED [2] cases/test_detection.py"
    assert expected in proc.stdout, proc.stdout


FAKE_CHECK = """
import align


class FailingReport:
    passed = False

    def __str__(self):
        return "align: NOT ALIGNED (fake report)"

    def to_dict(self):
        return {"passed": False}

    def select(self, phase):
        return self


def pytest_configure(config):
    align.check = lambda *args, **kwargs: FailingReport()
"""


def test_a_failure_prints_the_report_and_the_command_that_reruns_it(tmp_path: Path) -> None:
    (tmp_path / "fake_align_check.py").write_text(FAKE_CHECK)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "fake_align_check",
         "-q", "-m", "cpu", "-k", "[resnet50-cpu-forward", "--precision", "O2",
         "--emulate", "npu-bf16", "cases/test_classification.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, proc.stdout + proc.stderr
    assert "align: NOT ALIGNED (fake report)" in proc.stdout
    assert (
        "reproduce alone: pytest "
        "'cases/test_classification.py::test_alignment[resnet50-cpu-forward-o2-fp16]' "
        "--emulate npu-bf16 --precision o2-fp16"
    ) in proc.stdout
    assert "1 failed" in proc.stdout
