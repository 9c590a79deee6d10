"""Cost of align's core on ResNet-50 (timm, random init, train mode), batch 4, 224 px, CPU.

    python bench/bench_core.py [--batch 4] [--size 224] [--check-batch N] [--threads N]
                               [--max-rss GB] [--profile]

Times one bare forward + backward (median of 3 after a warm-up) and, in the same process,
as ratios to it: align.capture with backward, a complete align.check fp32 (golden,
reference, target and isolation) with the CPU target emulating npu-fp32 and with no
emulation (a bit-identical target). Then saves reference, target and golden traces to a
temporary directory and times align.compare from disk in a fresh process: throughput in
GB/s of tensor bytes read, and the peak RSS of that process. Also the saved trace's size
against the raw bytes of its tensors. Prints a table with the targets alongside.

`--profile` runs the check and the compare under cProfile and prints where the time goes.
The machine's load average is printed too: on a shared machine every figure moves with it.
A watchdog ends the process (exit 3) when its RSS passes --max-rss, before the machine's
OOM killer picks a victim; `--check-batch` runs the checks at a smaller batch (their ratio
is then to a bare step at that batch).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import align
from align.record.capture import projection_loss
from align.record.readers import load_trace

GB = 1e9


def _model(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("resnet50", pretrained=False).train()


def _vm(field: str) -> int:
    """A field of /proc/self/status in bytes (VmHWM: peak RSS, VmRSS: current RSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    """Start a new peak-RSS (VmHWM) measurement (Linux: writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _watchdog(limit: float) -> None:
    """End this process when its RSS passes `limit` bytes: a clear failure, not an OOM kill."""

    def watch() -> None:
        while True:
            rss = _vm("VmRSS")
            if rss > limit:
                print(
                    f"\nbench: RSS {rss / GB:.1f} GB passed --max-rss {limit / GB:.1f} GB; "
                    "stopping (use a smaller --check-batch / --batch)",
                    flush=True,
                )
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def _median_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _profiled(fn, label: str, profile: bool):
    if not profile:
        return fn()
    prof = cProfile.Profile()
    result = prof.runcall(fn)
    print(f"\n--- cProfile: {label} (top 25 by cumulative time) ---")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
    print(f"--- cProfile: {label} (top 15 by own time) ---")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(15)
    return result


def _available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 * GB


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _raw_bytes(trace) -> int:
    return sum(trace.tensor(k).numel() * trace.tensor(k).element_size() for k in trace.keys())


def compare_worker(ref: str, tgt: str, gold: str, profile: bool) -> None:
    """In a fresh process: compare three dumps from disk; print JSON figures."""
    from align.record import trace as trace_mod

    read = {"bytes": 0, "tensors": 0}
    getitem = trace_mod._DiskTensors.__getitem__

    def counting(self, key):
        t = getitem(self, key)
        read["bytes"] += t.numel() * t.element_size()
        read["tensors"] += 1
        return t

    trace_mod._DiskTensors.__getitem__ = counting
    base_rss = _vm("VmRSS")
    anon_peak = [0]

    def sample() -> None:  # the heap's own peak (VmHWM also counts mapped shard pages)
        while True:
            anon_peak[0] = max(anon_peak[0], _vm("RssAnon"))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    report = _profiled(lambda: align.compare(ref, tgt, gold), "align.compare from disk", profile)
    seconds = time.perf_counter() - t0
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": seconds,
                "bytes_read": read["bytes"],
                "tensors_read": read["tensors"],
                "rows": len(report.rows),
                "passed": report.passed,
                "peak_rss": _vm("VmHWM"),
                "anon_peak": anon_peak[0],
                "rss_before": base_rss,
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument(
        "--check-batch",
        type=int,
        default=None,
        help="batch of the align.check runs (default: --batch)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--max-rss",
        type=float,
        default=None,
        help="GB of RSS at which the bench stops itself (default: 70%% of the "
        "memory available at start)",
    )
    p.add_argument("--profile", action="store_true", help="cProfile the check and the compare")
    p.add_argument("--skip-check", action="store_true", help="leave out the two align.check runs")
    p.add_argument(
        "--compare-worker", nargs=3, metavar=("REF", "TGT", "GOLD"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _watchdog(args.max_rss * GB if args.max_rss else 0.7 * _available())
    if args.compare_worker:
        compare_worker(*args.compare_worker, profile=args.profile)
        return 0

    load = os.getloadavg()
    print(
        f"ResNet-50 (timm, random init, train), batch {args.batch}, {args.size} px, CPU; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
        flush=True,
    )
    model = _model()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    loss_fn = projection_loss(0)

    def bare_step(batch_x: torch.Tensor):
        bare_model = copy.deepcopy(model)

        def step() -> None:
            bare_model.zero_grad(set_to_none=True)
            loss_fn(bare_model(batch_x), batch_x).backward()

        return step

    t_bare = _median_time(bare_step(x))
    print(f"bare forward+backward: {t_bare:.3f} s", flush=True)

    traces = []

    def capture() -> None:
        traces.clear()  # one trace alive at a time
        gc.collect()
        traces.append(align.capture(model, x, device="cpu"))

    base = _vm("VmRSS")
    _reset_peak()
    t_capture = _median_time(capture)
    capture_peak = _vm("VmHWM") - base
    trace = traces.pop()
    print(f"align.capture: {t_capture:.3f} s, peak RSS +{capture_peak / GB:.2f} GB", flush=True)

    with tempfile.TemporaryDirectory(prefix="align-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        trace.save(root / "ref")
        t_save = time.perf_counter() - t0
        raw = _raw_bytes(trace)
        per_record = sum(
            trace.tensor(k).numel() * trace.tensor(k).element_size()
            for c in trace.calls
            for slot in ("inputs", "outputs", "grad_outputs", "grad_inputs")
            for k in getattr(c, slot)
            if k is not None
        ) + sum(
            trace.tensor(k).numel() * trace.tensor(k).element_size()
            for k in trace.param_grads.values()
        )
        del trace
        gc.collect()

        checks = {}
        cb = args.check_batch or args.batch
        t_bare_check = t_bare
        if not args.skip_check:
            xc = x[:cb] if cb <= args.batch else torch.randn(cb, *x.shape[1:], generator=gen)
            if cb != args.batch:
                t_bare_check = _median_time(bare_step(xc))
                print(f"bare forward+backward at batch {cb}: {t_bare_check:.3f} s", flush=True)
            for emulate in ("npu-fp32", None):
                gc.collect()
                base = _vm("VmRSS")
                _reset_peak()
                t0 = time.perf_counter()
                report = _profiled(
                    lambda e=emulate: align.check(model, xc, target="cpu", emulate=e),
                    f"align.check emulate={emulate}",
                    args.profile,
                )
                seconds = time.perf_counter() - t0
                peak = _vm("VmHWM") - base
                timings = {k: round(v, 2) for k, v in report.meta["timings"].items()}
                checks[emulate] = (seconds, peak)
                print(
                    f"align.check emulate={emulate} batch {cb}: {seconds:.1f} s, peak RSS "
                    f"+{peak / GB:.2f} GB, passed={report.passed}, {len(report.rows)} rows, "
                    f"{len(report.local_rows)} isolated; {timings}",
                    flush=True,
                )
                del report

        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        cl_x = x.contiguous(memory_format=torch.channels_last)
        align.capture(cl_model, cl_x, device="cpu").save(root / "tgt")
        del cl_model
        gc.collect()
        align.capture(model, x, device="cpu", precision="fp64").save(root / "gold")
        gc.collect()
        on_disk = _dir_bytes(root / "ref")
        dumps = sum(_dir_bytes(root / n) for n in ("ref", "tgt", "gold"))
        print(
            f"saved: reference {on_disk / GB:.2f} GB in {t_save:.1f} s; three dumps "
            f"{dumps / GB:.2f} GB",
            flush=True,
        )
        cmd = [
            sys.executable,
            __file__,
            "--compare-worker",
            *(str(root / n) for n in ("ref", "tgt", "gold")),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.max_rss:
            cmd += ["--max-rss", str(args.max_rss)]
        if args.profile:
            cmd.append("--profile")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr)
            return 1
        lines = proc.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith("RESULT ")))
        result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
        # the loaded trace must describe the same tensors the in-memory one held
        assert _raw_bytes(load_trace(root / "ref")) == raw

    gbps = result["bytes_read"] / result["seconds"] / GB
    rows = [
        ("bare forward+backward", f"{t_bare:.2f} s", "1.00x", ""),
        ("align.capture (backward)", f"{t_capture:.2f} s", f"{t_capture / t_bare:.2f}x", "<= 1.3x"),
        ("  peak RSS of a capture", f"+{capture_peak / GB:.2f} GB", "", ""),
    ]
    if checks and cb != args.batch:
        rows.append((f"bare forward+backward, batch {cb}", f"{t_bare_check:.2f} s", "1.00x", ""))
    for emulate, (seconds, peak) in checks.items():
        rows.append(
            (
                f"align.check fp32 emulate={emulate}, batch {cb}",
                f"{seconds:.1f} s",
                f"{seconds / t_bare_check:.1f}x",
                "<= 6x",
            )
        )
        rows.append(("  peak RSS of the check", f"+{peak / GB:.2f} GB", "", ""))
    rows += [
        ("align.compare from disk", f"{result['seconds']:.2f} s", f"{gbps:.2f} GB/s", ">= 1 GB/s"),
        (
            "  tensor bytes read",
            f"{result['bytes_read'] / GB:.2f} GB",
            f"{result['tensors_read']} reads",
            "",
        ),
        (
            "  peak RSS of the compare process",
            f"{result['peak_rss'] / GB:.2f} GB",
            f"{result['rss_before'] / GB:.2f} GB before",
            "",
        ),
        (
            "  of which heap (peak RssAnon, sampled)",
            f"{result['anon_peak'] / GB:.2f} GB",
            "the rest: mapped shards",
            "",
        ),
        (
            "trace on disk / raw tensor bytes",
            f"{on_disk / GB:.3f} GB",
            f"{on_disk / raw:.4f}",
            "<= 1",
        ),
        (
            "  raw bytes, one copy per record",
            f"{per_record / GB:.3f} GB",
            f"{per_record / raw:.2f}x unique",
            "",
        ),
    ]
    head = ("step", "time / size", "ratio", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    print()
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
