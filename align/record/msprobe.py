"""Read dumps written by msprobe (Ascend mstt) for PyTorch (align.judge.msprobe_dumps
compares two of them).

Format followed (msprobe in Ascend/mstt, debug/accuracy_tools/msprobe; the docs were
moved to docs/zh/dump/pytorch_data_dump_instruct.md in late 2025, same content), checked
against real dumps of mindstudio-probe 26.2.0 (tests/record/data/msprobe_real):

- docs/05.data_dump_PyTorch.md, "dump 结果文件介绍": the layout
  `dump_path/step{N}/rank{ID}/{dump.json, stack.json, construct.json, dump_tensor_data/}`;
  the docs say a non-distributed run writes `rank` without an ID, but msprobe 26 writes
  `proc{pid}` (msprobe/core/dump/service.py `_create_default_dirs`), a name that differs
  from run to run: such a dump is keyed by its step alone. "construct.json: 分层分级结构，
  level为L1时，construct.json内容为空" (empty at level L1). API prefixes: Tensor, Torch,
  Functional, NPU, VF, Aten, Distributed, MindSpeed.
- docs/27.dump_json_instruction.md: `dump.json` holds `task` (tensor, statistics),
  `level` (L0, L1, mix), `framework`, `dump_data_dir` and `data`.
  L0: module entries `Module.<qualified name>.<Class>.forward.<n>` with `input_args`,
  `input_kwargs`, `output` and `parameters` ({name: tensor}: the weights it ran with),
  `Module.<name>.<Class>.backward.<n>` with `input` and `output` (`null` for a forward
  input without a gradient), `Module.<name>.<Class>.parameters_grad.<n>` with a list per
  parameter, n counting that parameter's gradient hooks in the step (gradient
  accumulation; msprobe/pytorch/dump/api_dump/pt_hook_manager.py; older dumps: no `.<n>`).
  The root model is not recorded as a module. Non-tensor arguments are
  `{"type": "int", "value": 1}`, lists of them nested as the call's arguments.
  L1: API entries `<Prefix>.<api>.<n>.forward` / `.backward` (`Functional.conv2d.3.forward`,
  `Tensor.add_.0.forward`), n counting that API's calls in the step
  (msprobe/pytorch/hook_module/api_register.py, `prefix_api_name`). mix: both.
  Every tensor is a dict of statistics (`type`, `dtype`, `shape`, `Max`, `Min`, `Mean`,
  `Norm`) plus, in a tensor dump only, `data_name`: a file in `dump_tensor_data/`. The
  statistics are computed in the tensor's own dtype (fp64 and integers in fp32;
  msprobe/core/data_dump/data_processor/pytorch_processor.py, `get_stat_info`). Tensor
  files are flat in `dump_tensor_data/`: `<entry>.<input|output>.<i>.pt`,
  `<entry>.parameters.<name>.pt`, `<entry>.<param>.pt` for a gradient; a statistics dump
  has `dump_data_dir: null` and no `data_name`.
- Backward convention (both levels): a backward entry's `input` is the gradient flowing
  into the call (grad of the forward output), its `output` the gradient flowing out
  (grad of the forward input). So `input` becomes `Call.grad_outputs` and `output`
  `Call.grad_inputs`.
- construct.json (msprobe/core/data_dump/data_collector.py `update_construct`,
  msprobe/pytorch/dump/module_dump/module_processer.py): `{call name: parent call name or
  null}`; at level mix an API's parent is the module call it ran in
  (`Functional.conv2d.0.forward: Module.layer1.0.conv1.Conv2d.forward.0`, or that
  module's `backward.<n>` for a backward API). Module nesting is recorded for forward
  calls only (backward module entries have `null`); the APIs of `optimizer.step()` and of
  gradient clipping have the parent `"optimizer"` / `"clip_grad"`, a key of its own with
  `null`. Calls without a dump.json entry (views such as `Tensor.flatten`) may be listed.
  Megatron runs write `[parent, micro step]`.
- stack.json (msprobe/core/data_dump/json_writer.py `write_stack_info_json`,
  core/common/utils.py `load_stack_json`): `{"0": [[call names], [frames]], ...}`, older
  dumps `{call name: [frames]}`, a frame being `"File <path>, line <n>, in <func>, \\n
  <code>"`, innermost first.
- Tensors are written with `torch.save(tensor.contiguous().detach(), path)` on the device
  they lived on, so they are loaded here with `map_location="cpu"`.

Mapping to a Trace: a module call is `Call(module=<qualified name>, index=n)`. An API
call is `Call(module="<module label>/<Prefix>.<api>", index=k, cls="api")`, k counting
that API's calls inside that module call (`layer1.0.conv1/Functional.conv2d`;
`optimizer/Tensor.add_` in the optimizer step), or `<Prefix>.<api>` with k = msprobe's own
count when no construct.json names its module (level L1). The parameters a module's
first forward call of the step ran with (L0, mix) are each a call of their own,
`Call(module="<module>/parameters.<name>", cls="parameter")`, nested first in that module
call: judged before anything it computed, so a weight that differs (a previous step's
update, a bad load) is named as such, not as its module's output. Parameter gradients are
`Trace.param_grads["<module>.<param>"]` (`#<n>` appended for the n-th, n > 0). Where
stack.json has the call, the first frame outside torch is kept in `Trace.meta["where"]`
and shown with a failing row ("at resnet.py:92 out = self.conv1(x)").
Calls are judged in the order they returned (post-order of the construct.json nesting).

Comparing two dumps (align.judge.msprobe_dumps `compare_dumps`, what `align.compare`
does with two msprobe paths):
every `step*/rank*` dump of the reference is paired with the same step/rank of the
target (one dump on each side pairs as is); steps/ranks on one side only are listed in
a note, no pair in common is an error. Per pair, the API calls of each module call are
aligned by name and output shapes (difflib's longest matching blocks, so an op fused on
one side or an extra cast on the other leaves the rest aligned); what matches is judged,
what does not is listed in a note. Tensor dumps are judged by `align.compare`;
statistics-only dumps (or a tensor dump against a statistics one) by
`align.judge.statistics`, which says how much weaker that evidence is. Rows of several pairs
are prefixed `[step0/rank1]`, and the report says which pair failed first.

Safety: `.pt` files can carry pickles, so they load with `torch.load(weights_only=True)`
only, lazily, one at a time, after a size check against dump.json's shape; data names
that would leave `dump_tensor_data/` (or a `dump_tensor_data` linked elsewhere) are
refused; malformed JSON fields are TraceErrors naming the entry. Keyword inputs
(`input_kwargs`) are not mapped.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from align.errors import TraceError
from align.files import read_json
from align.record.trace import Call, Trace

DUMP_JSON = "dump.json"
CONSTRUCT_JSON = "construct.json"
STACK_JSON = "stack.json"
TENSOR_DIR = "dump_tensor_data"
STATS = ("Max", "Min", "Mean", "Norm")
MAX_DIMS = 64  # torch's own limit on a tensor's dimensions
MAX_NUMEL = 1 << 48  # far beyond any device's memory: a larger shape is crafted
MAX_NESTING = 32  # nested argument lists deeper than this are crafted

_MODULE_CALL = re.compile(
    r"^Module\.(?P<name>.+)\.(?P<cls>[^.]+)\.(?P<phase>forward|backward)\.(?P<n>\d+)$"
)
_API_CALL = re.compile(r"^(?P<api>[A-Za-z]\w*\..+)\.(?P<n>\d+)\.(?P<phase>forward|backward)$")
_PARAM_GRAD = re.compile(
    r"^Module\.(?P<name>.+)\.(?P<cls>[^.]+)\.parameters_grad(?:\.(?P<n>\d+))?$"
)
_STEP = re.compile(r"^step\d*$")
_RANK = re.compile(r"^(rank|proc)\d*$")
_NO_RANK = re.compile(r"^(rank|proc\d+)$")  # a run without ranks: "rank", or proc<pid>
PARAMETER = "parameter"  # Call.cls of a module's parameter values
PSEUDO_PARENTS = ("optimizer", "clip_grad")  # construct.json parents that are no module
_FRAME = re.compile(
    r"^File (?P<path>.*), line (?P<line>\d+), in (?P<func>[^,]*),\s*(?P<code>.*)$", re.S
)


def is_msprobe_dump(path: str | os.PathLike) -> bool:
    """True if `path` is an msprobe dump root, a `step*` or a `rank*`/`proc*` directory."""
    return bool(_dump_dirs(Path(path)))


def load_msprobe(path: str | os.PathLike) -> Trace:
    """Open one msprobe dump (tensor or statistics) as a Trace; tensors are read lazily."""
    root = Path(path)
    found = keyed_dumps(root)
    if len(found) > 1:
        raise TraceError(
            f"{root}: holds {len(found)} msprobe dumps ({', '.join(found)}); pass one of "
            f"them, e.g. {next(iter(found.values()))}, or compare the whole directories "
            "with align.compare / python -m align.compare (step by step, rank by rank)"
        )
    return load_dump(next(iter(found.values())))


def statistics_only(trace: Trace) -> bool:
    """True if the trace holds statistics but no tensors (msprobe task "statistics")."""
    return isinstance(trace.tensors, _StatTensors)


def natural_key(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _dump_dirs(root: Path) -> list[Path]:
    """Directories holding a dump.json: root itself, else step*/rank* below it."""
    if (root / DUMP_JSON).is_file():
        return [root]
    if not root.is_dir():
        return []
    found: list[Path] = []
    for child in sorted(root.iterdir(), key=lambda p: natural_key(p.name)):
        if not child.is_dir():
            continue
        if _RANK.match(child.name) and (child / DUMP_JSON).is_file():
            found.append(child)
        elif _STEP.match(child.name):
            found += [
                rank
                for rank in sorted(child.iterdir(), key=lambda p: natural_key(p.name))
                if rank.is_dir() and _RANK.match(rank.name) and (rank / DUMP_JSON).is_file()
            ]
    return found


def keyed_dumps(root: Path) -> dict[str, Path]:
    """The dumps under root keyed by step/rank ("step0/rank1"; "step0" for a run without
    ranks, whose directory msprobe names proc<pid>; "." for root), so two runs pair up."""
    found = _dump_dirs(root)
    if not found:
        raise TraceError(
            f"{root}: no {DUMP_JSON} here or in step*/rank* below; expected an msprobe "
            "dump (dump_path, a step directory or a rank directory)"
        )
    keyed = {}
    for directory in found:
        parts = directory.relative_to(root).parts
        alone = sum(
            _NO_RANK.match(d.name) is not None and d.parent == directory.parent for d in found
        )
        if parts and _NO_RANK.match(parts[-1]) and alone == 1:
            parts = parts[:-1]  # proc<pid> differs from run to run: key the step alone
        keyed["/".join(parts) or "."] = directory
    return keyed


def _read_json(path: Path) -> Any:
    # an entry's arguments sit a few levels down: msprobe's own MAX_NESTING check says more
    what = "valid JSON (the dump is corrupt)"
    return read_json(path, what=what, error=TraceError, max_depth=2 * MAX_NESTING)


def load_dump(directory: Path) -> Trace:
    """One rank directory (dump.json, construct.json, stack.json) as a Trace."""
    dump_file = directory / DUMP_JSON
    dump = _read_json(dump_file)
    if not isinstance(dump, dict) or not isinstance(dump.get("data"), dict):
        raise TraceError(f"{dump_file}: not an msprobe dump.json (no 'data' object)")
    task = _check_header(dump_file, dump)
    tensor_dir = directory / TENSOR_DIR
    if tensor_dir.is_symlink() or (
        tensor_dir.exists() and tensor_dir.resolve().parent != directory.resolve()
    ):
        raise TraceError(f"{tensor_dir}: links out of the dump; refused")
    builder = _Builder(dump_file, tensor_dir, statistics=task == "statistics")
    for name, entry in dump["data"].items():
        builder.add(name, entry)
    if not builder.calls:
        raise TraceError(
            f"{dump_file}: no module or API entries (Module.<name>.<Class>.forward.<n>, "
            "<Prefix>.<api>.<n>.forward); the dump is empty: dump a step that runs the model"
        )
    construct = _read_construct(directory / CONSTRUCT_JSON)
    builder.link(construct)
    where = _locations(directory / STACK_JSON)
    tensors = (
        _StatTensors(dump_file, builder.stats)
        if builder.statistics
        else _PtTensors(tensor_dir, builder.stats)
    )
    return Trace(
        calls=builder.calls,
        tensors=tensors,
        param_grads=builder.param_grads,
        backward_order=builder.backward_order,
        forward_order=_post_order(builder.calls),
        meta={
            "source": "msprobe",
            "path": str(directory),
            "dump_file": str(dump_file),
            # each call's forward entry in dump.json (align.judge.replay re-runs API calls)
            "entries": [builder.forward_names.get(n) for n in range(len(builder.calls))],
            "task": task,
            "level": dump.get("level"),
            "framework": dump.get("framework"),
            "precision": _precision(builder.stats),
            "where": {
                builder.calls[p].label: where[name] for p, name in builder.names() if name in where
            },
        },
    )


def _check_header(dump_file: Path, dump: dict[str, Any]) -> str:
    """The dump's task ("tensor" or "statistics"); other frameworks and tasks refused."""
    framework = dump.get("framework")
    if framework not in (None, "pytorch"):
        raise TraceError(
            f"{dump_file}: a {framework!r} dump; only msprobe's PyTorch dumps (.pt) are read"
        )
    task = dump.get("task")
    if task not in (None, "tensor", "statistics"):
        raise TraceError(
            f"{dump_file}: task {task!r} is neither a tensor nor a statistics dump; dump "
            'again with "task": "tensor" (or "statistics") in msprobe\'s config.json'
        )
    if task is None:  # no header: a tensor dump names its files
        task = "tensor" if '"data_name"' in json.dumps(dump["data"]) else "statistics"
    return task


def _precision(stats: dict[str, dict[str, Any]]) -> str | None:
    """amp-bf16 / amp-fp16 when the run holds bf16 / fp16 tensors, fp64 when every floating
    tensor is float64 (a run that can be the golden of align.compare --golden)."""
    dtypes = {s.get("dtype") for s in stats.values()}
    if "torch.bfloat16" in dtypes:
        return "amp-bf16"
    if "torch.float16" in dtypes:
        return "amp-fp16"
    floating = {d for d in dtypes if isinstance(d, str) and _is_floating(d)}
    return "fp64" if floating == {"torch.float64"} else None


def _is_floating(dtype: str) -> bool:
    """True for a floating torch dtype named as dump.json does ("torch.float32")."""
    found = getattr(torch, dtype.removeprefix("torch."), None)
    return isinstance(found, torch.dtype) and found.is_floating_point


def _read_construct(path: Path) -> dict[str, Any]:
    """Call name -> enclosing call name, from construct.json; empty when absent."""
    if not path.is_file():
        return {}
    construct = _read_json(path)
    if not isinstance(construct, dict):
        raise TraceError(f"{path}: expected an object mapping calls to their parent")
    return construct


def _locations(path: Path) -> dict[str, str]:
    """Call name -> first frame outside torch ("resnet.py:92 out = self.conv1(x)")."""
    if not path.is_file():
        return {}
    stack = _read_json(path)
    if not isinstance(stack, dict):
        raise TraceError(f"{path}: expected an object (msprobe's stack.json)")
    by_name: dict[str, Any] = {}
    for key, value in stack.items():
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], list):
            by_name.update({n: value[1] for n in value[0] if isinstance(n, str)})
        else:  # older dumps: {call name: frames}
            by_name[key] = value
    found = {}
    for name, frames in by_name.items():
        if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
            raise TraceError(f"{path}: the stack of {name} is not a list of frames")
        parsed = [m for m in map(_FRAME.match, frames) if m]
        outside = [m for m in parsed if not re.search(r"[/\\](torch|msprobe)[/\\]", m["path"])]
        if outside or parsed:
            m = (outside or parsed)[0]
            code = " ".join(m["code"].split())
            found[name] = (
                f"{PurePosixPath(m['path'].replace(chr(92), '/')).name}:{m['line']} {code}"
            )
    return found


def _post_order(calls: list[Call]) -> list[int]:
    """Call positions in the order they returned: children before their enclosing call,
    a module's parameters before its other children."""
    children: dict[int | None, list[int]] = {}
    for n in sorted(range(len(calls)), key=lambda n: calls[n].cls != PARAMETER):
        children.setdefault(calls[n].parent, []).append(n)
    order: list[int] = []
    stack = [(n, False) for n in reversed(children.get(None, []))]
    while stack:
        n, done = stack.pop()
        if done:
            order.append(n)
            continue
        stack.append((n, True))
        stack += [(c, False) for c in reversed(children.get(n, []))]
    return order


class _Builder:
    """Turns dump.json entries into Calls, tensor statistics and parameter gradients."""

    def __init__(self, dump_file: Path, tensor_dir: Path, statistics: bool):
        self.dump_file = dump_file
        self.tensor_dir = tensor_dir
        self.statistics = statistics
        self.calls: list[Call] = []
        self.positions: dict[tuple[str, str, int], int] = {}
        self.forward_names: dict[int, str] = {}  # position -> forward entry name
        self.backward_names: dict[int, str] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self.param_grads: dict[str, str] = {}
        self.backward_order: list[int] = []

    def add(self, name: str, entry: Any) -> None:
        if not isinstance(entry, dict):
            raise TraceError(f"{self.dump_file}: entry {name} is not an object")
        module, api = _MODULE_CALL.match(name), _API_CALL.match(name)
        if module or api:
            found = module or api
            kind = "module" if module else "api"
            position = self._call(
                kind, found["name" if module else "api"], int(found["n"]), module and module["cls"]
            )
            record = self.calls[position]
            if found["phase"] == "forward":
                self.forward_names[position] = name
                record.inputs = self._tensors(name, "input", entry.get("input_args", []))
                record.outputs = self._tensors(name, "output", entry.get("output", []))
                if module and record.index == 0:
                    self._parameters(name, record, position, entry.get("parameters"))
            else:
                self.backward_names[position] = name
                record.grad_outputs = self._tensors(name, "input", entry.get("input", []))
                record.grad_inputs = self._tensors(name, "output", entry.get("output", []))
                self.backward_order.append(position)
            return
        grads = _PARAM_GRAD.match(name)
        if grads:  # parameters_grad.<n>: the n-th gradient of the step (accumulation)
            n = int(grads["n"] or 0)
            suffix = f"#{n}" if n else ""
            for param, value in entry.items():
                keys = [k for k in self._tensors(name, param, value) if k is not None]
                if keys:
                    self.param_grads[f"{grads['name']}.{param}{suffix}"] = keys[0]

    def _parameters(self, entry: str, module: Call, parent: int, params: Any) -> None:
        """A module's parameter values as calls nested in its call (see the docstring)."""
        if params is None:
            return
        if not isinstance(params, dict):
            raise TraceError(f"{self.dump_file}: {entry} has 'parameters' that is not an object")
        for param, value in params.items():
            keys = [k for k in self._tensors(entry, f"parameters.{param}", value) if k]
            if keys:
                self.forward_names[len(self.calls)] = f"{entry}.parameters.{param}"
                self.calls.append(
                    Call(f"{module.module}/parameters.{param}", 0, PARAMETER, parent, outputs=keys)
                )

    def _call(self, kind: str, name: str, index: int, cls: str | None) -> int:
        key = (kind, name, index)
        if key not in self.positions:
            self.positions[key] = len(self.calls)
            self.calls.append(Call(module=name, index=index, cls=cls or "api", parent=None))
        return self.positions[key]

    def _tensors(self, entry: str, slot: str, value: Any, depth: int = 0) -> list[str | None]:
        """Flatten nested args to tensor keys in order; None for non-tensor values."""
        if depth > MAX_NESTING:
            raise TraceError(f"{self.dump_file}: {entry} nests arguments too deeply; crafted?")
        if isinstance(value, list):
            return [
                key
                for i, item in enumerate(value)
                for key in self._tensors(entry, f"{slot}.{i}", item, depth + 1)
            ]
        if not isinstance(value, dict) or value.get("type") != "torch.Tensor":
            return [None]
        stats = self._statistics(entry, value)
        data_name = value.get("data_name")
        if self.statistics:
            key = f"{entry}.{slot}"
        elif data_name is None:
            raise TraceError(
                f"{self.dump_file}: {entry} records tensor statistics without a tensor "
                "file (data_name), in a dump whose other tensors have files: the dump is "
                "inconsistent; dump again with one task (tensor or statistics)"
            )
        else:
            self._check_name(entry, data_name)
            if not (self.tensor_dir / data_name).is_file():
                raise TraceError(
                    f"{self.dump_file}: {entry} refers to {TENSOR_DIR}/{data_name}, which "
                    "is missing; the dump is incomplete"
                )
            key = data_name
        self.stats[key] = stats
        return [key]

    def _statistics(self, entry: str, value: dict[str, Any]) -> dict[str, Any]:
        """dtype, shape and Max/Min/Mean/Norm of one tensor, their types checked."""
        shape, dtype = value.get("shape"), value.get("dtype")
        bad = None
        if not isinstance(dtype, str):
            bad = f"dtype {dtype!r} is not a string"
        elif not (
            isinstance(shape, list)
            and len(shape) <= MAX_DIMS
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            bad = f"shape {str(shape)[:80]} is not a list of at most {MAX_DIMS} sizes"
        elif math.prod(shape) > MAX_NUMEL:
            bad = f"shape {shape} has {math.prod(shape):.3g} elements, more than any device holds"
        else:
            wrong = [s for s in STATS if not isinstance(value.get(s), (int, float, type(None)))]
            bad = f"{', '.join(wrong)} not numbers" if wrong else None
        if bad:
            raise TraceError(
                f"{self.dump_file}: {entry} has a tensor whose {bad}; crafted or corrupt"
            )
        return {"dtype": dtype, "shape": shape, **{s: value.get(s) for s in STATS}}

    def _check_name(self, entry: str, data_name: Any) -> None:
        bad = not isinstance(data_name, str) or not data_name
        if not bad:
            for flavour in (PurePosixPath, PureWindowsPath):
                pure = flavour(data_name)
                bad |= pure.is_absolute() or bool(pure.drive) or ".." in pure.parts
        if not bad:
            inside = self.tensor_dir.resolve()
            bad = inside not in (self.tensor_dir / data_name).resolve().parents
        if bad:
            raise TraceError(
                f"{self.dump_file}: {entry} names tensor file {data_name!r}, which is not "
                f"a file inside {TENSOR_DIR}/; refused"
            )

    def names(self) -> list[tuple[int, str]]:
        """(position, entry name) of each call: its forward entry, else its backward one."""
        return [
            (n, self.forward_names.get(n) or self.backward_names[n]) for n in range(len(self.calls))
        ]

    def link(self, construct: dict[str, Any]) -> None:
        """Parents from construct.json; API calls renamed after the module call they ran in
        (or after msprobe's "optimizer" / "clip_grad", which are no module)."""
        module_calls = {(c.module, c.index): n for n, c in enumerate(self.calls) if c.cls != "api"}
        groups: dict[int, str] = {}  # position -> pseudo-parent
        for position, name in self.names():
            parent = construct.get(name)
            if isinstance(parent, list):  # Megatron runs record [parent, micro step]
                parent = parent[0] if parent else None
            found = _MODULE_CALL.match(parent) if isinstance(parent, str) else None
            if found:
                self.calls[position].parent = module_calls.get((found["name"], int(found["n"])))
            elif parent in PSEUDO_PARENTS:
                groups[position] = parent
        counts: dict[tuple[int | None, str | None, str], int] = {}
        apis = sorted(
            (n for n, c in enumerate(self.calls) if c.cls == "api"),
            key=lambda n: self.calls[n].index,
        )
        for n in apis:
            call = self.calls[n]
            if call.parent is None and not construct:
                continue  # level L1: msprobe's own count stays the index
            key = (call.parent, groups.get(n), call.module)
            call.index, counts[key] = counts.get(key, 0), counts.get(key, 0) + 1
            if call.parent is not None:
                call.module = f"{self.calls[call.parent].label}/{call.module}"
            elif n in groups:
                call.module = f"{groups[n]}/{call.module}"


class _StatTensors:
    """A statistics-only dump: per-tensor statistics, no tensor to read."""

    def __init__(self, dump_file: Path, stats: dict[str, dict[str, Any]]):
        self.dump_file = dump_file
        self.stats = stats

    def __getitem__(self, key: str) -> torch.Tensor:
        raise TraceError(
            f"{self.dump_file}: a statistics-only dump (task: statistics) records Max/Min/"
            f"Mean/Norm of {key} but not the tensor; compare it with align.compare on the "
            'dump directories, or dump again with "task": "tensor" in msprobe\'s config.json'
        )

    def __contains__(self, key: str) -> bool:
        return key in self.stats


class _PtTensors:
    """Tensors read lazily from msprobe's .pt files with torch.load(weights_only=True)."""

    def __init__(self, tensor_dir: Path, stats: dict[str, dict[str, Any]]):
        self.tensor_dir = tensor_dir
        self.stats = stats

    def __getitem__(self, key: str) -> torch.Tensor:
        spec = self.stats[key]
        path = self.tensor_dir / key
        dtype = getattr(torch, spec["dtype"].removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            need = math.prod(spec["shape"]) * dtype.itemsize
            size = path.stat().st_size if path.is_file() else 0
            if size < need:
                raise TraceError(
                    f"{path}: not a readable .pt file: it has {size} bytes, fewer than the "
                    f"{need} of its {spec['shape']} {spec['dtype']} tensor in dump.json; the "
                    "dump is corrupt or truncated: dump it again"
                )
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise TraceError(
                f"{path}: refused: loading it needs more than torch.load(weights_only=True) "
                f"allows, so it could run code ({_refusal_reason(exc)})"
            ) from exc
        except Exception as exc:  # torch raises RuntimeError, EOFError, OSError...
            raise TraceError(
                f"{path}: not a readable .pt file ({str(exc).splitlines()[0][:200]}); "
                "the dump is corrupt or truncated: dump it again"
            ) from exc
        if not isinstance(tensor, torch.Tensor):
            raise TraceError(f"{path}: holds a {type(tensor).__name__}, not a tensor")
        if list(tensor.shape) != list(spec["shape"]) or str(tensor.dtype) != spec["dtype"]:
            raise TraceError(
                f"{path}: is {tuple(tensor.shape)} {tensor.dtype} but dump.json says "
                f"{spec['shape']} {spec['dtype']}: the dump is inconsistent"
            )
        return tensor

    def __contains__(self, key: str) -> bool:
        return key in self.stats


def _refusal_reason(exc: Exception) -> str:
    """What torch's weights_only unpickler refused (the global it names), plus a hint."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    reason = f"it calls {found[1]}" if found else "it holds more than tensors"
    if found and found[1].startswith("torch_npu"):
        return (
            f"{reason}: written by torch_npu in an NPU-specific form (an old torch_npu, or "
            "a private format); dump again with a current torch_npu or save tensors with .cpu()"
        )
    return f"{reason}; an msprobe tensor file holds one plain tensor"
