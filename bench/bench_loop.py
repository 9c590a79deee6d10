"""Cost of align.Recorder in a training loop: timm ResNet-18, SGD with momentum, CPU.

    python bench/bench_loop.py [--batch 4] [--size 64] [--repeat 5] [--threads 1]
                               [--steps-in-memory 1]

Times the median training step (forward, loss, backward, optimizer step, zero_grad)
bare and, alternating with it, with a Recorder present but the step not in its `steps`
(goal: under 2% more). Then recorded steps, --repeat times each way:

* alone: a recorded step as the loop sees it (what blocks it: goal 1.3x the bare step),
  then until its write is complete (`rec.flush()`); the time in the step (hooks, copies,
  decisions: step.json's `seconds`) and the write after it;
* the two plain steps after a recorded one, run while the writer writes it: the share of
  the write's CPU (and GIL) time that lands on the loop when no core is free for it;
* back to back: recorded steps in a row, the writer busy with the one before (the loop
  waits at a step's start for room: --steps-in-memory), then the flush of the last;
* synchronous (`background=False`): the step and its write, as before the writer thread.

The floor: one copy of the step's bytes into memory allocated before (`copy_`).
Then, each in a fresh process, the peak RSS of 4 training steps recording none, 1 and
all 4 of them: memory is bounded by one step when recording 4 costs what recording 1
does. Each ratio is the median of a figure over the bare step timed just before it, so a
load that changes between phases moves both; the machine's load average is printed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
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


def _collect(out: Path, n: int) -> float:
    """Seconds written step `n` spent recording (hooks, copies, decisions: its step.json);
    the step is deleted, so the page cache's dirty pages do not pile up and throttle writes."""
    step = out / "rank0" / f"step{n:06d}"
    seconds = json.loads((step / "step.json").read_text())["seconds"]
    shutil.rmtree(step)
    return seconds


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def times(args: argparse.Namespace) -> tuple[dict[str, tuple[float, float]], float]:
    """Each figure's median seconds and median ratio to a bare step run next to it (the
    load moves both alike), and the MB a step writes.

    Unrecorded steps alternate with bare ones (4x --repeat pairs); each recorded step, or
    row of them, follows a bare step of its own.
    """
    model, opt, x, y = _setup(args.batch, args.size)
    r, held = args.repeat, args.steps_in_memory
    alone, overlap, in_row = range(1, r + 1), range(r + 1, 2 * r + 1), range(2 * r + 1, 3 * r + 1)
    figures: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)

    def bare() -> float:
        return _timed(None, 0, model, opt, x, y)

    def add(key: str, seconds: float, next_to: float) -> None:
        figures[key].append((seconds, seconds / next_to))

    with tempfile.TemporaryDirectory() as tmp:
        out, sync_out = Path(tmp) / "background", Path(tmp) / "sync"
        rec = align.Recorder(
            model, out, steps=range(1, 3 * r + 2), optimizer=opt, steps_in_memory=held
        )
        sync = align.Recorder(
            model, sync_out, steps=range(1, r + 2), optimizer=opt, background=False
        )
        bare()  # warm-up
        _timed(rec, 3 * r + 1, model, opt, x, y)  # warm-up of the recording path (its last)
        warm_up = out / "rank0" / f"step{3 * r + 1:06d}"
        dump = sum(f.stat().st_size for f in warm_up.rglob("*") if f.is_file())
        _collect(out, 3 * r + 1)
        for _ in range(4 * r):
            b = bare()
            add("bare", b, b)
            add("idle", _timed(rec, 0, model, opt, x, y), b)
        started = time.perf_counter()
        for _ in range(1000):
            with rec.step(0):
                pass
        add("context", (time.perf_counter() - started) / 1000, b)
        for n in alone:
            b = bare()
            started = time.perf_counter()
            add("blocked", _timed(rec, n, model, opt, x, y), b)
            rec.flush()
            add("written", time.perf_counter() - started, b)
            add("inside", _collect(out, n), b)
        for n in overlap:
            b = bare()
            _timed(rec, n, model, opt, x, y)
            for _ in range(2):
                add("during", bare(), b)
            rec.flush()
            _collect(out, n)
        b = bare()
        for n in in_row:
            add("row", _timed(rec, n, model, opt, x, y), b)
        started = time.perf_counter()
        rec.flush()
        add("last_flush", time.perf_counter() - started, b)
        for n in in_row:
            _collect(out, n)
        for n in range(1, r + 1):
            b = bare()
            add("sync", _timed(sync, n, model, opt, x, y), b)
            add("sync_inside", _collect(sync_out, n), b)
        rec.close()
        sync.close()
    median = statistics.median
    return {
        key: (median(s for s, _ in pairs), median(q for _, q in pairs))
        for key, pairs in figures.items()
    }, dump / MB


def copy_seconds(mb: float) -> float:
    """Median seconds to copy `mb` MB into memory allocated before, at this thread count:
    what any recorder that keeps a step's tensors pays, hooks or not."""
    source = torch.ones(int(mb * MB) // 4)
    into = torch.empty_like(source)
    seconds = []
    for _ in range(5):
        started = time.perf_counter()
        into.copy_(source)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def peak(args: argparse.Namespace) -> int:
    """Peak RSS of 4 training steps recording the first `args.record` of them."""
    model, opt, x, y = _setup(args.batch, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        rec = None
        if args.record:
            rec = align.Recorder(
                model, tmp, steps=range(args.record), steps_in_memory=args.steps_in_memory
            )
        for n in range(4):
            _timed(rec, n, model, opt, x, y)
    return _peak_rss()


def _child_peak(args: argparse.Namespace, record: int) -> int:
    command = [sys.executable, __file__, "--peak", "--record", str(record)]
    command += ["--batch", str(args.batch), "--size", str(args.size)]
    command += ["--threads", str(args.threads), "--steps-in-memory", str(args.steps_in_memory)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--steps-in-memory", type=int, default=1, help="Recorder(steps_in_memory=...) (default 1)"
    )
    p.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)  # child process
    p.add_argument("--record", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak:
        print(peak(args))
        return
    t, dump_mb = times(args)
    copying = copy_seconds(dump_mb)
    peaks = {n: _child_peak(args, n) for n in (0, 1, 4)}
    print(
        f"ResNet-18 batch {args.batch} {args.size}px, SGD momentum, {args.threads} thread(s), "
        f"steps_in_memory={args.steps_in_memory}, load average {os.getloadavg()[0]:.1f}"
    )

    def ms(key: str) -> str:
        return f"{t[key][0] * 1e3:8.1f} ms  {t[key][1]:5.2f}x"

    print(f"  bare training step          {t['bare'][0] * 1e3:8.1f} ms")
    print(
        f"  recorder, step not recorded {t['idle'][0] * 1e3:8.1f} ms  {t['idle'][1]:.3f}x  "
        "(goal < 1.02x); rec.step() itself: "
        f"{t['context'][0] * 1e6:.1f} us ({t['context'][1]:.1e} of the step)"
    )
    print(
        f"  recorded step, alone        {ms('blocked')}  (goal 1.3x) what blocks the loop: "
        f"{t['inside'][0] * 1e3:.1f} ms ({t['inside'][1]:.2f}x) recording in the step"
    )
    print(
        f"    of which copying {dump_mb:.0f} MB once at least {copying * 1e3:.1f} ms "
        f"({1 + copying / t['bare'][0]:.2f}x: the floor of keeping a step's tensors)"
    )
    print(
        f"    until written (flush)     {ms('written')}  the write of {dump_mb:.1f} MB: "
        f"{(t['written'][0] - t['blocked'][0]) * 1e3:.1f} ms after the step"
    )
    print(f"  the next steps, while written {ms('during')}  (the writer's CPU and GIL time)")
    print(
        f"  recorded steps back to back {ms('row')}  each, the writer busy; then "
        f"{t['last_flush'][0] * 1e3:.1f} ms until the last is written"
    )
    print(
        f"  recorded step, synchronous  {ms('sync')}  (background=False): "
        f"{t['sync_inside'][0] * 1e3:.1f} ms in the step, "
        f"{(t['sync'][0] - t['sync_inside'][0]) * 1e3:.1f} ms writing"
    )
    print(
        f"  peak RSS of 4 steps: {peaks[0] / MB:.0f} MB recording none, "
        f"+{(peaks[1] - peaks[0]) / MB:.0f} MB recording 1, "
        f"+{(peaks[4] - peaks[0]) / MB:.0f} MB recording all 4 "
        f"({(peaks[4] - peaks[0]) / max(peaks[1] - peaks[0], 1):.2f}x)"
    )


if __name__ == "__main__":
    main()
