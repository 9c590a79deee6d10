"""align's pytest plugin as a user meets it: a fresh project (pytester), the plugin loaded
by its `pytest11` entry point, tests checking their own model with `align_check`."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

pytest_plugins = ["pytester"]

MINE = """
import copy, torch

def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

def test_mine(align_check):
    report = align_check(mlp(), torch.randn(8, 16))
    assert report.passed, report
"""

PORT = """
from test_mine import copy, mlp, torch

def test_port(align_check):
    model = mlp()
    port = copy.deepcopy(model)
    with torch.no_grad():
        port[0].weight.mul_(1.001)  # a 0.1% gain fault in the first layer
    report = align_check(model, torch.randn(8, 16), target_model=port)
    assert report.passed, report
"""


def test_importing_the_plugin_imports_nothing_heavy() -> None:
    code = "import sys, align.pytest_plugin; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_fresh_project_checks_its_own_model(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_mine=MINE)
    result = pytester.runpytest_subprocess("-v", "--align-precision", "amp-bf16")
    result.assert_outcomes(passed=1)
    assert "test_mine.py::test_mine[amp-bf16] PASSED" in result.stdout.str()
    result.stdout.fnmatch_lines(["*align: reference=cpu target=auto precision=amp-bf16*"])
    result.stdout.fnmatch_lines(["*= align =*", "1 aligned, 0 not aligned (1 checks in 1 tests)"])


def test_a_failing_check_gives_junit_properties_and_the_command_that_reruns_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_mine=MINE, test_port=PORT)
    result = pytester.runpytest_subprocess(
        "--align-precision", "fp32", "--align-target", "cpu", "--junitxml", "junit.xml"
    )
    result.assert_outcomes(passed=1, failed=1)
    command = "pytest 'test_port.py::test_port[fp32]' --align-target cpu"
    result.stdout.fnmatch_lines(
        ["*- align -*", f"reproduce alone: {command}"]  # the failing test's report section
    )
    result.stdout.fnmatch_lines(
        ["*= align =*", "1 aligned, 1 not aligned (2 checks in 2 tests)",
         "FAILED test_port.py::test_port[[]fp32[]]  culprit 0 *",
         f"  reproduce alone: {command}"]
    )  # fmt: skip
    cases = {c.get("name"): c for c in ET.parse(pytester.path / "junit.xml").iter("testcase")}
    port = {p.get("name"): p.get("value") for p in cases["test_port[fp32]"].iter("property")}
    assert port["align_passed"] == "false"
    assert port["align_culprit"].startswith("0 ")  # the Linear the fault is in
    assert port["align_reproduce"] == command
    assert (port["align_target"], port["align_precision"]) == ("cpu", "fp32")
    mine = {p.get("name"): p.get("value") for p in cases["test_mine[fp32]"].iter("property")}
    assert mine["align_passed"] == "true"


def test_markers_are_documented(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    for marker in ("npu", "cuda", "cpu", "slow", "nightly"):
        result.stdout.fnmatch_lines([f"@pytest.mark.{marker}: ?*"])


def test_options_are_one_documented_group(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(
        ["align: cross-device accuracy alignment:"]
        + [f"  --align-{name}=*" for name in ("target", "reference", "precision", "case",
                                               "emulate", "report")]
    )  # fmt: skip


@pytest.mark.parametrize(
    "args,message",
    [
        (["--align-case", "nomatch"], "--align-case 'nomatch' matches no registered case"),
        (["--align-case", "resnet50,nomatch"], "--align-case 'nomatch' matches no registered"),
        (["--align-precision", "fp64"], "--align-precision: unknown precision 'fp64'"),
        (["--align-target", "gpu"], "--align-target: unknown device 'gpu'"),
        (["--align-reference", "auto"], "--align-reference: unknown device 'auto'"),
    ],
)
def test_bad_options_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], message: str
) -> None:
    pytester.makepyfile(test_mine=MINE)
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}*"])
