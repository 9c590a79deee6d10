"""The report in a real browser (headless Chromium): what it shows, and that no script runs.

Skipped, with the reason, when no chromium is installed (Debian: apt-get install chromium).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from align.commands.report import main

CRAFTED = "<script>document.title='pwned'</script>"
BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="chromium is not installed (apt-get install -y chromium); browser test not run",
)


def _chromium(tmp_path: Path, *args: str) -> str:
    command = [
        BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", *args,
    ]  # fmt: skip
    process = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert process.returncode == 0, process.stderr[-2000:]
    return process.stdout


@pytest.fixture
def report(tmp_path, night_one, make_check, write) -> Path:
    """Two nights: resnet50 newly fails in layer1.0.conv1; a case with a crafted name appears."""
    history, out = tmp_path / "history.sqlite", tmp_path / "report.html"
    assert (
        main(
            [
                str(night_one),
                "--history",
                str(history),
                "--out",
                str(out),
                "--night",
                "2025-01-01",
                "--no-plots",
            ]
        )
        == 0
    )
    night_two = tmp_path / "night2"
    write(night_two, "resnet50.json", make_check("resnet50", culprit="layer1.0.conv1"))
    write(night_two, "vit.json", make_check("vit"))
    write(
        night_two,
        "crafted.json",
        make_check(CRAFTED, culprit=f"head.{CRAFTED}", module_names=["stem", f"head.{CRAFTED}"]),
    )
    assert (
        main(
            [str(night_two), "--history", str(history), "--out", str(out), "--night", "2025-01-02"]
        )
        == 0
    )
    return out


def test_scripts_run_in_this_browser_setup(tmp_path):
    """Control: a page with a real script does change its title, so the next test can tell."""
    page = tmp_path / "control.html"
    page.write_text(f"<html><head><title>unchanged</title></head><body>{CRAFTED}</body></html>")
    assert "<title>pwned</title>" in _chromium(tmp_path, "--dump-dom", page.as_uri())


def test_browser_shows_changes_culprit_and_no_script_ran(tmp_path, report):
    dom = _chromium(tmp_path, "--dump-dom", report.as_uri())
    assert "<title>align report 2025-01-02</title>" in dom  # the crafted name did not run
    assert "<script" not in dom.lower()
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom  # shown as text
    assert "Since night 2025-01-01" in dom
    newly_failing = dom.split("Newly failing (1)")[1].split("</ul>")[0]
    assert "<b>resnet50</b> forward fp32" in newly_failing and "layer1.0.conv1" in newly_failing
    assert "Missing tonight (1)" in dom and "resnet50-full" in dom
    assert dom.count('src="data:image/png;base64,') >= 6


def test_screenshot(tmp_path, report):
    shot = tmp_path / "report.png"
    _chromium(
        tmp_path,
        f"--screenshot={shot}",
        "--window-size=1280,2200",
        "--hide-scrollbars",
        report.as_uri(),
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
