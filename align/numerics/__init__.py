"""Numerics: what an error is, how large an honest one may be, and the verdict.

Nothing here runs a model; everything else builds on it.

Index:
    names.py       the shared vocabulary (precisions, aliases, phases, default k), torch-free
    precision.py   precision policies (cast, autocast), unit roundoff, error floors,
                   documented kernel accuracy per op
    metrics.py     error metrics of a tensor against the float64 golden
    verdict.py     Tolerance, Row, Divergence and `judge`: target error vs the reference's
    jitter.py      honest draws: the reference re-run with every rounding nudged
    decisions.py   discrete choices (indices, branches, random draws) recorded and replayed
    emulate.py     a CPU emulating a device's number formats (HF32, TF32, bf16 rounding)
    trees.py       pytree flattening that opens a user's dataclass instances into fields
"""
