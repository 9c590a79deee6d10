"""result.json of full runs: build it, write it atomically, read it back, print a summary."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from align.errors import AlignError
from align.files import write_json_atomic
from align.report.results import load_result
from align.train.options import RunOptions
from align.train.verdict import Verdict
from align.zoo import Figure

SCHEMA = "align.run/1"


def documented_figure(case: str, figures: tuple[Figure, ...]) -> Figure:
    """The figure a full run confirms: Top-1, else box AP, else mask AP."""
    by_metric = {f.metric: f for f in figures}
    for metric in ("top1", "box_ap", "mask_ap"):
        if metric in by_metric:
            return by_metric[metric]
    raise AlignError(
        f"case {case!r} documents no Top-1 or AP (align/zoo/golden_files/{case}.toml): "
        "nothing to confirm"
    )


def build(opts: RunOptions, report: dict[str, Any], figure: Figure, verdict: Verdict) -> dict:
    """The result of one run: what ran, where, how it went, and the verdict."""
    epochs = report["epochs"]
    images = sum(e["images"] for e in epochs)
    seconds = sum(e["seconds"] for e in epochs)
    return {
        "schema": SCHEMA,
        "kind": "run",
        "case": opts.case,
        "recipe": dataclasses.asdict(opts.recipe),
        "deviations": opts.deviations(),
        "seed": opts.seed,
        "device": opts.device,
        "backend": opts.backend,
        "world_size": opts.world_size,
        "nnodes": opts.nnodes,
        "precision": opts.recipe.precision,
        "precision_note": report["precision_note"],
        "environment": report["environment"],
        "epochs": [{k: e[k] for k in _EPOCH_KEYS if k in e} for e in epochs],
        # Global training images per second over the epochs this process ran, as the
        # seeds' FPS columns count them (validation excluded).
        "images_per_s": images / seconds if seconds else None,
        "final": report["final"],
        "n_val": report["n_val"],
        "documented": dataclasses.asdict(figure),
        "verdict": verdict.to_dict(),
        "resumed_from": report["resumed_from"],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


_EPOCH_KEYS = (
    "epoch",
    "loss",
    "top1",
    "top5",
    "box_ap",
    "box_ap50",
    "lr",
    "images_per_s",
    "seconds",
)


def write(path: Path, result: dict[str, Any]) -> None:
    """Write `result` as JSON at `path` atomically."""
    write_json_atomic(path, result, indent=2)


def read(path: Path) -> dict[str, Any]:
    """A run result as align.report validates it, with the figures a verdict needs; else
    AlignError naming the file."""
    loaded = load_result(Path(path))
    data = loaded.data
    if loaded.kind != "run" or data.get("kind") != "run":
        raise AlignError(f"{path} is not a result of python -m align.run ({SCHEMA}, kind run)")
    (run,) = loaded.outcomes
    if data["documented"].get("metric") != run.metric or run.value is None or run.limit is None:
        raise AlignError(
            f"{path}: needs the documented figure (documented.metric and a finite "
            "documented.value) and that metric in final as a finite number"
        )
    if data["n_val"] < 1:
        raise AlignError(f"{path}: n_val (the number of validation images) must be positive")
    return data


def summary(result: dict[str, Any]) -> str:
    """A readable account of one run for the terminal."""
    verdict, final = result["verdict"], result["final"]
    lines = [
        f"{result['case']}: {result['world_size']} x {result['device']} ({result['backend']}), "
        f"{result['precision']}, {len(result['epochs'])} epochs recorded"
        + (f", resumed from epoch {result['resumed_from']}" if result["resumed_from"] else ""),
        "  final: "
        + "  ".join(f"{k} {v:.2f}" for k, v in final.items())
        + f"  (val {result['n_val']} images)",
    ]
    if result["images_per_s"]:
        lines.append(f"  training throughput: {result['images_per_s']:.1f} images/s")
    doc = result["documented"]
    lines.append(f"  documented: {doc['metric']} {doc['value']:.2f} ({doc['source']})")
    if result["deviations"]:
        lines.append("  differs from the documented run: " + "; ".join(result["deviations"]))
    if result["precision_note"]:
        lines.append(f"  precision: {result['precision_note']}")
    lines.append(f"  {'PASS' if verdict['passed'] else 'FAIL'}: {verdict['reason']}")
    return "\n".join(lines)
