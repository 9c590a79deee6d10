"""align's pytest plugin on this repository's cases/ (registry parametrization, markers,
device skips, --align-case) and the root conftest.py. Each test runs pytest in a
subprocess on the real cases/ directory; tests/test_pytest_plugin.py tests the plugin in
a fresh project."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.zoo import list_cases

ROOT = Path(__file__).resolve().parent.parent
ZOO = list_cases(family="classification") + list_cases(family="detection")


def pytest_run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


def test_the_plugin_is_registered_once_by_its_entry_point() -> None:
    proc = pytest_run("--trace-config", "--collect-only", "-q", "cases/test_classification.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    registered = [line for line in proc.stdout.splitlines() if "align/pytest_plugin.py" in line]
    assert registered == [
        "PLUGIN registered: <module 'align.pytest_plugin' from "
        f"'{ROOT / 'align' / 'pytest_plugin.py'}'>"
    ]


def test_the_root_conftest_names_the_fix_when_the_plugin_is_not_loaded() -> None:
    proc = pytest_run("--collect-only", "-q", "cases/", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR
    assert "align's pytest plugin is not loaded: install this checkout" in proc.stderr
    proc = pytest_run(
        "-p", "align.pytest_plugin", "--collect-only", "-q", "cases/test_classification.py",
        PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_npu_marker_collects_every_npu_variant() -> None:
    proc = pytest_run("--collect-only", "-q", "-m", "npu", "cases/")
    ids = [line for line in proc.stdout.splitlines() if "::test_alignment[" in line]
    # every case x (forward, backward) x the default precisions (fp32, amp-bf16)
    assert len(ids) == len(ZOO) * 2 * 2
    assert all("-npu-" in i for i in ids)
    assert f"{len(ids)}/{len(ZOO) * 3 * 2 * 2} tests collected" in proc.stdout


def test_case_and_precision_options_shape_the_parametrization() -> None:
    proc = pytest_run(
        "--collect-only", "-q", "--align-case", "resnet50", "--align-precision", "O1,fp32",
        "cases/",
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if "::test_alignment[" in line]
    ids = sorted(line.split("[", 1)[1].rstrip("]") for line in lines)
    assert f"{len(ids)}/{len(ZOO) * 3 * 2 * 2} tests collected" in proc.stdout
    assert ids == sorted(
        f"resnet50-{v}-{ph}-{pr}"
        for v in ("cpu", "cuda", "npu")
        for ph in ("forward", "backward")
        for pr in ("amp-fp16", "fp32")
    )


def test_a_case_pattern_matching_nothing_is_a_usage_error() -> None:
    proc = pytest_run("-q", "--align-case", "nomatch", "cases/")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "--align-case 'nomatch' matches no registered case; registered: " in proc.stderr


def test_slow_and_nightly_marks_follow_the_registry_and_the_precision() -> None:
    proc = pytest_run(
        "--collect-only", "-q", "-m", "slow or nightly", "--align-precision", "all",
        "--align-case", "ssd512,resnet50", "cases/",
    )  # fmt: skip
    ids = {line.split("[", 1)[1].rstrip("]") for line in proc.stdout.splitlines() if "[" in line}
    night = {f"{c}-{v}-{ph}-{pr}" for c in ("ssd512", "resnet50") for v in ("cpu", "cuda", "npu")
             for ph in ("forward", "backward") for pr in ("amp-fp16", "o2-fp16")}  # fmt: skip
    slow = {
        f"ssd512-{v}-{ph}-amp-bf16"
        for v in ("cpu", "cuda", "npu")
        for ph in ("forward", "backward")
    }
    assert ids == night | slow


def test_absent_device_and_skipped_case_skip_with_their_reasons() -> None:
    proc = pytest_run(
        "-rs", "-m", "npu", "--align-precision", "fp32", "-k", "[resnet50-npu or solov2_r50",
        "cases/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "align: reference=cpu target=auto precision=fp32 case=* emulate=npu-fp32" in proc.stdout
    assert "4 skipped" in proc.stdout
    # resnet50 forward and backward skip at setup, with the discovery's reason
    assert "target: no NPU: torch_npu is not installed" in proc.stdout
    from align.zoo import solov2

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
         "-q", "-m", "cpu", "-k", "[resnet50-cpu-forward", "--align-precision", "O2",
         "--align-emulate", "npu-bf16", "cases/test_classification.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, proc.stdout + proc.stderr
    assert "align: NOT ALIGNED (fake report)" in proc.stdout
    assert (
        "reproduce alone: pytest "
        "'cases/test_classification.py::test_alignment[resnet50-cpu-forward-o2-fp16]' "
        "--align-emulate npu-bf16 --align-precision o2-fp16"
    ) in proc.stdout
    assert "1 failed" in proc.stdout
    assert "0 aligned, 1 not aligned" in proc.stdout  # the terminal summary's align section
