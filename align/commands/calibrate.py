"""Calibrate a case's tolerances from measured noise: `python -m align.golden calibrate CASE`.

The reference is checked against honest targets that differ the way devices do (the CPU
emulating npu-fp32 with ATen's native kernels; the same model in channels_last, weights
and image batches, which sends convolutions down another kernel with another summation
order), on several
input seeds; for every tensor we take the smallest k it would have passed with
(`Row.needed_k`), and propose k = max(default, 1.5 x the worst seen). The verdict's odd
honest draws run in the other memory format too (align.record.capture.honest_draw), so
the channels_last target measures what that layout's kernels add beyond the draws
(~1 where the draws cover it; before they did, hrnet_w18 needed 2.98 and
ssdlite_mobilenetv2 6.49 at fp32). The golden file's
tolerance tables are rewritten with the measurement in comments, so a loosened tolerance
is a visible, explained diff.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import platform
import re
from pathlib import Path

from align.api import check
from align.commands.arguments import precisions
from align.commands.command import Command
from align.commands.summaries import SUMMARIES
from align.errors import AlignError, ExitCode
from align.numerics.names import DEFAULT_TOLERANCE
from align.zoo import get_case
from align.zoo.golden import load_golden
from align.zoo.models import resolve_model

MARGIN = 1.5
JUMP = 10.0  # x the default k: beyond it a tensor's error is a jump, not noise (see _split)
SEEDS = (0, 1, 2)
TARGETS = ("emulated npu-fp32, native kernels", "channels_last")

log = logging.getLogger(__name__)


def _target(label: str, case: str, seed: int) -> dict:
    """align.check arguments that make the honest target called `label`."""
    if label == TARGETS[0]:
        return {"emulate": "npu-fp32"}
    import torch

    model = resolve_model(case, None, None, seed).model  # the same weights as the check's
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_channels_last_inputs)
    return {"target_model": model}


def _channels_last_inputs(module, args: tuple) -> tuple:
    """Image batches in channels_last too: oneDNN picks the kernel by the input's layout."""
    import torch

    return tuple(
        a.contiguous(memory_format=torch.channels_last)
        if isinstance(a, torch.Tensor) and a.dim() == 4
        else a
        for a in args
    )


def measure(case: str, precision: str, seeds=SEEDS) -> tuple[dict[str, float | None], list[str]]:
    """Worst needed k over whole-network and isolated tensors, per honest target (None
    where it reproduced the reference bit for bit: no measurement); and the jumps left
    out of it (tensors needing over JUMP x the default k, see `_split`)."""
    worst: dict[str, float | None] = {}
    jumps: list[str] = []
    for label in TARGETS:
        for seed in seeds:
            log.info("calibrating %s %s: %s, seed %d", case, precision, label, seed)
            report = check(
                case,
                target="cpu",
                precision=precision,
                seed=seed,
                tolerance={"k": 1.0},
                **_target(label, case, seed),
            )
            run = f"{label}, seed {seed}"
            if not report.rows and not report.local_rows:
                worst[run] = None  # bit for bit: this target measures nothing here
                continue
            worst[run], jump = _split(report.rows, report.local_rows, precision)
            jumps += [f"{run}: {jump}"] if jump else []
    if all(w is None for w in worst.values()):
        raise AlignError(
            f"{case} {precision}: every honest target reproduced the reference bit for bit "
            f"on this machine, so there is no noise to calibrate from; calibrate on a "
            f"machine whose {precision} kernels differ (e.g. with a GPU or NPU target)"
        )
    return worst, jumps


def _split(rows: list, local_rows: list, precision: str) -> tuple[float, str]:
    """(worst needed k among noise-like tensors, a description of the jump if any).

    A tensor needing more than JUMP x the default k is not noise: an honest target took
    another branch of a discontinuous op (a ReLU input or a max-pool tie on the other side
    of zero), and every later tensor of the whole network inherits it. No k is right for
    that: the jump and what follows it are reported, not averaged into the tolerance.
    """
    limit = JUMP * DEFAULT_TOLERANCE[precision]["k"]
    whole = [r for r in rows if math.isfinite(r.needed_k)]
    cut = next((n for n, r in enumerate(whole) if r.needed_k > limit), len(whole))
    kept = whole[:cut] + [r for r in local_rows if r.needed_k <= limit]
    noise = max((r.needed_k for r in kept), default=0.0)
    jumped = [r for r in local_rows if r.needed_k > limit] + whole[cut : cut + 1]
    if not jumped:
        return noise, ""
    first = jumped[0]
    where = "isolated" if first.isolated else "whole network"
    return noise, (
        f"{first.module} {first.phase} {first.tensor} ({where}) needs k {first.needed_k:.3g}; "
        f"{len(whole) - cut} whole-network tensors from there on left out"
    )


def proposal(precision: str, worst: dict[str, float | None]) -> float:
    """k to write: the default, or 1.5 x the worst measured if that is larger (halves)."""
    default = DEFAULT_TOLERANCE[precision]["k"]
    measured = max((w for w in worst.values() if w is not None), default=0.0)
    return max(default, math.ceil(MARGIN * measured * 2) / 2)


def render(precision: str, k: float, worst: dict[str, float | None], jumps: list[str] = ()) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        f"[tolerance.{precision}]",
        f"# calibrated {today} on {platform.machine()} ({platform.processor() or 'cpu'}): "
        "smallest k each honest target needed",
    ]
    lines += [
        f"#   {label}: " + ("bit for bit, no measurement" if need is None else f"{need:.3g}")
        for label, need in worst.items()
    ]
    if jumps:
        lines += [
            f"# left out as jumps, not noise (over {JUMP:g}x the default k: an honest target "
            "took another branch of a discontinuous op, e.g. a ReLU input across zero):"
        ]
        lines += [f"#   {jump}" for jump in jumps]
    default = DEFAULT_TOLERANCE[precision]["k"]
    why = (
        "the default (measured noise stays below it)"
        if k == default
        else (f"{MARGIN} x the worst measured, above the default {default}")
    )
    lines += [f"k = {k:g}      # {why}", "floor = 1.0  # 1x the dtype floor", "", ""]
    return "\n".join(lines)


UNCALIBRATED = (
    "Not yet calibrated from measured noise on this model: the\n# values are align's "
    "defaults; a calibration replaces them here, in a reviewed diff,\n# with the "
    "measurement it came from."
)
CALIBRATED = (
    "Tables with a '# calibrated' note come from\n# `python -m align.golden calibrate "
    "CASE` (the measurement is in the note); the\n# others are align's defaults."
)


def rewrite(path: Path, precision: str, block: str) -> None:
    """Replace the `[tolerance.<precision>]` table (and its comments) in the TOML text."""
    text = path.read_text().replace(UNCALIBRATED, CALIBRATED)
    pattern = re.compile(rf"^\[tolerance\.{re.escape(precision)}\]\n(?:(?!\[).*\n?)*", re.MULTILINE)
    new = (
        pattern.sub(block, text, count=1)
        if pattern.search(text)
        else (text.rstrip("\n") + "\n\n" + block)
    )
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(new)
    tmp.replace(path)


def calibrate(case: str, precisions: list[str], write: bool = True) -> dict[str, float]:
    """Measure, propose and (optionally) write k per precision for `case`."""
    golden = load_golden(case)
    out = {}
    for precision in precisions:
        worst, jumps = measure(case, precision)
        k = proposal(precision, worst)
        out[precision] = k
        block = render(precision, k, worst, jumps)
        print(block)
        if write:
            rewrite(golden.path, precision, block)
    load_golden(case)  # the rewritten file must still parse
    return out


def _arguments(parser: argparse.ArgumentParser) -> None:
    """The options of align calibrate."""
    parser.add_argument("case", help="a registered case (align list)")
    parser.add_argument(
        "--precision",
        type=precisions,
        default="fp32,amp-bf16",
        help="comma-separated: fp32, amp-fp16, amp-bf16, o2-fp16 (aliases O1, O2, bf16)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print, do not write the file")


def _calibrate(args: argparse.Namespace) -> int:

    get_case(args.case)  # an unknown case is refused before minutes of work
    calibrate(args.case, args.precision, write=not args.dry_run)
    return ExitCode.PASSED


CALIBRATE = Command(
    "calibrate",
    SUMMARIES["calibrate"],
    _arguments,
    _calibrate,
    examples=("resnet50 --precision fp32,bf16 --dry-run",),
    details="Checks the reference against honest targets (emulated npu-fp32, channels_last) "
    f"on {len(SEEDS)} seeds and proposes k = max(default, {MARGIN} x the worst k needed); "
    "the golden file's tables are rewritten with the measurement in comments. Minutes per "
    "precision.",
)
