"""The verdict on real msprobe dumps: mindstudio-probe's own dumps of timm models (L1 or mix,
task tensor or statistics), compared by `align.compare` without a golden dump, as users
compare a GPU's and an NPU's.

    python bench/msprobe_catalogue.py --msprobe-python /path/to/venv/bin/python
    python bench/msprobe_catalogue.py --msprobe-python P --models resnet26d --level mix \
        --honest channels_last --faults conv_gain bn_backward_weight

mindstudio-probe cannot share align's environment (it pins its own packages): give the
python of an environment with torch, timm, mindstudio-probe and align installed
(`python -m venv V; V/bin/pip install torch timm mindstudio-probe -e .`; it runs on a CPU).
Each dump is one forward and backward of a model built as bench/verdict_catalogue.py
builds it (train mode, dropout on, batch 2 at 64 px), in its own process under msprobe's
PrecisionDebugger. Honest targets (verdict_catalogue.target_for: half-ulp, channels_last,
...) must pass. Faults are device kernels gone wrong below msprobe's API hooks
(`KERNEL_FAULTS`: one aten call changed by a dispatch mode, so the dump records a wrong
kernel and no extra API call) and must fail with the call's API as the first culprit (for
statistics, which name no culprit: as the first failing tensor); a fault whose dump
reproduces the reference bit for bit is counted as not effective.
Prints one line per check and the totals.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from verdict_catalogue import HONEST_KINDS, build, target_for, totals

# fault -> (aten op, which of its calls, how its result changes): 1% off one channel or one
# output, the scale of a wrong kernel the zoo's faults use
KERNEL_FAULTS = {
    "conv_gain": ("convolution", 12, "channel"),
    "conv_backward_input": ("convolution_backward", 12, "first"),
    "bn_gain": ("native_batch_norm", 12, "channel"),
    "bn_backward_weight": ("native_batch_norm_backward", 12, "second"),
    "linear_small": ("addmm", 1, "all"),  # 0.1%: a small gain on the classifier
}
# the API name msprobe gives each op's call
API_OF = {
    "convolution": "Functional.conv2d",
    "convolution_backward": "Functional.conv2d",
    "native_batch_norm": "Functional.batch_norm",
    "native_batch_norm_backward": "Functional.batch_norm",
    "addmm": "Functional.linear",
}


def _changed(out, how: str):
    """The kernel's result as the faulty kernel returns it."""
    if how == "all":
        return out * 1.001
    if how == "first":
        return (out[0] * 1.01, *out[1:])
    if how == "second":
        return (out[0], out[1] * 1.01, *out[2:])
    first = out[0] if isinstance(out, tuple) else out
    first = first.clone()
    first[:, first.shape[1] // 2] *= 1.01
    return (first, *out[1:]) if isinstance(out, tuple) else first


def _kernel_fault(kind: str):
    """A dispatch mode under which the chosen aten call computes wrong."""
    from torch.utils._python_dispatch import TorchDispatchMode

    op, nth, how = KERNEL_FAULTS[kind]

    class KernelFault(TorchDispatchMode):
        seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ == op:
                self.seen += 1
                if self.seen == nth:
                    out = _changed(out, how)
            return out

    return KernelFault()


def dump_run(name: str, kind: str, out: str, config: str) -> None:
    """One forward and backward of `name` as `kind` under msprobe (in msprobe's python)."""
    import torch
    from msprobe.pytorch import PrecisionDebugger

    torch.set_num_threads(1)
    model, x = build(name, 64)
    if kind in HONEST_KINDS:
        model = target_for(model, kind, None)
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(2))
    fault = _kernel_fault(kind) if kind in KERNEL_FAULTS else contextlib.nullcontext()
    debugger = PrecisionDebugger(config_path=config, dump_path=out)
    torch.manual_seed(0)  # the same dropout masks on every side
    debugger.start(model=model)
    with fault:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    debugger.stop()
    debugger.step()


def _dump(python: str, name: str, kind: str, out: Path, level: str, task: str) -> None:
    config = {
        "task": task,
        "dump_path": str(out),
        "rank": [],
        "step": [0],
        "level": level,
        task: {"scope": [], "list": [], "data_mode": ["all"]},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    cmd = [python, __file__, "--run", name, kind, str(out), f.name]
    done = subprocess.run(cmd, capture_output=True, text=True)
    Path(f.name).unlink()
    if done.returncode:
        raise SystemExit(f"dumping {name} {kind} failed:\n{done.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    import align

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--msprobe-python", required=True, help="a python with mindstudio-probe")
    p.add_argument("--models", nargs="+", default=["resnet26d", "mobilenetv3_small_050"])
    p.add_argument("--honest", nargs="*", default=["half_ulp", "channels_last", "one_pass_norm"])
    p.add_argument("--faults", nargs="*", default=list(KERNEL_FAULTS), choices=KERNEL_FAULTS)
    p.add_argument("--level", choices=("L1", "mix"), default="L1")
    p.add_argument("--task", choices=("tensor", "statistics"), default="tensor")
    p.add_argument("--json", default=None, help="write every check's outcome here")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="align-msprobe-catalogue-") as tmp:
        for name in args.models:
            ref = Path(tmp) / name / "ref"
            _dump(args.msprobe_python, name, "ref", ref, args.level, args.task)
            for kind in args.honest + args.faults:
                started, target = time.perf_counter(), Path(tmp) / name / kind
                _dump(args.msprobe_python, name, kind, target, args.level, args.task)
                report = align.compare(ref, target)
                site = API_OF[KERNEL_FAULTS[kind][0]] if kind in KERNEL_FAULTS else None
                first = report.culprits[0] if report.culprits else report.first_divergence
                # statistics name no culprit: what they name is the first failing tensor
                named = report.culprits or (args.task == "statistics" and first is not None)
                culprit = first.module if named else None
                entry = {
                    "model": name,
                    "precision": f"fp32 {args.level} {args.task}",
                    "target": kind,
                    "site": site,
                    "honest": site is None,
                    "effective": not any("bit for bit" in n for n in report.notes),
                    "passed": report.passed,
                    "culprit": culprit,
                    "exact": site is not None and (culprit or "").endswith(site),
                    "first": None if first is None else str(first),
                    "seconds": round(time.perf_counter() - started, 1),
                }
                results.append(entry)
                verdict = "pass" if report.passed else "FAIL"
                effective = "" if entry["effective"] else " (not effective: bit for bit)"
                print(f"{name:24s} {kind:22s} {verdict}  culprit={culprit}{effective}", flush=True)
                if first is not None:
                    print(f"    {str(first)[:300]}", flush=True)
                shutil.rmtree(target)
    print(totals(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        dump_run(*sys.argv[2:6])
    else:
        sys.exit(main())
