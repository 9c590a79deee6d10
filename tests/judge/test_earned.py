"""A verdict can only be earned: crafted inputs that once came out ALIGNED are now errors.

Each false pass (all-NaN golden or reference dumps, NaN/inf/negative/non-numeric
tolerances, a broken golden file, a dump naming a case by a path, a golden that is not
float64, a train phase of no steps, a comparison that judged nothing) must raise an
`AlignError` naming what was wrong, in process, and exit 2 with one `error:` line through
the command lines. NaN on the target alone stays a failure, not an error.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import align
from align.errors import AlignError
from align.numerics.verdict import OVERFLOWED_MESSAGE, Row, Tolerance, judge, judge_robustly
from align.record.trace import Trace
from align.zoo.golden import golden_dir, load_golden

ROOT = Path(__file__).resolve().parents[2]
IDENTICAL = "the target reproduced the reference bit for bit"


def _cli(
    tool: str, *args: object, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"align.{tool}", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    explain = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, explain
    assert "Traceback" not in proc.stderr and "ALIGNED" not in proc.stdout, explain
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], explain
    for fragment in fragments:
        assert fragment in errors[0], explain


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.fixture(scope="module")
def traces() -> dict[str, Trace]:
    """reference and target (fp32, bit-identical runs) and the float64 golden of one model."""
    model, x = _model(), torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    return {
        "ref": align.capture(model, x),
        "tgt": align.capture(model, x),
        "gold": align.capture(model, x, precision="fp64"),
    }


def _mapped(trace: Trace, fn: Callable[[torch.Tensor], torch.Tensor], **meta: object) -> Trace:
    """A copy of `trace` with every tensor replaced by fn(tensor) and `meta` updated."""
    return dataclasses.replace(
        trace,
        tensors={k: fn(trace.tensor(k)) for k in trace.keys()},
        meta={**trace.meta, **meta},
    )


def _garbage(t: torch.Tensor) -> torch.Tensor:
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(7)).to(t.dtype) * 1e3


def _nan(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, math.nan)


def _saved(tmp_path: Path, **traces: Trace) -> list[Path]:
    return [trace.save(tmp_path / name) for name, trace in traces.items()]


# -- non-finite golden or reference: an error naming the tensor --------------------------


def test_an_all_nan_golden_is_an_error_naming_the_tensor(traces, tmp_path):
    gold, tgt = _mapped(traces["gold"], _nan), _mapped(traces["tgt"], _garbage)
    with pytest.raises(AlignError, match=r"golden .*NaN/Inf.*\b0 forward output\[0\]"):
        align.compare(traces["ref"], tgt, gold)
    ref, tgt, gold = _saved(tmp_path, ref=traces["ref"], tgt=tgt, gold=gold)
    _assert_one_line_error(_cli("compare", ref, tgt, "--golden", gold), "golden", "output[0]")


@pytest.mark.parametrize("golden", [True, False], ids=["with-golden", "without-golden"])
def test_an_all_nan_reference_is_an_error_naming_the_tensor(traces, tmp_path, golden):
    ref, tgt = _mapped(traces["ref"], _nan), _mapped(traces["tgt"], _garbage)
    gold = traces["gold"] if golden else None
    with pytest.raises(AlignError, match=r"reference .*NaN/Inf.*forward output\[0\]"):
        align.compare(ref, tgt, gold)
    paths = _saved(tmp_path, ref=ref, tgt=tgt, **({"gold": gold} if golden else {}))
    args = [*paths[:2], *(["--golden", paths[2]] if golden else [])]
    _assert_one_line_error(_cli("compare", *args), "reference", "output[0]")


def test_one_inf_in_one_golden_gradient_is_an_error_naming_it(traces):
    gold = _mapped(traces["gold"], torch.clone)
    key = gold.param_grads["0.weight"]
    gold.tensors[key][0, 0] = math.inf
    with pytest.raises(AlignError, match=r"golden .*1 NaN/Inf.*\b0 param_grad weight"):
        align.compare(traces["ref"], _mapped(traces["tgt"], _garbage), gold)


def test_nan_on_the_target_alone_stays_a_failure(traces, tmp_path):
    tgt = _mapped(traces["tgt"], _nan)
    report = align.compare(traces["ref"], tgt, traces["gold"])
    assert not report.passed and report.first_divergence.metric == "nonfinite"
    ref, tgt, gold = _saved(tmp_path, ref=traces["ref"], tgt=tgt, gold=traces["gold"])
    proc = _cli("compare", ref, tgt, "--golden", gold)
    assert proc.returncode == 1 and "NOT ALIGNED" in proc.stdout, proc.stderr


def _row() -> Row:
    return Row("layer1", 0, "backward", "grad_input[0]", "", [])


@pytest.mark.parametrize("side", ["reference", "golden"])
def test_judge_robustly_refuses_a_nonfinite_yardstick(side):
    g = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r, t = g.float(), (2 * g).float()  # the target fails, so the draws are consulted
    bad = torch.full_like(r, math.nan)
    tensors = {"reference": r, "golden": g, "draw": r}
    tensors[side] = bad.to(tensors[side].dtype)
    with pytest.raises(AlignError, match=rf"{side}.*64 NaN/Inf.*layer1 backward grad_input\[0\]"):
        judge_robustly(
            t,
            tensors["reference"],
            tensors["golden"],
            Tolerance(),
            strict_dtype=True,
            local=False,
            row=_row(),
            draws=lambda round_: [tensors["draw"]],
        )


def _masked(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A golden and a reference with -inf at the same 8 places (a causal mask)."""
    g = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g[::8] = -math.inf
    return g, g.float()


def _robustly(t: torch.Tensor, r: torch.Tensor, g: torch.Tensor, local: bool = False) -> Row:
    return judge_robustly(
        t, r, g, Tolerance(), strict_dtype=True, local=local, row=_row(), draws=lambda _: [r]
    )


@pytest.mark.parametrize("local", [False, True])
def test_infinities_the_reference_and_golden_share_are_built_and_the_target_must_match(local):
    g, r = _masked()
    assert _robustly(r.clone(), r, g, local).passed
    t = r.clone()
    t[8] = -1e9  # finite where every other run holds -inf
    verdict = _robustly(t, r, g, local)
    assert verdict.failed == ["nonfinite"] and verdict.metrics["nonfinite"] == 1
    assert "not the infinity reference and golden hold" in verdict.message
    t = r.clone()
    t[0] = math.inf  # the other infinity
    assert "nonfinite" in _robustly(t, r, g, local).failed


def test_an_infinity_on_the_reference_alone_is_an_overflow_and_an_error():
    g, r = _masked()
    r[1] = -math.inf  # the golden is finite there
    with pytest.raises(AlignError, match=r"reference .*1 NaN/Inf of 64.*layer1"):
        _robustly(r.clone(), r, g)
    g[1] = math.inf  # and another infinity on the golden
    with pytest.raises(AlignError, match=r"NaN/Inf"):
        _robustly(r.clone(), r, g)


def test_an_overflowed_gradient_on_the_reference_says_what_a_loss_scaler_does_with_it():
    g, r = _masked()
    r[1] = math.inf
    for phase, hint in (("backward", True), ("forward", False)):
        row = dataclasses.replace(_row(), phase=phase)
        with pytest.raises(AlignError) as error:
            judge_robustly(
                r.clone(),
                r,
                g,
                Tolerance(),
                strict_dtype=True,
                local=False,
                row=row,
                draws=lambda _: [r],
            )
        assert ("loss scaler" in str(error.value) and "align.Recorder" in str(error.value)) == hint


@pytest.mark.parametrize("local", [False, True])
def test_a_draw_that_overflowed_leaves_no_signal_whole_network_and_is_left_out_isolated(local):
    """An honest draw whose jitter took an fp16 value past the largest: honest devices
    overflow there, so a whole-network tensor has no signal to judge; on an isolated
    module the draw is left out and the tensor judged on the reference alone."""
    g = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r, t = g.float(), (2 * g).float()
    bad = torch.full_like(r, math.inf)
    verdict = judge_robustly(
        t, r, g, Tolerance(), strict_dtype=True, local=local, row=_row(), draws=lambda _: [bad]
    )
    assert verdict.passed != local, verdict
    assert (verdict.message == OVERFLOWED_MESSAGE) != local


@pytest.mark.parametrize("nan_in", ["reference", "golden", "target"])
def test_a_tensor_with_nothing_finite_left_to_judge_never_passes(nan_in):
    g = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sides = {"target": g.float(), "reference": g.float(), "golden": g}
    sides[nan_in] = torch.full_like(sides[nan_in], math.nan)
    verdict = judge(
        sides["target"],
        sides["reference"],
        sides["golden"],
        Tolerance(),
        strict_dtype=True,
        local=True,
        row=_row(),
    )
    assert not verdict.passed and "nonfinite" in verdict.failed, verdict


# -- tolerances are finite positive numbers -------------------------------------------------


BAD_VALUES = [math.nan, math.inf, -math.inf, -1.0, 0.0, "1e12", True, None]


@pytest.mark.parametrize("key", ["k", "floor"])
@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_tolerance_refuses_what_is_not_a_finite_positive_number(key, value):
    with pytest.raises(AlignError, match=rf"tolerance {key} must be a finite number > 0"):
        Tolerance(**{key: value})


def test_check_refuses_a_nan_tolerance_before_running():
    model, x = _model(), torch.randn(5, 4)
    with pytest.raises(AlignError, match=r"tolerance k must be a finite number > 0 .*, got nan"):
        align.check(model, x, reference="cpu", target="cpu", tolerance={"k": math.nan})
    with pytest.raises(AlignError, match=r"unknown tolerance key\(s\) kk.*k, floor"):
        align.check(model, x, reference="cpu", target="cpu", tolerance={"kk": 2.0})


@pytest.mark.parametrize(
    "line, key",
    [
        ("k = nan", "tolerance.fp32.k"),
        ("floor = nan", "tolerance.fp32.floor"),
        ("k = inf", "tolerance.fp32.k"),
        ('k = "1e12"', "tolerance.fp32.k"),
        ("k = -1", "tolerance.fp32.k"),
        ("floor = 0", "tolerance.fp32.floor"),
    ],
)
def test_a_golden_file_with_a_bad_tolerance_names_the_file_and_key(tmp_path, line, key):
    (tmp_path / "tiny.toml").write_text(f'case = "tiny"\n[tolerance.fp32]\n{line}\n')
    with pytest.raises(AlignError) as info:
        load_golden("tiny", tmp_path)
    assert str(tmp_path / "tiny.toml") in str(info.value)
    assert f"{key} must be a finite number > 0" in str(info.value)


@pytest.fixture
def golden_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the golden files three levels down in tmp_path, made $ALIGN_GOLDEN_DIR (the
    registry is loaded first, from the real files: it reads each case's figures once)."""
    align.list_cases()
    copy = tmp_path / "g1" / "g2" / "golden"
    shutil.copytree(golden_dir(), copy)
    monkeypatch.setenv("ALIGN_GOLDEN_DIR", str(copy))
    return copy


@pytest.mark.parametrize(
    "edit, fragment",
    [
        ("\n[tolerance.forward.fp32]\nk = nan\n", "tolerance.forward.fp32.k"),
        ("\n[tolerance.forward.fp32]\nk = inf\n", "tolerance.forward.fp32.k"),
        ("\ncase = [\n", "is not valid TOML"),
    ],
    ids=["nan", "inf", "broken-toml"],
)
def test_a_case_dump_with_a_broken_golden_file_is_an_error_not_the_defaults(
    traces, tmp_path, golden_copy, edit, fragment
):
    with (golden_copy / "digits.toml").open("a") as f:
        f.write(edit)
    ref = _mapped(traces["ref"], torch.clone, case="digits")
    tgt = _mapped(traces["tgt"], _garbage)
    with pytest.raises(AlignError) as info:
        align.compare(ref, tgt, traces["gold"])
    assert str(golden_copy / "digits.toml") in str(info.value) and fragment in str(info.value)
    paths = _saved(tmp_path, ref=ref, tgt=tgt, gold=traces["gold"])
    proc = _cli(
        "compare", paths[0], paths[1], "--golden", paths[2],
        env={"ALIGN_GOLDEN_DIR": str(golden_copy)},
    )  # fmt: skip
    _assert_one_line_error(proc, str(golden_copy / "digits.toml"), fragment)


# -- a dump's case is a registered case, never a path ---------------------------------------


def test_a_dump_naming_its_case_by_a_path_is_an_error(traces, tmp_path, golden_copy):
    case = "../../../elsewhere/x"  # from golden_copy: tmp_path/elsewhere/x.toml
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.toml").write_text(
        f'case = "{case}"\n[tolerance.fp32]\nk = 1e12\nfloor = 1e12\n'
    )
    ref = _mapped(traces["ref"], torch.clone, case=case)
    tgt = _mapped(traces["tgt"], _garbage)
    with pytest.raises(AlignError, match=r"case '\.\./\.\./\.\./elsewhere/x'.*not a registered"):
        align.compare(ref, tgt, traces["gold"])
    paths = _saved(tmp_path, ref=ref, tgt=tgt, gold=traces["gold"])
    proc = _cli(
        "compare", paths[0], paths[1], "--golden", paths[2],
        env={"ALIGN_GOLDEN_DIR": str(golden_copy)},
    )  # fmt: skip
    _assert_one_line_error(proc, case, "not a registered case")


# -- the golden is float64 ------------------------------------------------------------------


def test_a_golden_that_is_not_float64_is_an_error(traces, tmp_path):
    garbage = _mapped(traces["tgt"], _garbage)
    with pytest.raises(AlignError, match=r"golden .*fp64.*precision fp32"):
        align.compare(traces["ref"], garbage, garbage)
    ref, tgt = _saved(tmp_path, ref=traces["ref"], tgt=garbage)
    _assert_one_line_error(_cli("compare", ref, tgt, "--golden", tgt), "golden", "fp64")


def test_a_golden_claiming_fp64_with_float32_tensors_is_an_error(traces):
    gold = _mapped(traces["gold"], lambda t: t.float())  # meta still says fp64
    with pytest.raises(AlignError, match=r"golden .*float32.*float64"):
        align.compare(traces["ref"], traces["tgt"], gold)


# -- something must be judged ---------------------------------------------------------------


@pytest.mark.parametrize("steps", [-1, 0])
def test_a_train_phase_of_no_steps_is_an_error(steps):
    model, x = _model(), torch.randn(5, 4)
    with pytest.raises(AlignError, match=rf"steps must be an integer >= 1.*got {steps}"):
        align.check(model, x, reference="cpu", target="cpu", phases="train", steps=steps)


def test_check_cli_with_no_train_steps_exits_2():
    proc = _cli("check", "digits", "--phases", "train", "--steps", "-1", "--target", "cpu")
    _assert_one_line_error(proc, "--steps", "-1")


def test_a_comparison_that_judged_nothing_is_an_error(traces):
    forward_only = dataclasses.replace(traces["ref"], backward_order=[], backward_events=[])
    forward_only.param_grads = {}
    with pytest.raises(AlignError, match=r"no tensor of phase backward was judged"):
        align.compare(forward_only, traces["tgt"], traces["gold"], phases="backward")
    unmapped = {c.module: None for c in traces["ref"].calls}
    with pytest.raises(AlignError, match=r"no tensor of phase forward was judged"):
        align.compare(traces["ref"], traces["tgt"], traces["gold"], name_map=unmapped)


# -- bit-identical dumps say so -------------------------------------------------------------


def test_comparing_bit_identical_dumps_says_so(traces, tmp_path):
    report = align.compare(traces["ref"], traces["tgt"], traces["gold"])
    assert report.passed and IDENTICAL in report.notes
    other = _mapped(traces["tgt"], lambda t: t * (1 + 2**-20))
    assert IDENTICAL not in align.compare(traces["ref"], other, traces["gold"]).notes
    ref, tgt, gold = _saved(tmp_path, ref=traces["ref"], tgt=traces["tgt"], gold=traces["gold"])
    proc = _cli("compare", ref, tgt, "--golden", gold)
    assert proc.returncode == 0 and f"note: {IDENTICAL}" in proc.stdout, proc.stderr
