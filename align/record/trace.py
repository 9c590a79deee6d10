"""Trace: what one run of a model produced, module by module, in memory or on disk.

A trace holds, per module call (qualified name + call index), the tensors it received and
returned, the gradients of those outputs and inputs, plus parameter gradients. On disk it
is safetensors shards (no code runs on load) and a JSON manifest; tensors shared between
records (a container's output is its last child's) are stored once.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from align.errors import TraceError
from align.files import read_json, replace_dir
from align.numerics.decisions import Fault
from align.numerics.names import BUFFER, call_label

MANIFEST = "manifest.json"
FORMAT = "align.trace/1"
SHARD_BYTES = 1 << 30
_SHARD_NAME = re.compile(r"^tensors-\d{5}\.safetensors$")

# The tensor lists a Call carries, in the order a record is reported.
FORWARD_SLOTS = ("inputs", "outputs")
BACKWARD_SLOTS = ("grad_outputs", "grad_inputs")
# A call's module's floating buffers before and after it; one key for both where the call
# left a buffer as it was (a buffer one device writes and another leaves, by rounding, is
# still compared: BatchNorm's running mean of two exactly opposite values)
STATE_SLOTS = ("buffers_in", "buffers")
DRAWS = "draws"  # subdirectory of a dump holding its honest draws
DECISIONS = "decisions.safetensors"  # the run's discrete choices (align.numerics.decisions)


@dataclass
class Call:
    """One call of one module: tensor keys (None where the value was not a tensor)."""

    module: str  # qualified name as in model.named_modules(); "" is the model itself
    index: int  # 0 for the first call of this module, 1 for the second...
    cls: str
    parent: int | None  # position in Trace.calls of the enclosing call
    inputs: list[str | None] = field(default_factory=list)
    outputs: list[str | None] = field(default_factory=list)
    grad_outputs: list[str | None] = field(default_factory=list)
    grad_inputs: list[str | None] = field(default_factory=list)
    # the module's floating buffers, by name, with their keys before and after the call
    buffer_names: list[str] = field(default_factory=list)
    buffers_in: list[str | None] = field(default_factory=list)
    buffers: list[str | None] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int]:
        return (self.module, self.index)

    @property
    def label(self) -> str:
        return call_label(self.module, self.index)

    def wrote(self, i: int) -> bool:
        """Whether the call changed its module's buffer `i` (a running statistic)."""
        return self.buffers_in[i] != self.buffers[i]

    def buffer_index(self, label: str) -> int | None:
        """Where in `buffers` the row `label` ("buffer running_var") points, or None."""
        name = label.removeprefix(BUFFER)
        if label.startswith(BUFFER) and name in self.buffer_names:
            return self.buffer_names.index(name)
        return None


class _DiskTensors:
    """Tensors read lazily from safetensors shards, one at a time."""

    def __init__(self, root: Path, index: dict[str, dict[str, Any]]):
        self.root = root
        self.index = index
        self._handles: dict[str, Any] = {}

    def _handle(self, shard: str):
        if shard not in self._handles:
            path = self.root / shard
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise TraceError(
                    f"{path}: not a readable safetensors file ({exc}); the dump is "
                    "corrupt or truncated: dump it again"
                ) from exc
        return self._handles[shard]

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self.index[key]
        try:
            tensor = self._handle(entry["shard"]).get_tensor(key)
        except TraceError:
            raise
        except Exception as exc:
            raise TraceError(
                f"{self.root / entry['shard']}: tensor {key} cannot be read ({exc})"
            ) from exc
        if list(tensor.shape) != entry["shape"] or str(tensor.dtype) != entry["dtype"]:
            raise TraceError(
                f"{self.root / entry['shard']}: tensor {key} is {tuple(tensor.shape)} "
                f"{tensor.dtype} but the manifest says {tuple(entry['shape'])} "
                f"{entry['dtype']}: the dump is inconsistent"
            )
        return tensor

    def __contains__(self, key: str) -> bool:
        return key in self.index


@dataclass
class Trace:
    """Module-by-module record of one run. `tensors` maps keys to tensors (lazy on disk)."""

    calls: list[Call]
    tensors: Any  # dict[str, Tensor] in memory, _DiskTensors when loaded
    param_grads: dict[str, str] = field(default_factory=dict)
    backward_order: list[int] = field(default_factory=list)  # call positions
    # (call position, slot, index) of each gradient in the order backward produced it
    backward_events: list[tuple[int, str, int]] = field(default_factory=list)
    forward_order: list[int] = field(default_factory=list)  # calls in the order they returned
    meta: dict[str, Any] = field(default_factory=dict)
    # honest draws of this run (align.numerics.jitter), saved in draws/<n>/: align.compare takes
    # the reference's error as the largest of its and theirs
    draws: list[Trace] = field(default_factory=list)
    # (op, indices) of each sort / max / max-pool, in call order (align.numerics.decisions): what a
    # target or golden dump replays from the reference's
    decisions: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    # kernels of this run that contradicted their own decision (a fused dropout off its own
    # mask): the replayed values hide them, so a comparison fails them by this record
    faults: list[Fault] = field(default_factory=list)

    def tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def by_key(self) -> dict[tuple[str, int], Call]:
        return {c.key: c for c in self.calls}

    def modules(self) -> list[str]:
        """Module names in order of first call."""
        return list(dict.fromkeys(c.module for c in self.calls))

    def children(self, position: int) -> Iterator[Call]:
        return (c for c in self.calls if c.parent == position)

    def keys(self) -> set[str]:
        used = {
            k
            for c in self.calls
            for slot in FORWARD_SLOTS + BACKWARD_SLOTS + STATE_SLOTS
            for k in getattr(c, slot)
            if k is not None
        }
        return used | set(self.param_grads.values())

    def save(self, directory: str | os.PathLike) -> Path:
        """Write safetensors shards and the manifest atomically (a complete dump or none)."""
        return replace_dir(directory, self._write, MANIFEST, "trace")

    def _write(self, directory: Path) -> None:
        """Shards, manifest and draws into an empty `directory`."""
        shards = ShardWriter(lambda name, shard: save_file(shard, str(directory / name)))
        for key in sorted(self.keys(), key=_natural):
            shards.add(key, self.tensor(key).detach().cpu().contiguous())
        shards.flush()
        self.write_records(directory, shards.index)

    def write_records(self, directory: Path, index: dict[str, dict[str, Any]]) -> None:
        """Everything but the tensors into `directory`, whose shards hold them as `index`
        says (ShardWriter's): the draws, the decisions and the manifest."""
        for n, draw in enumerate(self.draws):
            sub = directory / DRAWS / str(n)
            sub.mkdir(parents=True)
            draw._write(sub)
        if self.decisions:
            save_file(
                {
                    f"{n:05d}": t.detach().cpu().contiguous()
                    for n, (_, t) in enumerate(self.decisions)
                },
                str(directory / DECISIONS),
            )
        manifest = {
            "format": FORMAT,
            "calls": [asdict(c) for c in self.calls],
            "param_grads": self.param_grads,
            "backward_order": self.backward_order,
            "backward_events": self.backward_events,
            "forward_order": self.forward_order,
            "meta": self.meta,
            "tensors": index,
            "draws": len(self.draws),
            "decisions": [op for op, _ in self.decisions],
            "faults": [vars(fault) for fault in self.faults],
        }
        # compact: the C encoder, 5x faster than indented (8 ms of a recorded ResNet-18
        # step's GIL time on the writer thread, measured); `python -m json.tool` reads it
        (directory / MANIFEST).write_text(json.dumps(manifest, default=str))


class ShardWriter:
    """Tensors gathered into safetensors shards of about SHARD_BYTES each, in the order
    they are added: `save(name, tensors)` writes each full shard (at once, or on a thread:
    align.record.writer streams a recorded step this way); `index` maps every key added to
    its shape, dtype and shard, as a trace's manifest lists them."""

    def __init__(
        self, save: Callable[[str, dict[str, torch.Tensor]], None], limit: int | None = None
    ):
        self.index: dict[str, dict[str, Any]] = {}
        self._save, self._limit = save, limit or SHARD_BYTES
        self._shard: dict[str, torch.Tensor] = {}
        self._size = 0
        self._count = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        if t.layout != torch.strided:  # a sparse gradient (safetensors holds dense ones)
            t = t.to_dense()
        self.index[key] = {"shape": list(t.shape), "dtype": str(t.dtype), "shard": None}
        self._shard[key] = t
        self._size += t.numel() * t.element_size()
        if self._size >= self._limit:
            self.flush()

    def flush(self) -> None:
        """Save the shard being gathered, if it holds anything."""
        if not self._shard:
            return
        name = f"tensors-{self._count:05d}.safetensors"
        for key in self._shard:
            self.index[key]["shard"] = name
        shard, self._shard, self._size = self._shard, {}, 0
        self._count += 1
        self._save(name, shard)


def _validate(trace: Trace, index: Any) -> None:
    """Raise TypeError/ValueError unless the manifest's fields have the types load needs."""
    if not isinstance(index, dict) or not all(
        isinstance(e, dict)
        and isinstance(e.get("dtype"), str)
        and isinstance(e.get("shape"), list)
        and all(isinstance(n, int) for n in e["shape"])
        for e in index.values()
    ):
        raise TypeError("'tensors' must map keys to {shape: [int], dtype: str, shard: str}")
    n = len(trace.calls)
    for call in trace.calls:
        slots = [getattr(call, s) for s in FORWARD_SLOTS + BACKWARD_SLOTS + STATE_SLOTS]
        names = call.buffer_names
        if (
            not isinstance(call.module, str)
            or not isinstance(call.index, int)
            or not (call.parent is None or isinstance(call.parent, int) and 0 <= call.parent < n)
            or not all(isinstance(s, list) for s in slots)
            or not all(k is None or isinstance(k, str) for s in slots for k in s)
            or not isinstance(names, list)
            or not all(isinstance(name, str) for name in names)
            or not len(names) == len(call.buffers_in) == len(call.buffers)
        ):
            raise TypeError(f"malformed call record {asdict(call)}")
    for order in ("backward_order", "forward_order"):
        if not all(isinstance(p, int) and 0 <= p < n for p in getattr(trace, order)):
            raise ValueError(f"'{order}' must list positions of calls")
    for event in trace.backward_events:
        pos, slot, i = event
        if not (
            isinstance(pos, int) and 0 <= pos < n and slot in BACKWARD_SLOTS and isinstance(i, int)
        ) or not 0 <= i < len(getattr(trace.calls[pos], slot)):
            raise ValueError(f"'backward_events' entry {event} names no recorded gradient")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in trace.param_grads.items()):
        raise TypeError("'param_grads' must map parameter names to tensor keys")


def _natural(key: str) -> tuple[int, str]:
    digits = "".join(ch for ch in key if ch.isdigit())
    return (int(digits) if digits else -1, key)


def is_align_trace(directory: str | os.PathLike) -> bool:
    """True if `directory` holds a manifest written by `Trace.save`."""
    return (Path(directory) / MANIFEST).is_file()


def read_trace(directory: str | os.PathLike) -> Trace:
    """Open a trace written by `Trace.save`; tensors are read lazily, one at a time.

    Files are resolved relative to the manifest, so a dump moved from another machine
    works; names that would leave the directory are refused. (align.record.readers'
    load_trace opens any dump format.)
    """
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise TraceError(f"{root}: no {MANIFEST} here; not a directory written by Trace.save")
    manifest = read_json(path, what="valid JSON (the dump is corrupt)", error=TraceError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TraceError(f"{path}: not an {FORMAT} manifest")
    try:
        index = manifest["tensors"]
        calls = [Call(**c) for c in manifest["calls"]]
        trace = Trace(
            calls=calls,
            tensors=_DiskTensors(root, index),
            param_grads=dict(manifest.get("param_grads", {})),
            backward_order=list(manifest.get("backward_order", [])),
            backward_events=[tuple(e) for e in manifest.get("backward_events", [])],
            forward_order=list(manifest.get("forward_order", [])),
            meta=dict(manifest.get("meta", {})),
        )
        _validate(trace, index)
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"{path}: manifest is missing or has malformed fields ({exc})") from exc
    inside = root.resolve()
    for key, entry in index.items():
        shard = entry.get("shard")
        if not isinstance(shard, str) or not _SHARD_NAME.match(shard):
            raise TraceError(f"{path}: tensor {key} points to {shard!r}, not a shard of this dump")
        if not (root / shard).is_file():
            raise TraceError(f"{path}: shard {shard} of tensor {key} is missing")
        if (root / shard).resolve().parent != inside:  # a symlink out of the dump
            raise TraceError(f"{path}: shard {shard} of tensor {key} links out of the dump")
    missing = trace.keys() - set(index)
    if missing:
        raise TraceError(f"{path}: records refer to tensors not in the dump: {sorted(missing)[:5]}")
    draws = manifest.get("draws", 0)
    if not isinstance(draws, int) or draws < 0:
        raise TraceError(f"{path}: 'draws' must be a count, not {draws!r}")
    trace.draws = [read_trace(root / DRAWS / str(n)) for n in range(draws)]
    trace.decisions = _load_decisions(root, manifest.get("decisions", []))
    trace.faults = _load_faults(path, manifest.get("faults", []))
    return trace


def _load_faults(path: Path, entries: Any) -> list[Fault]:
    """The run's kernel faults; a malformed entry is a TraceError, never skipped."""
    fields = {"module": str, "call": int, "op": str, "message": str}
    if not isinstance(entries, list) or not all(
        isinstance(e, dict)
        and e.keys() == fields.keys()
        and all(type(e[k]) is kind for k, kind in fields.items())
        for e in entries
    ):
        raise TraceError(
            f"{path}: 'faults' must be a list of {{module, call, op, message}}: the dump is corrupt"
        )
    return [Fault(**e) for e in entries]


def _load_decisions(root: Path, ops: Any) -> list[tuple[str, torch.Tensor]]:
    path = root / DECISIONS
    if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops):
        raise TraceError(f"{root / MANIFEST}: 'decisions' must list op names, not {ops!r}")
    if not ops:
        return []
    try:
        with safe_open(str(path), framework="pt") as f:
            return [(op, f.get_tensor(f"{n:05d}")) for n, op in enumerate(ops)]
    except Exception as exc:  # missing file, truncated header, a missing entry
        raise TraceError(
            f"{path}: the dump's {len(ops)} discrete choices cannot be read ({exc}); "
            "the dump is incomplete or corrupt: dump the reference again"
        ) from exc
