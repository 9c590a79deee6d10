"""A wheel built from this repository works without the checkout: it carries the golden
files as package data, and its `align` command lists the cases and checks one."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from align.zoo import list_cases

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, a directory it is installed into), built without network or build isolation."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip(
            "setuptools (the build backend) is not installed: no wheel can be built offline"
        )
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out / "dist"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    wheel = next((out / "dist").glob("align-*.whl"))
    site = out / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    return wheel, site


def _run(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("ALIGN_GOLDEN_DIR", None)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def test_the_wheel_carries_every_golden_file(wheel_site):
    wheel, _ = wheel_site
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [c for c in list_cases() if f"align/zoo/golden_files/{c}.toml" not in names]
    assert not missing, f"golden files missing from the wheel: {missing}"


def test_the_installed_wheel_lists_and_checks(wheel_site, tmp_path):
    _, site = wheel_site
    where = _run(site, "-c", "import align; print(align.__file__)", cwd=tmp_path)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    listed = _run(site, "-m", "align", "list", "resnet50", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "resnet50" in listed.stdout and "top1" in listed.stdout.lower()
    checked = _run(site, "-m", "align", "check", "resnet50", "--size", "64", "-q", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ALIGNED" in checked.stdout


_WITHOUT_EXTRAS = (
    "import sys\n"
    "for name in ('mmengine', 'mmdet', 'matplotlib', 'sklearn', 'pycocotools', 'cv2'):\n"
    "    sys.modules[name] = None  # as if not installed: importing it raises ImportError\n"
    "from align.commands import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _without_extras(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, *args], capture_output=True, text=True, timeout=600
    )


def test_check_needs_none_of_the_extras():
    proc = _without_extras("check", "digits", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALIGNED" in proc.stdout


def test_run_without_its_extra_says_which_to_install(tmp_path):
    proc = _without_extras("run", "digits", "--work-dir", str(tmp_path / "w"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install 'align[run]'" in proc.stderr and "Traceback" not in proc.stderr
