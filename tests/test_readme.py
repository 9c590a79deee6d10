"""The README's recipe for a user's own training script runs as written (on the CPU as
every device) and its compare command, with the culprit-naming `--model`, accepts it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if b.startswith("# python train.py gpu_dump cuda")]
    assert len(found) == 1, "the README's training-script example is gone or duplicated"
    return found[0]


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_the_readme_training_script_records_and_compares(tmp_path):
    (tmp_path / "train.py").write_text(_script())
    for args in (["gpu_dump", "cpu"], ["npu_dump", "cpu"], ["golden", "cpu", "--golden"]):
        done = _run(tmp_path, "train.py", *args)
        assert done.returncode == 0, done.stderr[-3000:]
    command = ["gpu_dump", "npu_dump", "--golden", "golden", "--model", "train:build_model"]
    done = _run(tmp_path, "-m", "align.compare", *command, "--json", "r.json")
    assert done.returncode == 0 and "ALIGNED" in done.stdout, done.stdout + done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [s["step"] for s in report["train"]["steps"]] == [0, 1, 2]
