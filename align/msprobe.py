"""Read a tensor dump written by msprobe (Ascend mstt) for PyTorch into a `Trace`.

Format followed (msprobe in Ascend/mstt, debug/accuracy_tools/msprobe):

- docs/05.data_dump_PyTorch.md, "dump 结果文件介绍": the layout
  `dump_path/step{N}/rank{ID}/{dump.json, stack.json, construct.json, dump_tensor_data/}`;
  a non-distributed run writes `rank` without an ID.
- docs/27.dump_json_instruction.md, L0 example: `dump.json` holds `task`, `level`,
  `framework`, `dump_data_dir` and `data`; module entries are named
  `Module.<qualified name>.<Class>.forward.<n>` with `input_args`, `input_kwargs`,
  `output` (and `parameters`), `Module.<name>.<Class>.backward.<n>` with `input` and
  `output`, and `Module.<name>.<Class>.parameters_grad` with one list per parameter.
  Every tensor is a dict of statistics (`type`, `dtype`, `shape`, `Max`, `Min`, `Mean`,
  `Norm`) plus, in a tensor dump only, `data_name`: a file in `dump_tensor_data/`.
- Backward convention: the doc says a backward entry's `input` is the gradient flowing
  into the module (grad of the forward output) and its `output` the gradient flowing out
  (grad of the forward input); msprobe's hook managers swap torch's
  `(grad_input, grad_output)` into `ModuleBackwardInputsOutputs(grad_input=grad_output,
  grad_output=grad_input)` for exactly that reason. So backward `input` becomes
  `Call.grad_outputs` and backward `output` becomes `Call.grad_inputs`.
- Tensors are written with `torch.save(tensor.contiguous().detach(), path)`
  (`TensorDataProcessor._analyze_tensor`, `save_pt`), on the device they lived on, so
  they are loaded here with `map_location="cpu"`.
- Nesting: `ModuleProcesser` skips the root model (no call for "") and records each
  call's enclosing call in `construct.json` (`{call name: parent call name or null}`).
  `dump.json` itself records no nesting; when `construct.json` is absent or names a
  parent that is not a module call of this dump, `Call.parent` is None.

`.pt` files can carry pickles, so they load with `torch.load(weights_only=True)` only,
lazily, one at a time; data names that would leave `dump_tensor_data/` are refused.
Keyword inputs (`input_kwargs`) and API-level entries of a `mix` dump are not mapped.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from align.errors import TraceError
from align.trace import Call, Trace

DUMP_JSON = "dump.json"
CONSTRUCT_JSON = "construct.json"
TENSOR_DIR = "dump_tensor_data"

_CALL = re.compile(
    r"^Module\.(?P<name>.+)\.(?P<cls>[^.]+)\.(?P<phase>forward|backward)\.(?P<n>\d+)$"
)
_PARAM_GRAD = re.compile(r"^Module\.(?P<name>.+)\.(?P<cls>[^.]+)\.parameters_grad$")
_STEP = re.compile(r"^step\d*$")
_RANK = re.compile(r"^(rank|proc)\d*$")


def is_msprobe_dump(path: str | os.PathLike) -> bool:
    """True if `path` is an msprobe dump root, a `step*` or a `rank*`/`proc*` directory."""
    return bool(_dump_dirs(Path(path)))


def load_msprobe(path: str | os.PathLike) -> Trace:
    """Open an msprobe tensor dump as a Trace; tensors are read lazily, one at a time."""
    root = Path(path)
    directory = _pick_dump_dir(root)
    dump_file = directory / DUMP_JSON
    dump = _read_json(dump_file)
    if not isinstance(dump, dict) or not isinstance(dump.get("data"), dict):
        raise TraceError(f"{dump_file}: not an msprobe dump.json (no 'data' object)")
    _check_header(dump_file, dump)

    tensor_dir = directory / TENSOR_DIR
    builder = _Builder(dump_file, tensor_dir)
    for name, entry in dump["data"].items():
        builder.add(name, entry)
    if not builder.calls:
        raise TraceError(
            f"{dump_file}: no module entries (Module.<name>.<Class>.forward.<n>); "
            "dump with level L0 or mix (level L1 records only API calls)"
        )
    builder.link_parents(_read_construct(directory / CONSTRUCT_JSON))
    return Trace(
        calls=builder.calls,
        tensors=_PtTensors(tensor_dir, builder.specs),
        param_grads=builder.param_grads,
        backward_order=builder.backward_order,
        meta={
            "source": "msprobe",
            "path": str(directory),
            "task": dump.get("task"),
            "level": dump.get("level"),
            "framework": dump.get("framework"),
        },
    )


def _dump_dirs(root: Path) -> list[Path]:
    """Directories holding a dump.json: root itself, else step*/rank* below it."""
    if (root / DUMP_JSON).is_file():
        return [root]
    if not root.is_dir():
        return []
    found: list[Path] = []
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        if _RANK.match(child.name) and (child / DUMP_JSON).is_file():
            found.append(child)
        elif _STEP.match(child.name):
            found += [
                rank
                for rank in sorted(child.iterdir())
                if rank.is_dir() and _RANK.match(rank.name) and (rank / DUMP_JSON).is_file()
            ]
    return found


def _pick_dump_dir(root: Path) -> Path:
    found = _dump_dirs(root)
    if not found:
        raise TraceError(
            f"{root}: no {DUMP_JSON} here or in step*/rank* below; expected an msprobe "
            "dump (dump_path, a step directory or a rank directory)"
        )
    if len(found) > 1:
        choices = ", ".join(str(d.relative_to(root)) for d in found)
        raise TraceError(
            f"{root}: holds {len(found)} msprobe dumps ({choices}); pass one of them, "
            f"e.g. {found[0]}"
        )
    return found[0]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(f"{path}: not valid JSON ({exc}); the dump is corrupt") from exc


def _check_header(dump_file: Path, dump: dict[str, Any]) -> None:
    framework = dump.get("framework")
    if framework not in (None, "pytorch"):
        raise TraceError(
            f"{dump_file}: a {framework!r} dump; only msprobe's PyTorch dumps (.pt) are read"
        )
    task = dump.get("task")
    if task == "statistics":
        raise TraceError(
            f"{dump_file}: a statistics-only dump (task: statistics) records Max/Min/Mean/"
            "Norm but no tensors; comparing layers needs the tensors: dump again with "
            '"task": "tensor" in msprobe\'s config.json'
        )
    if task not in (None, "tensor"):
        raise TraceError(
            f"{dump_file}: task {task!r} is not a full tensor dump; dump again with "
            '"task": "tensor"'
        )


def _read_construct(path: Path) -> dict[str, Any]:
    """Call name -> enclosing call name, from construct.json; empty when absent."""
    if not path.is_file():
        return {}
    construct = _read_json(path)
    if not isinstance(construct, dict):
        raise TraceError(f"{path}: expected an object mapping calls to their parent")
    return construct


class _Builder:
    """Turns dump.json entries into Calls, tensor specs and parameter gradients."""

    def __init__(self, dump_file: Path, tensor_dir: Path):
        self.dump_file = dump_file
        self.tensor_dir = tensor_dir
        self.calls: list[Call] = []
        self.positions: dict[tuple[str, int], int] = {}
        self.entry_names: dict[str, int] = {}  # forward entry name -> position
        self.specs: dict[str, dict[str, Any]] = {}
        self.param_grads: dict[str, str] = {}
        self.backward_order: list[int] = []

    def add(self, name: str, entry: Any) -> None:
        if not isinstance(entry, dict):
            raise TraceError(f"{self.dump_file}: entry {name} is not an object")
        call = _CALL.match(name)
        if call:
            position = self._call(call["name"], int(call["n"]), call["cls"])
            record = self.calls[position]
            if call["phase"] == "forward":
                self.entry_names[name] = position
                record.inputs = self._tensors(name, entry.get("input_args", []))
                record.outputs = self._tensors(name, entry.get("output", []))
            else:
                record.grad_outputs = self._tensors(name, entry.get("input", []))
                record.grad_inputs = self._tensors(name, entry.get("output", []))
                self.backward_order.append(position)
            return
        grads = _PARAM_GRAD.match(name)
        if grads:
            for param, value in entry.items():
                keys = [k for k in self._tensors(name, value) if k is not None]
                if keys:
                    self.param_grads[f"{grads['name']}.{param}"] = keys[0]

    def _call(self, module: str, index: int, cls: str) -> int:
        key = (module, index)
        if key not in self.positions:
            self.positions[key] = len(self.calls)
            self.calls.append(Call(module=module, index=index, cls=cls, parent=None))
        return self.positions[key]

    def _tensors(self, entry: str, value: Any) -> list[str | None]:
        """Flatten nested args to tensor keys in order; None for non-tensor values."""
        if isinstance(value, list):
            return [key for item in value for key in self._tensors(entry, item)]
        if not isinstance(value, dict) or value.get("type") != "torch.Tensor":
            return [None]
        data_name = value.get("data_name")
        if data_name is None:
            raise TraceError(
                f"{self.dump_file}: {entry} records tensor statistics without a tensor "
                "file (data_name); a statistics dump cannot be compared layer by layer: "
                'dump again with "task": "tensor"'
            )
        self._check_name(entry, data_name)
        if not (self.tensor_dir / data_name).is_file():
            raise TraceError(
                f"{self.dump_file}: {entry} refers to {TENSOR_DIR}/{data_name}, which is "
                "missing; the dump is incomplete"
            )
        self.specs[data_name] = {"shape": value.get("shape"), "dtype": value.get("dtype")}
        return [data_name]

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

    def link_parents(self, construct: dict[str, Any]) -> None:
        for name, position in self.entry_names.items():
            parent = construct.get(name)
            if isinstance(parent, list):  # Megatron runs record [parent, micro step]
                parent = parent[0] if parent else None
            self.calls[position].parent = (
                self.entry_names.get(parent) if isinstance(parent, str) else None
            )


class _PtTensors:
    """Tensors read lazily from msprobe's .pt files with torch.load(weights_only=True)."""

    def __init__(self, tensor_dir: Path, specs: dict[str, dict[str, Any]]):
        self.tensor_dir = tensor_dir
        self.specs = specs

    def __getitem__(self, key: str) -> torch.Tensor:
        spec = self.specs[key]
        path = self.tensor_dir / key
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
        if (spec["shape"] is not None and list(tensor.shape) != list(spec["shape"])) or (
            spec["dtype"] is not None and str(tensor.dtype) != spec["dtype"]
        ):
            raise TraceError(
                f"{path}: is {tuple(tensor.shape)} {tensor.dtype} but dump.json says "
                f"{spec['shape']} {spec['dtype']}: the dump is inconsistent"
            )
        return tensor

    def __contains__(self, key: str) -> bool:
        return key in self.specs


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
