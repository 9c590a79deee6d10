"""align.report.plots: PNGs from rows and curves, robust to odd values and names."""

from __future__ import annotations

import base64

from align.report import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _row(module: str, value: float, passed: bool = True) -> dict:
    return {"module": module, "phase": "forward", "passed": passed,
            "metrics": {"rel_rmse": value}, "reference": {"rel_rmse": 1e-7},
            "limits": {"rel_rmse": 2e-6}}  # fmt: skip


def test_layer_plot_survives_mathtext_names_zeros_and_nan():
    rows = [_row("x$\\frac{$y", 0.0), _row("b" * 300, float("nan"), passed=False), _row("c", 3e-7)]
    assert base64.b64decode(plots.layer_errors(rows)).startswith(PNG)
    assert plots.layer_errors([_row("a", 0.0) | {"reference": {}, "limits": {}}]) is None


def test_curves_skip_incomplete_points():
    steps = [{"step": 0, "loss": {"target": 1.0}}, {"step": 1, "loss": None}, "junk"]
    assert base64.b64decode(plots.loss_curves(steps)).startswith(PNG)
    assert plots.loss_curves([{"step": 0}]) is None
    assert plots.epoch_curves([{"epoch": 0, "top1": 70.0}, {"epoch": 1, "top1": 71.0}]) is not None
    assert plots.epoch_curves([{"epoch": 0}]) is None
