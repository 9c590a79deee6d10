"""`python -m align.golden calibrate`: measured noise becomes a reviewed tolerance diff."""

import shutil

from align.commands import calibrate
from align.zoo.golden import golden_dir, load_golden


def test_calibrate_rewrites_only_the_tolerance_tables(tmp_path, monkeypatch):
    tmp_path = tmp_path / "golden"
    shutil.copytree(golden_dir(), tmp_path)  # the registry reads every case's file
    monkeypatch.setenv("ALIGN_GOLDEN_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "SEEDS", (0,))
    before = load_golden("digits")
    ks = calibrate.calibrate("digits", ["fp32"])
    after = load_golden("digits")
    assert after.figures == before.figures  # documented figures untouched
    assert after.tolerance("forward", "fp32")["k"] == ks["fp32"] >= 2.0
    text = (tmp_path / "digits.toml").read_text()
    assert "# calibrated" in text and "seed 0" in text
    block = calibrate.render("fp32", 2.5, {"again": 1.0})
    calibrate.rewrite(tmp_path / "digits.toml", "fp32", block)  # replaced, not appended
    assert load_golden("digits").tolerance("forward", "fp32")["k"] == 2.5
    assert (tmp_path / "digits.toml").read_text().count("[tolerance.fp32]") == 1


def test_proposal_never_below_default_and_has_margin():
    assert calibrate.proposal("fp32", {"a": 0.5}) == 2.0
    assert calibrate.proposal("fp32", {"a": 1.9, "b": 3.0}) == 4.5
    assert calibrate.proposal("amp-bf16", {}) == 3.0


def test_a_jump_is_reported_not_averaged_into_k():
    from align.numerics.verdict import Row

    def row(module, need, isolated=False):
        r = Row(module, 0, "backward", "grad_input[0]", "float32", [4], isolated=isolated)
        r.needed_k = need
        return r

    rows = [row("a", 1.2), row("relu", 900.0), row("conv", 15.0), row("fc", 2000.0)]
    noise, jump = calibrate._split(rows, [row("b", 1.4, True)], "fp32")
    assert noise == 1.4  # the tail after the jump (conv: 15) is left out with it
    assert "relu backward grad_input[0] (whole network) needs k 900" in jump
    assert "3 whole-network tensors from there on left out" in jump
    assert calibrate._split(rows[:1], [], "fp32") == (1.2, "")
    text = calibrate.render("fp32", calibrate.proposal("fp32", {"s": noise}), {"s": noise}, [jump])
    assert "left out as jumps" in text and "k = 2.5" in text


def test_a_target_that_reproduces_the_reference_measures_nothing(monkeypatch):
    import pytest

    from align.errors import AlignError

    assert calibrate.proposal("fp32", {"a": None, "b": 2.0}) == 3.0
    text = calibrate.render("fp32", 2.0, {"emulated, seed 0": None, "cl, seed 0": 1.1})
    assert "emulated, seed 0: bit for bit, no measurement" in text and "cl, seed 0: 1.1" in text

    class Identical:
        rows, local_rows = [], []

    monkeypatch.setattr("align.commands.calibrate.check", lambda *a, **k: Identical())
    monkeypatch.setattr(calibrate, "_target", lambda *a: {})
    with pytest.raises(AlignError, match="bit for bit on this machine"):
        calibrate.measure("digits", "amp-fp16", seeds=(0,))
