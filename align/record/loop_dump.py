"""An align.Recorder dump on disk (align.record.loop writes it): its layout, and reading it
back rank by rank and step by step (align.judge.steps compares two).

    DIR/rank{N}/loop.json                   what rank N recorded, where (RUN_FILE)
    DIR/rank{N}/step{n:06d}/step.json       the step's scalars and its state's index
    DIR/rank{N}/step{n:06d}/state.safetensors   loss, parameters, optimizer state
    DIR/rank{N}/step{n:06d}/trace/          the step's module trace (align.record.trace)
    DIR/draws/{d}/rank{N}/...               honest draw d of the reference DIR

A step directory appears complete or not at all (written through a rename); a truncated
or inconsistent file is a TraceError that says to record again.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from align.errors import TraceError
from align.files import read_json
from align.record.trace import Trace, read_trace
from align.record.writer import wait_for_writes

FORMAT = "align.loop/1"
RUN_FILE = "loop.json"  # per rank: what was recorded, where
DRAWS_DIR = "draws"  # DIR/draws/<n>/: honest draws of the reference DIR
DRAW_ENV = "ALIGN_DRAW"  # set to n: this run of the reference script is its honest draw n
STEP_FILE = "step.json"  # per step: scalars and the index of state.safetensors
STATE_FILE = "state.safetensors"
TRACE_DIR = "trace"
BEFORE = "before/"  # state keys of what a step starts from, where step n-1 is not recorded
# state keys of a replaying run's own state after unrecorded steps, before it took the
# reference's (align.record.loop `Recorder._start_state`)
CARRIED = "carried/"
_RANK_DIR = re.compile(r"^rank(\d+)$")
STEP_DIR = re.compile(r"^step(\d{6})$")


def step_dir(n: int) -> str:
    return f"step{n:06d}"


def is_dump(path: Any) -> bool:
    """True for a directory written by `Recorder` (it has rank0/loop.json)."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / "rank0" / RUN_FILE).is_file()


def rank_root(root: Path, rank: int) -> Path:
    path = root / f"rank{rank}"
    if not (path / RUN_FILE).is_file():
        raise TraceError(
            f"{root}: no rank{rank}/{RUN_FILE}; expected a dump written by align.Recorder "
            "with the same number of ranks"
        )
    return path


@dataclass
class Step:
    """One recorded step of one rank: its module trace, state tensors and scalars."""

    number: int
    rank: int
    trace: Trace
    state: dict[str, torch.Tensor]
    info: dict[str, Any]


class LoopDump:
    """A Recorder's dump directory: ranks and their recorded steps (once this process has
    written those it recorded there)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        wait_for_writes(self.root)
        if not self.root.is_dir():
            raise TraceError(f"{self.root}: no such dump directory")
        self.ranks: dict[int, dict[str, Any]] = {}
        for d in sorted(self.root.iterdir()):
            m = _RANK_DIR.match(d.name)
            if m and d.is_dir():
                self.ranks[int(m[1])] = _read_json(rank_root(self.root, int(m[1])) / RUN_FILE)
        if not self.ranks:
            raise TraceError(f"{self.root}: no rank*/ directories: not an align.Recorder dump")

    def draws(self) -> list[LoopDump]:
        """The honest draws recorded under this (reference) dump, by number."""
        root = self.root / DRAWS_DIR
        found = [
            d
            for d in (root.iterdir() if root.is_dir() else ())
            if d.name.isdigit() and any(_RANK_DIR.match(r.name) for r in d.iterdir())
        ]
        return [LoopDump(d) for d in sorted(found, key=lambda d: int(d.name))]

    def steps(self, rank: int) -> list[int]:
        """Step numbers recorded (completely: temporary directories are skipped) by `rank`."""
        d = self.root / f"rank{rank}"
        return sorted(int(m[1]) for p in d.iterdir() if (m := STEP_DIR.match(p.name)))

    def weights_before(self, rank: int, n: int) -> dict[str, torch.Tensor]:
        """The parameters and floating buffers step `n` of `rank` started from, by name:
        those recorded after step n-1, else those recorded before step n (none in a dump
        of an earlier version that has neither)."""
        if n - 1 in self.steps(rank):
            prefix, state = "", self.load(rank, n - 1).state
        else:
            prefix, state = BEFORE, self.load(rank, n).state
        kinds = (f"{prefix}param/", f"{prefix}buffer/")
        return {
            key[len(prefix) :].split("/", 1)[1]: t
            for key, t in state.items()
            if key.startswith(kinds)
        }

    def load(self, rank: int, n: int) -> Step:
        """Read step `n` of `rank`; a truncated or corrupt record is a TraceError."""
        d = self.root / f"rank{rank}" / step_dir(n)
        info = _read_json(d / STEP_FILE)
        index = info.get("state")
        if not isinstance(index, dict):
            raise TraceError(f"{d / STEP_FILE}: no 'state' index: the step record is corrupt")
        return Step(n, rank, read_trace(d / TRACE_DIR), _read_state(d / STATE_FILE, index), info)


def start_state(rank_dir: Path, n: int) -> dict[str, torch.Tensor]:
    """What step `n` of the rank dump `rank_dir` started from (its BEFORE state, keys
    without the prefix: param/NAME, buffer/NAME, optim/GROUP/NAME/KEY); empty where step
    n-1 was recorded."""
    d = rank_dir / step_dir(n)
    index = _read_json(d / STEP_FILE).get("state")
    if not isinstance(index, dict):
        raise TraceError(f"{d / STEP_FILE}: no 'state' index: the step record is corrupt")
    index = {k: v for k, v in index.items() if k.startswith(BEFORE)}
    return {k[len(BEFORE) :]: t for k, t in _read_state(d / STATE_FILE, index).items()}


def _read_json(path: Path) -> dict[str, Any]:
    what = "a readable JSON record (the dump is incomplete or corrupt: record it again)"
    data = read_json(path, what=what, error=TraceError)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TraceError(f"{path}: not an {FORMAT} record")
    return data


def _read_state(path: Path, index: dict[str, Any]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {key: f.get_tensor(key) for key in index}
    except Exception as exc:  # safetensors raises its own error types
        raise TraceError(
            f"{path}: not readable ({exc}); the step record is truncated or corrupt: record "
            "it again"
        ) from exc
    for key, t in state.items():
        entry = index[key]
        if not isinstance(entry, dict) or [list(t.shape), str(t.dtype)] != [
            entry.get("shape"),
            entry.get("dtype"),
        ]:
            raise TraceError(f"{path}: {key} is not what {STEP_FILE} says: the record is corrupt")
    return state
