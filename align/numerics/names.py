"""The vocabulary every layer shares, in one place and without torch (the pytest plugin
and the command-line parsers read it before anything heavy is imported).

Precisions a check runs at (fp64 is internal: the golden run's), their aliases, the
phases of a check and the tolerance multiplier k each precision allows by default.
"""

from __future__ import annotations

from collections.abc import Iterable

from align.errors import AlignError

__all__ = [
    "ALIASES",
    "BUFFER",
    "DEFAULT_K",
    "DEFAULT_TOLERANCE",
    "PHASES",
    "PRECISIONS",
    "call_label",
    "judged_locally",
    "canonical_precision",
    "parse_phases",
]

PRECISIONS = ("fp32", "amp-fp16", "amp-bf16", "o2-fp16")  # what a check runs at
GOLDEN_PRECISION = "fp64"  # the golden run's; never asked for
ALIASES = {"o1": "amp-fp16", "o2": "o2-fp16", "amp": "amp-fp16", "bf16": "amp-bf16"}
PHASES = ("forward", "backward", "train")  # of align.check; "train" is a short training
BUFFER = "buffer "  # names the row of a buffer a module call wrote: "buffer running_var"
# Running variances are means of squares: what they cancel (each value less the mean) the
# call's normalized output cancels too, and that is judged as its own call's rounding. A
# running mean is a raw sum, which may cancel to ~0 (rexnet_100's first expansion
# BatchNorm in fp32: 5% off on the reference), so it is judged as a propagated tensor is.
LOCAL_BUFFERS = {"running_var"}


def judged_locally(label: str) -> bool:
    """Whether an isolated row `label` ("output[0]", "buffer running_mean") is judged as
    its own call's rounding (every metric, per-slice gains) or as a propagated error."""
    return not label.startswith(BUFFER) or label[len(BUFFER) :] in LOCAL_BUFFERS


# err(target) <= k * err(reference) + floor * dtype floor. k about 2 for fp32 and 3 for
# fp16/bf16: the multipliers of PyTorch dynamo's accuracy check (torch/_dynamo/utils.py,
# `same(..., multiplier=2.0)`, raised to 3 for low precision); floor is in units of the
# dtype's own floor (align.numerics.precision.ERROR_FLOOR).
DEFAULT_K = {"fp32": 2.0, "amp-fp16": 3.0, "amp-bf16": 3.0, "o2-fp16": 3.0, "fp64": 2.0}
DEFAULT_TOLERANCE = {p: {"k": DEFAULT_K[p], "floor": 1.0} for p in PRECISIONS}


def canonical_precision(name: str, *, golden: bool = False) -> str:
    """The canonical name of precision `name` (case-insensitive, aliases O1, O2, amp, bf16);
    AlignError naming the known ones otherwise. fp64 only when `golden`."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key in PRECISIONS or (golden and key == GOLDEN_PRECISION):
        return key
    known = ", ".join([*PRECISIONS, "O1", "O2", "bf16"])
    extra = ""
    if key == GOLDEN_PRECISION:
        extra = " (fp64 is no precision to check at: the golden run is always float64)"
    raise AlignError(f"unknown precision {name!r}: use one of {known}{extra}")


def parse_phases(phases: str | Iterable[str]) -> tuple[str, ...]:
    """Phases from a comma list or an iterable, checked against PHASES."""
    if isinstance(phases, str):
        phases = [p for p in phases.split(",") if p]
    phases = tuple(phases)
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise AlignError(f"unknown phase(s) {unknown or phases}: choose from {', '.join(PHASES)}")
    return phases


def call_label(module: str, call: int = 0) -> str:
    """A module call as reports name it: `layer1.conv`, `layer1.conv#2` (its third call),
    `<model>` (the whole network)."""
    return (module or "<model>") + (f"#{call}" if call else "")
