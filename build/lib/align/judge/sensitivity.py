"""Which layers an emulated number format hurts most: their local error, emulated vs fp32."""

from __future__ import annotations

import dataclasses
from typing import Any

from align.judge.isolation import Isolator
from align.numerics import metrics
from align.record.capture import Run


def emulation_sensitivity(ref: Run, gold: Run, top: int = 20) -> list[dict[str, Any]]:
    """Leaf modules with parameters, by local rel_rmse under the emulation (worst first).

    Each is re-run alone on the reference's recorded inputs with the emulation, without
    it (plain fp32), and in float64; `ratio` says how much the format multiplies the
    layer's own error.
    """
    plain = dataclasses.replace(ref, emulation=None)
    iso = Isolator(ref, plain, gold, backward=False)
    modules = dict(ref.model.named_modules())
    out = []
    for pos, call in enumerate(ref.trace.calls):
        module = modules[call.module]
        if next(module.children(), None) is not None or not list(module.parameters(False)):
            continue
        emulated, fp32, golden = (iso.run(run, pos) for run in (ref, plain, gold))
        g = metrics.as_f64(golden.forward["output[0]"])
        e = metrics.errors(metrics.as_f64(emulated.forward["output[0]"]), g)["rel_rmse"]
        f = metrics.errors(metrics.as_f64(fp32.forward["output[0]"]), g)["rel_rmse"]
        out.append(
            {
                "module": call.label,
                "cls": call.cls,
                "emulated": e,
                "fp32": f,
                "ratio": e / f if f > 0 else float("inf"),
            }
        )
    return sorted(out, key=lambda s: s["emulated"], reverse=True)[:top]
