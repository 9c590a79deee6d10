"""Write the real msprobe fixtures of tests/record/test_msprobe_real.py (run with a python
that has torch and mindstudio-probe; no accelerator needed, msprobe dumps CPU runs).

    python tests/record/data/msprobe_real/make.py [OUT_DIR [VARIANT/DUMP ...]]

Each dump is one run of a tiny conv + BatchNorm + ReLU + linear net (batch 2, 1x8x8 input,
fixed seeds), 2 training steps (forward, backward, SGD step) under msprobe's
PrecisionDebugger, in its own process (PrecisionDebugger is a singleton). Variants:
`ref`; `fault`, whose BatchNorm weight is scaled by 1.01 before training (a bad weight);
`clean`, the same model on another conv kernel (mkldnn off, 1 thread: fp32 rounding only);
`golden`, the reference in float64 (align.compare --golden). The conv has no bias, as
before a BatchNorm in ResNets: its gradient would be exactly 0, pure rounding noise.
Tensor dumps keep to step 0, where the fault has not yet spread through an SGD step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

# dump name: (task, level, steps dumped)
DUMPS = {
    "tensor_mix": ("tensor", "mix", [0]),
    "tensor_L0": ("tensor", "L0", [0]),
    "tensor_L1": ("tensor", "L1", [0]),
    "statistics_mix": ("statistics", "mix", []),
    "statistics_L1": ("statistics", "L1", []),
}
# variant: the dumps written for it (fewer for clean and golden, to keep the fixture small)
VARIANTS = {
    "ref": tuple(DUMPS),
    "fault": tuple(DUMPS),
    "clean": ("tensor_mix", "statistics_mix"),
    "golden": ("tensor_mix",),
}


def run(variant: str, dump_path: str, config_path: str) -> None:
    """Two training steps of the tiny net under PrecisionDebugger (one dump)."""
    import torch
    from msprobe.pytorch import PrecisionDebugger
    from torch import nn

    if variant == "clean":
        torch.backends.mkldnn.enabled = False
        torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential()
    model.features = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU()
    )
    model.flat = nn.Flatten()
    model.head = nn.Linear(2 * 8 * 8, 3)
    with torch.no_grad():
        model.features[1].weight.uniform_(0.5, 1.5)
        if variant == "fault":
            model.features[1].weight.mul_(1.01)
    x, y = torch.randn(2, 1, 8, 8), torch.randn(2, 3)
    if variant == "golden":
        model, x, y = model.double(), x.double(), y.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    debugger = PrecisionDebugger(config_path=config_path, dump_path=dump_path)
    for _ in range(2):
        debugger.start(model=model)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        debugger.stop()
        debugger.step()


def main(out: Path, only: list[str]) -> None:
    """The dumps of VARIANTS (those named in `only` if any), under out/<variant>/<dump>."""
    for variant, names in VARIANTS.items():
        for name in names:
            if only and f"{variant}/{name}" not in only:
                continue
            task, level, steps = DUMPS[name]
            target = out / variant / name
            if target.exists():
                raise SystemExit(f"{target} exists: remove it first")
            config = {
                "task": task,
                "dump_path": str(target),
                "rank": [],
                "step": steps,
                "level": level,
                task: {"scope": [], "list": [], "data_mode": ["all"]},
            }
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(config, f)
            cmd = [sys.executable, __file__, "--run", variant, str(target), f.name]
            subprocess.run(cmd, check=True, capture_output=True)
            Path(f.name).unlink()
            print(f"wrote {target}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        run(*sys.argv[2:5])
    else:
        main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent, sys.argv[2:])
