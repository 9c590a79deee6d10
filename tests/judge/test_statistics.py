"""align.judge.statistics on statistics-only traces built here (real and written msprobe
dumps: tests/record/test_msprobe*.py)."""

from __future__ import annotations

import math

from align.judge.statistics import NO_SIGNAL, compare_statistics
from align.record.trace import Call, Trace


class _Stats(dict):
    """A trace's tensors as a statistics dump holds them: stats only."""

    @property
    def stats(self) -> dict:
        return self


def _stats(rms: float, numel: int, peak: float) -> dict:
    norm = rms * math.sqrt(numel)
    return {"dtype": "torch.float32", "shape": [numel], "Max": peak, "Min": -peak,
            "Mean": 0.0, "Norm": norm}  # fmt: skip


def _trace(bias_grad: dict) -> Trace:
    """One batch_norm call: its output gradient in (1024 elements of RMS 1e-3), its bias
    gradient out (8 channels)."""
    call = Call("Functional.batch_norm", 0, "api", None, outputs=["y"])
    call.grad_outputs, call.grad_inputs = ["dy"], ["db"]
    tensors = _Stats(y=_stats(1.0, 1024, 3.0), dy=_stats(1e-3, 1024, 3e-3), db=bias_grad)
    return Trace([call], tensors, backward_order=[0])


def test_an_input_gradient_that_sums_only_rounding_is_not_judged_on_its_statistics():
    """A bias gradient that is 0 in exact arithmetic holds the rounding of the 128
    gradient elements each channel sums: statistics of noise, 2x apart on two honest
    devices. Within what that rounding adds up to (2.5e-4 of their RMS, times sqrt(128)) it
    is reported as carrying no signal; one far above it on the target still fails, and so
    does one of real size that differs by 1%."""
    noise = 2.5e-4 * 1e-3 * math.sqrt(128)
    ref, honest = _trace(_stats(0.2 * noise, 8, 4e-8)), _trace(_stats(0.1 * noise, 8, 2e-8))
    row = compare_statistics(ref, honest, phases=("backward",)).rows[-1]
    assert row.passed and row.message == NO_SIGNAL, row
    wrong = _trace(_stats(100 * noise, 8, 1e-5))
    assert compare_statistics(ref, wrong, phases=("backward",)).rows[-1].failed
    real, off = _trace(_stats(1e-2, 8, 3e-2)), _trace(_stats(1.01e-2, 8, 3.03e-2))
    assert compare_statistics(real, off, phases=("backward",)).rows[-1].failed
