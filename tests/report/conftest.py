"""Result files for the report tests, written in the align.check/1 and align.run/1 schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

MODULES = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.0", "fc"]
METRICS = ("rel_rmse", "cos_err", "max_rel", "share", "mean_err", "scale_err")


def _metrics(rel_rmse: float) -> dict[str, float]:
    return {m: rel_rmse * (1 if m == "rel_rmse" else 0.5) for m in METRICS}


def check_result(
    case: str = "resnet50",
    *,
    culprit: str | None = None,
    precision: str = "fp32",
    scale: float = 1.0,
    module_names: list[str] | None = None,
) -> dict[str, Any]:
    """A check result: every row at 1e-7 * scale against a 2e-6 limit, `culprit` at 3e-3."""
    rows = []
    for phase in ("forward", "backward"):
        names = module_names or MODULES
        for module in names if phase == "forward" else reversed(names):
            bad = module == culprit and phase == "forward"
            value = 3e-3 if bad else 1e-7 * scale
            rows.append(
                {
                    "module": module,
                    "call": 0,
                    "phase": phase,
                    "tensor": "output[0]" if phase == "forward" else "grad_input[0]",
                    "dtype": "torch.float32",
                    "shape": [8, 64, 56, 56],
                    "passed": not bad,
                    "metrics": _metrics(value),
                    "reference": _metrics(1e-7),
                    "limits": _metrics(2e-6),
                }
            )
    divergence = None
    if culprit:
        divergence = {
            "module": culprit,
            "call": 0,
            "phase": "forward",
            "tensor": "output[0]",
            "metric": "rel_rmse",
            "value": 3e-3,
            "limit": 2e-6,
            "reference": 1e-7,
            "isolated": False,
            "message": f"{culprit} output differs",
        }
    return {
        "schema": "align.check/1",
        "case": case,
        "model": "ResNet",
        "phases": ["forward", "backward"],
        "precision": precision,
        "reference": "cpu",
        "target": "cpu",
        "emulate": "npu-fp32",
        "passed": culprit is None,
        "first_divergence": divergence,
        "culprits": [{**divergence, "isolated": True}] if divergence else [],
        "rows": rows,
        "train": {
            "steps": [
                {
                    "step": s,
                    "loss": {
                        "target": 2.3 - 0.1 * s,
                        "reference": 2.3 - 0.1 * s,
                        "golden": 2.3 - 0.1 * s,
                    },
                    "grad_norm": {"target": 1.0, "reference": 1.0, "golden": 1.0},
                }
                for s in range(5)
            ]
        },
        "environment": {"torch": "2.14.1", "allow_tf32": False},
        "timings": {"golden": 1.0, "reference": 0.5, "target": 0.5, "isolation": 0.2, "total": 2.2},
        "notes": ["synthetic result written by the tests"],
        "created": "2025-01-02T03:04:05+00:00",
    }


def run_result(
    case: str = "resnet50-full", *, top1: float = 76.1, passed: bool = True
) -> dict[str, Any]:
    """A full-run result with three epochs."""
    return {
        "schema": "align.run/1",
        "case": case,
        "device": "npu",
        "world_size": 8,
        "precision": "amp-fp16",
        "epochs": [
            {
                "epoch": e,
                "loss": 3.0 - e,
                "top1": top1 - 2 + e,
                "top5": 92.0,
                "lr": 0.1,
                "images_per_s": 2500.0,
            }
            for e in range(3)
        ],
        "images_per_s": 2500.0,
        "final": {"top1": top1, "top5": 92.9},
        "documented": {
            "metric": "top1",
            "value": 76.1,
            "source": "seed table",
            "conditions": "8 cards",
        },
        "verdict": {
            "passed": passed,
            "reason": "within 0.4 pp of the documented Top-1" if passed else "too low",
        },
        "environment": {"torch": "2.14.1"},
        "created": "2025-01-02T03:04:05+00:00",
    }


def write_result(directory: Path, name: str, data: dict[str, Any]) -> Path:
    """Write one result file (creating directories)."""
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def night_one(tmp_path: Path) -> Path:
    """resnet50 passes, vit fails in layer1.0.conv2, one full run passes."""
    directory = tmp_path / "night1"
    write_result(directory, "resnet50.json", check_result("resnet50"))
    write_result(directory, "nested/vit.json", check_result("vit", culprit="layer1.0.conv2"))
    write_result(directory, "runs/full.json", run_result())
    return directory


@pytest.fixture
def make_check():
    """The check_result factory (fixtures, not imports: works in every pytest import mode)."""
    return check_result


@pytest.fixture
def make_run():
    """The run_result factory."""
    return run_result


@pytest.fixture
def write():
    """The write_result helper."""
    return write_result
