"""Opening a dump of any format as a Trace: one reader per format, tried in order.

To read another tool's dumps, add a `Reader` to READERS (a test that recognises the
directory, a function that opens it as a Trace with lazily read tensors).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from align.errors import TraceError
from align.record.msprobe import is_msprobe_dump, load_msprobe
from align.record.trace import MANIFEST, Trace, is_align_trace, read_trace

__all__ = ["READERS", "Reader", "load_trace"]


@dataclass(frozen=True)
class Reader:
    """One dump format: its name, a test on a directory, and how to open it."""

    name: str
    recognises: Callable[[str | os.PathLike], bool]
    read: Callable[[str | os.PathLike], Trace]


READERS: tuple[Reader, ...] = (
    Reader("align trace (Trace.save, align dump)", is_align_trace, read_trace),
    Reader("msprobe dump (dump.json + dump_tensor_data/)", is_msprobe_dump, load_msprobe),
)


def load_trace(directory: str | os.PathLike) -> Trace:
    """Open the dump in `directory` with the first reader that recognises it."""
    root = Path(directory)
    for reader in READERS:
        if reader.recognises(root):
            return reader.read(root)
    raise TraceError(
        f"{root}: no {MANIFEST} here; expected a directory written by "
        "align.capture(...).save(DIR) / python -m align.check --dump DIR, "
        "or an msprobe dump (dump.json + dump_tensor_data/)"
    )
