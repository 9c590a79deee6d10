"""python -m align.run end to end: digits on two gloo workers, SIGKILL + --resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.run import main

ROOT = Path(__file__).resolve().parent.parent


def _align_run(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "align.run", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """`python -m align.run digits --cards 2`, uninterrupted: (exit code, stdout, work dir)."""
    work = tmp_path_factory.mktemp("digits")
    proc = _align_run("digits", "--cards", "2", "--work-dir", str(work))
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out + err, work


@pytest.mark.timeout(300)
def test_digits_confirms_on_two_gloo_workers(digits_run):
    code, output, work = digits_run
    assert code == 0, output
    result = json.loads((work / "result.json").read_text())
    assert result["schema"] == "align.run/1" and result["kind"] == "run"
    assert (result["case"], result["device"], result["backend"]) == ("digits", "cpu", "gloo")
    assert result["world_size"] == 2 and result["nnodes"] == 1
    assert result["verdict"]["passed"] and result["resumed_from"] is None
    assert [e["epoch"] for e in result["epochs"]] == list(range(1, 9))
    assert result["final"]["top1"] == result["epochs"][-1]["top1"] > 98
    assert result["images_per_s"] > 0 and result["environment"]["versions"]["mmengine"]
    assert result["documented"]["value"] == 99.61 and not result["deviations"]
    assert (work / "rank0.log").is_file() and (work / "rank1.log").is_file()
    assert "PASS: confirmed" in output
    assert not list(work.glob(".result.json.*"))  # the atomic write left no temp file


@pytest.mark.timeout(400)
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(digits_run, tmp_path):
    _, _, uninterrupted = digits_run
    work = tmp_path / "killed"
    proc = _align_run("digits", "--cards", "2", "--work-dir", str(work), start_new_session=True)
    deadline = time.monotonic() + 180
    while not (work / "epoch_3.pth").exists():  # mid-run: 3 of 8 epochs checkpointed
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, as a lost node
    proc.wait()
    assert not (work / "result.json").exists()

    resumed = _align_run("digits", "--cards", "2", "--work-dir", str(work), "--resume")
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out + err
    a = json.loads((uninterrupted / "result.json").read_text())
    b = json.loads((work / "result.json").read_text())
    assert b["resumed_from"] >= 3
    assert b["final"] == a["final"]
    assert [(e["epoch"], e["loss"], e["top1"]) for e in b["epochs"]] == [
        (e["epoch"], e["loss"], e["top1"]) for e in a["epochs"]
    ]


def test_compare_judges_results_together(digits_run, tmp_path, capsys):
    _, _, work = digits_run
    result = json.loads((work / "result.json").read_text())
    ours = str(work / "result.json")
    low = []
    for i, top1 in enumerate((97.0, 97.2, 96.9)):  # three runs clearly below 99.61
        low.append(tmp_path / f"low{i}.json")
        low[-1].write_text(json.dumps({**result, "final": {"top1": top1, "top5": 99.0}}))
    assert main(["--compare", ours, ours]) == 0
    assert main(["--compare", *map(str, low)]) == 1
    assert "not confirmed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["no_such_case"], "unknown case"),
        (["digits", "--precision", "amp-fp16", "--device", "cpu"], "needs an accelerator"),
        (["digits", "--precision", "fp8"], "unknown precision"),
        (["ssd300", "--device", "cpu"], "needs an accelerator"),  # its recipe is amp-fp16
        (["ssdlite_mobilenetv2", "--data", "/nonexistent/coco"], "/nonexistent/coco"),
        (["solov2_r50"], "not instance_segmentation"),
        (["resnet50", "--data", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
        (["resnet50"], "--data PATH"),
        (
            ["digits", "--resume", "--work-dir", "/nonexistent/wd"],
            "no checkpoint in /nonexistent/wd",
        ),
        (["digits", "--device", "cuda"], "not usable here"),
        (["digits", "--nnodes", "2", "--node-rank", "2"], "--node-rank"),
        (["--compare", "/nonexistent/result.json"], "cannot read result"),
    ],
)
def test_usage_data_and_environment_errors_exit_2(args, message, capsys):
    if "cuda" in args:
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("cuda is present")
    assert main(args) == 2
    assert message in capsys.readouterr().err
