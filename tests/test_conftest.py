"""The root conftest.py as a pytest plugin: options, markers, registry parametrization,
device skips. Each test runs pytest in a subprocess on the real cases/ directory."""

from __future__ import annotations

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
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


def test_markers_and_options_are_documented() -> None:
    proc = pytest_run("--markers")
    for marker in ("npu", "cuda", "cpu", "slow", "nightly"):
        assert f"@pytest.mark.{marker}:" in proc.stdout
    proc = pytest_run("--help")
    assert "align: cross-device accuracy alignment" in proc.stdout
    for option in ("--target", "--reference", "--precision", "--case", "--emulate", "--align-report"):
        assert option in proc.stdout


def test_npu_marker_collects_every_npu_variant() -> None:
    proc = pytest_run("--collect-only", "-q", "-m", "npu", "cases/")
    ids = [line for line in proc.stdout.splitlines() if "::test_alignment[" in line]
    # every case x (forward, backward) x the default precisions (fp32, amp-bf16)
    assert len(ids) == len(ZOO) * 2 * 2
    assert all("-npu-" in i for i in ids)
    assert f"{len(ids)}/{len(ZOO) * 3 * 2 * 2} tests collected" in proc.stdout


def test_case_and_precision_options_shape_the_parametrization() -> None:
    proc = pytest_run("--collect-only", "-q", "--case", "resnet50", "--precision", "O1,fp32", "cases/")
    ids = sorted(line.split("[")[1].rstrip("]") for line in proc.stdout.splitlines() if "[" in line)
    assert ids == sorted(
        f"resnet50-{v}-{ph}-{pr}"
        for v in ("cpu", "cuda", "npu")
        for ph in ("forward", "backward")
        for pr in ("amp-fp16", "fp32")
    )
    assert "align: reference=cpu target=auto precision=amp-fp16,fp32 case=resnet50" in proc.stdout


def test_unknown_precision_is_a_usage_error() -> None:
    proc = pytest_run("--collect-only", "-q", "--precision", "fp64", "cases/")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR
    assert "unknown precision 'fp64'" in proc.stderr


def test_absent_device_and_skipped_case_skip_with_their_reasons() -> None:
    proc = pytest_run(
        "-rs", "-m", "npu", "--precision", "fp32", "-k", "resnet50-npu or solov2_r50", "cases/"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 skipped" in proc.stdout
    assert proc.stdout.count("no NPU: ") == 2  # resnet50 forward and backward, at setup
    assert "solov2_r50: needs mmdet 3.3 with the full, compiled mmcv" in proc.stdout
