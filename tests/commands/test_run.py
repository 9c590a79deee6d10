"""python -m align.run end to end: digits on two gloo workers, SIGKILL + --resume, errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.commands.run import main

ROOT = Path(__file__).resolve().parents[2]


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


def _last_epoch(work: Path) -> int:
    """The epoch of the checkpoint mmengine's last_checkpoint names (written once the
    checkpoint is complete: a kill while epoch_N.pth is half written resumes from N-1)."""
    try:
        name = Path((work / "last_checkpoint").read_text().strip()).name
    except OSError:
        return 0
    epoch = re.fullmatch(r"epoch_(\d+)\.pth", name)  # a file being written may be cut short
    return int(epoch[1]) if epoch else 0


@pytest.mark.timeout(400)
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(digits_run, tmp_path):
    _, _, uninterrupted = digits_run
    work = tmp_path / "killed"
    proc = _align_run("digits", "--cards", "2", "--work-dir", str(work), start_new_session=True)
    deadline = time.monotonic() + 180
    while _last_epoch(work) < 3:  # mid-run: 3 of 8 epochs checkpointed, and said so
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
        (["--compare", "/nonexistent/result.json"], "not a readable JSON result"),
    ],
)
def test_usage_data_and_environment_errors_exit_2(args, message, capsys):
    if "cuda" in args:
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("cuda is present")
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--cards", "-1", "-1 is not a positive integer"),
        ("--cards", "0", "0 is not a positive integer"),  # was silently the recipe's cards
        ("--epochs", "0", "0 is not a positive integer"),  # was silently the recipe's epochs
        ("--batch-size", "0", "0 is not a positive integer"),
        ("--repeat", "0", "0 is not a positive integer"),
        ("--nnodes", "0", "0 is not a positive integer"),
        ("--master-port", "0", "0 is not a positive integer"),  # was silently 29500
        ("--epochs", "two", "'two' is not an integer"),
        ("--lr", "-1", "-1 is not a positive finite number"),
        ("--lr", "0", "0 is not a positive finite number"),
        ("--lr", "nan", "nan is not a positive finite number"),
        ("--lr", "fast", "'fast' is not a number"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["digits", option, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    last = err.splitlines()[-1]  # argparse: the usage line, then this one
    assert last.startswith(f"python -m align.run: error: argument {option}: {message}")


def test_a_work_dir_that_is_a_file_is_named(tmp_path, capsys):
    occupied = tmp_path / "a_file"
    occupied.write_text("")
    for work in (occupied, occupied / "sub"):
        assert main(["digits", "--work-dir", str(work)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"align.run: error: --work-dir {work}: not a writable directory")
        assert len(err.splitlines()) == 1
    process = subprocess.run(
        [sys.executable, "-m", "align.run", "digits", "--work-dir", str(occupied)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2, process.stderr
    assert "not a writable directory" in process.stderr and "Traceback" not in process.stderr


def _digits_result(**changes) -> dict:
    """A well-formed digits result of python -m align.run (no training needed to judge it)."""
    result = {
        "schema": "align.run/1",
        "kind": "run",
        "case": "digits",
        "device": "cpu",
        "world_size": 2,
        "precision": "fp32",
        "epochs": [{"epoch": 1, "loss": 0.2, "top1": 99.7}],
        "final": {"top1": 99.7},
        "n_val": 1797,
        "documented": {"metric": "top1", "value": 99.61, "source": "align measurement"},
        "verdict": {"passed": True, "reason": "confirmed"},
    }
    return {**result, **changes}


def test_compare_accepts_a_well_formed_result(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps(_digits_result()))
    assert main(["--compare", str(path), str(path)]) == 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not a readable JSON result (Expecting property name"),
        ("[1, 2]", "a result must be a JSON object"),
        (("final", '{"top1": 1e400}'), "number 1e400 is out of float range"),
        (("n_val", "1" + "0" * 400), "number 10000000000000000000... is out of float range"),
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 32 levels"),  # RecursionError
        (("epochs", "[" * 900 + "]" * 900), "nested deeper than 32 levels"),
        ({"case": 5}, "field 'case' should be str, not int"),
        ({"final": [99.7]}, "field 'final' should be dict, not list"),
        ({"final": {"top1": "99.7"}}, "that metric in final as a finite number"),
        ({"final": {"top5": 99.7}}, "that metric in final as a finite number"),
        ({"documented": {"value": 99.61}}, "needs the documented figure"),
        ({"documented": {"metric": "top1", "value": None}}, "needs the documented figure"),
        ({"n_val": "1797"}, "field 'n_val' should be int, not str"),
        ({"n_val": 0}, "n_val (the number of validation images) must be positive"),
        ({"verdict": None}, "required field 'verdict' is missing"),
        ({"kind": "repeat"}, "is not a result of python -m align.run"),
        (
            {"schema": "align.check/1", "passed": True, "phases": ["forward"]},  # align.check's
            "is not a result of python -m align.run",
        ),
    ],
)
def test_compare_refuses_crafted_results(tmp_path, capsys, content, message):
    if isinstance(content, dict):  # a well-formed result with these fields changed
        content = json.dumps(_digits_result(**content))
    elif isinstance(content, tuple):  # a well-formed result with this field's JSON text
        field, text = content
        content = json.dumps(_digits_result(**{field: "TEXT"})).replace('"TEXT"', text)
    path = tmp_path / "result.json"
    path.write_text(content)
    assert main(["--compare", str(path), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"align.run: error: {path}") and message in err, err
    assert len(err.splitlines()) == 1
