"""Cost of align.Recorder in a training loop: timm ResNet-18, SGD with momentum, CPU.

    python bench/bench_loop.py [--batch 4] [--size 64] [--repeat 5] [--threads 1]

Times the median training step (forward, loss, backward, optimizer step, zero_grad)
bare and, alternating with it, with a Recorder present but the step not in its `steps`
(goal: under 2% more); then --repeat recorded steps, including writing each to disk
(goal: 1.3x the bare step), split into the time in the step (hooks, copies, decisions)
and the write. Then, each in a fresh process, the peak RSS of 4 training steps recording
none, 1 and all 4 of them: memory is bounded by one step when recording 4 costs what
recording 1 does. The machine's load average is printed: on a shared machine every
figure moves with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import align

MB = 1 << 20


def _setup(batch: int, size: int):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    return model, opt, x, y


def _step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def _timed(rec: align.Recorder | None, n: int, model, opt, x, y) -> float:
    started = time.perf_counter()
    if rec is None:
        _step(model, opt, x, y)
    else:
        with rec.step(n):
            _step(model, opt, x, y)
    return time.perf_counter() - started


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def times(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of a bare, an unrecorded and a recorded step, and the recorded split.

    Unrecorded steps alternate with bare ones (4x --repeat pairs), so the load moves both
    alike; recorded steps follow (a step after a write runs slower: caches, writeback),
    and are divided by the same bare median.
    """
    model, opt, x, y = _setup(args.batch, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        recorded = range(1, args.repeat + 2)  # step 0 is never recorded
        rec = align.Recorder(model, tmp, steps=recorded, optimizer=opt)
        _timed(None, 0, model, opt, x, y)  # warm-up
        _timed(rec, recorded[-1], model, opt, x, y)  # warm-up of the recording path
        bare, idle = [], []
        for _ in range(4 * args.repeat):
            bare.append(_timed(None, 0, model, opt, x, y))
            idle.append(_timed(rec, 0, model, opt, x, y))
        started = time.perf_counter()
        for _ in range(1000):
            with rec.step(0):
                pass
        context = (time.perf_counter() - started) / 1000
        busy, inside = [], []
        for n in recorded[:-1]:
            busy.append(_timed(rec, n, model, opt, x, y))
            info = json.loads((Path(tmp) / "rank0" / f"step{n:06d}" / "step.json").read_text())
            inside.append(info["seconds"])
        dump = sum(f.stat().st_size for f in (Path(tmp) / "rank0" / "step000001").rglob("*"))
    return {
        "bare": statistics.median(bare),
        "idle": statistics.median(idle),
        "busy": statistics.median(busy),
        "inside": statistics.median(inside),
        "context": context,
        "dump_mb": dump / MB,
    }


def peak(args: argparse.Namespace) -> int:
    """Peak RSS of 4 training steps recording the first `args.record` of them."""
    model, opt, x, y = _setup(args.batch, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        rec = align.Recorder(model, tmp, steps=range(args.record)) if args.record else None
        for n in range(4):
            _timed(rec, n, model, opt, x, y)
    return _peak_rss()


def _child_peak(args: argparse.Namespace, record: int) -> int:
    command = [sys.executable, __file__, "--peak", "--record", str(record)]
    command += ["--batch", str(args.batch), "--size", str(args.size)]
    command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)  # child process
    p.add_argument("--record", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak:
        print(peak(args))
        return
    t = times(args)
    peaks = {n: _child_peak(args, n) for n in (0, 1, 4)}
    print(
        f"ResNet-18 batch {args.batch} {args.size}px, SGD momentum, {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  bare training step          {t['bare'] * 1e3:8.1f} ms")
    print(
        f"  recorder, step not recorded {t['idle'] * 1e3:8.1f} ms  "
        f"{t['idle'] / t['bare']:.3f}x  (goal < 1.02x); rec.step() itself: "
        f"{t['context'] * 1e6:.1f} us ({t['context'] / t['bare']:.1e} of the step)"
    )
    print(
        f"  recorded step               {t['busy'] * 1e3:8.1f} ms  "
        f"{t['busy'] / t['bare']:.2f}x  (goal 1.3x): {t['inside'] * 1e3:.1f} ms in the step "
        f"({t['inside'] / t['bare']:.2f}x), {(t['busy'] - t['inside']) * 1e3:.1f} ms writing "
        f"{t['dump_mb']:.1f} MB"
    )
    print(
        f"  peak RSS of 4 steps: {peaks[0] / MB:.0f} MB recording none, "
        f"+{(peaks[1] - peaks[0]) / MB:.0f} MB recording 1, "
        f"+{(peaks[4] - peaks[0]) / MB:.0f} MB recording all 4"
    )


if __name__ == "__main__":
    main()
