"""align.msprobe: reading msprobe PyTorch tensor dumps written here in msprobe's format."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from align.errors import TraceError
from align.msprobe import is_msprobe_dump, load_msprobe
from align.trace import load_trace

EXECUTED: list[str] = []


class Net(nn.Module):
    """body (Sequential of Linear + ReLU) and head (Linear); the ReLU is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body[1](self.body(x) - 0.1))


def _stats(t: torch.Tensor, data_name: str | None) -> dict:
    entry = {
        "type": "torch.Tensor",
        "dtype": str(t.dtype),
        "shape": list(t.shape),
        "Max": t.max().item(),
        "Min": t.min().item(),
        "Mean": t.mean().item(),
        "Norm": t.norm().item(),
        "requires_grad": t.requires_grad,
    }
    if data_name is not None:
        entry["data_name"] = data_name
    return entry


def write_dump(directory: Path, task: str = "tensor") -> dict[str, torch.Tensor]:
    """Run Net under msprobe-like hooks and write dump.json, construct.json and .pt files.

    Returns the tensors by data name (what a correct reader must give back).
    """
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 4, requires_grad=True)
    tensor_dir = directory / "dump_tensor_data"
    tensor_dir.mkdir(parents=True)
    data: dict[str, dict] = {}
    construct: dict[str, str | None] = {}
    saved: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    stack: list[str] = []

    def record(t: torch.Tensor, name: str) -> dict:
        if task != "tensor":
            return _stats(t, None)
        saved[name] = t.detach().clone()
        torch.save(saved[name], tensor_dir / name)
        return _stats(t, name)

    def grad_hook(backward: str, slot: str, i: int):
        def hook(grad: torch.Tensor) -> None:
            entry = data.setdefault(backward, {"input": [], "output": []})
            entry[slot].append(record(grad, f"{backward}.{slot}.{i}.pt"))

        return hook

    def pre_hook(prefix: str):
        def hook(module, args):
            counts[prefix] = counts.get(prefix, -1) + 1
            name = f"{prefix}forward.{counts[prefix]}"
            construct[name] = stack[-1] if stack else None
            stack.append(name)

        return hook

    def post_hook(prefix: str):
        def hook(module, args, output):
            name = stack.pop()
            n = counts[prefix]
            data[name] = {
                "input_args": [record(a, f"{name}.input.{i}.pt") for i, a in enumerate(args)],
                "input_kwargs": {},
                "output": [record(output, f"{name}.output.0.pt")],
            }
            backward = f"{prefix}backward.{n}"
            output.register_hook(grad_hook(backward, "input", 0))
            for i, a in enumerate(args):
                a.register_hook(grad_hook(backward, "output", i))

        return hook

    for qualname, module in model.named_modules():
        if qualname:  # msprobe skips the root model
            prefix = f"Module.{qualname}.{type(module).__name__}."
            module.register_forward_pre_hook(pre_hook(prefix))
            module.register_forward_hook(post_hook(prefix))
    model(x).square().sum().backward()
    data["Module.head.Linear.parameters_grad"] = {
        "weight": [record(model.head.weight.grad, "Module.head.Linear.parameters_grad.weight.pt")]
    }
    dump = {
        "task": task,
        "level": "L0",
        "framework": "pytorch",
        "dump_data_dir": "/gone/on/npu/box",
    }
    (directory / "dump.json").write_text(json.dumps({**dump, "data": data}, indent=1))
    (directory / "construct.json").write_text(json.dumps(construct))
    return saved


@pytest.fixture
def dump(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    rank = tmp_path / "dump" / "step0" / "rank"
    return rank, write_dump(rank)


def _edit_dump_json(rank: Path, edit) -> None:
    path = rank / "dump.json"
    content = json.loads(path.read_text())
    edit(content["data"])
    path.write_text(json.dumps(content))


def test_calls_follow_msprobe_names_and_backward_convention(dump):
    rank, saved = dump
    trace = load_msprobe(rank)
    calls = [(c.module, c.index, c.cls) for c in trace.calls]
    assert calls == [
        ("body.0", 0, "Linear"),
        ("body.1", 0, "ReLU"),
        ("body", 0, "Sequential"),
        ("body.1", 1, "ReLU"),
        ("head", 0, "Linear"),
    ]
    by_key = trace.by_key()
    head = by_key[("head", 0)]
    assert trace.tensor(head.outputs[0]).shape == (2, 3)
    assert torch.equal(
        trace.tensor(head.inputs[0]), saved["Module.head.Linear.forward.0.input.0.pt"]
    )
    # backward "input" is the gradient of the forward output, "output" that of the input
    out = trace.tensor(head.outputs[0])
    assert torch.allclose(trace.tensor(head.grad_outputs[0]), 2 * out)
    assert trace.tensor(head.grad_inputs[0]).shape == trace.tensor(head.inputs[0]).shape
    assert trace.calls[trace.backward_order[0]].module == "head"
    assert set(trace.param_grads) == {"head.weight"}
    assert trace.tensor(trace.param_grads["head.weight"]).shape == (3, 8)
    assert trace.meta["source"] == "msprobe"


def test_parents_come_from_construct_json(dump):
    rank, _ = dump
    trace = load_msprobe(rank)
    parents = {
        c.label: (trace.calls[c.parent].label if c.parent is not None else None)
        for c in trace.calls
    }
    assert parents == {
        "body.0": "body",
        "body.1": "body",
        "body": None,
        "body.1#1": None,
        "head": None,
    }
    (rank / "construct.json").unlink()
    assert all(c.parent is None for c in load_msprobe(rank).calls)


@pytest.mark.parametrize("level", ["root", "step", "rank"])
def test_accepts_root_step_and_rank_directories(dump, level):
    rank, _ = dump
    path = {"root": rank.parent.parent, "step": rank.parent, "rank": rank}[level]
    assert is_msprobe_dump(path)
    assert len(load_trace(path).calls) == 5  # load_trace hands msprobe dumps over


def test_moved_dump_resolves_files_next_to_dump_json(dump, tmp_path):
    rank, _ = dump
    moved = tmp_path / "elsewhere"
    shutil.move(str(rank), moved)
    trace = load_msprobe(moved)
    assert trace.tensor(trace.calls[0].outputs[0]).shape == (2, 8)


def test_several_ranks_must_be_picked(dump):
    rank, _ = dump
    shutil.copytree(rank, rank.parent / "rank1")
    shutil.move(str(rank), rank.parent / "rank0")
    root = rank.parent.parent
    with pytest.raises(TraceError, match=r"2 msprobe dumps \(step0/rank0, step0/rank1\); pass one"):
        load_msprobe(root)
    assert len(load_msprobe(rank.parent / "rank1").calls) == 5


def test_missing_dump_json(tmp_path):
    assert not is_msprobe_dump(tmp_path)
    with pytest.raises(TraceError, match="no dump.json"):
        load_msprobe(tmp_path)
    with pytest.raises(TraceError, match="msprobe dump"):
        load_trace(tmp_path)


def test_statistics_only_dump_asks_for_a_tensor_dump(tmp_path):
    write_dump(tmp_path, task="statistics")
    with pytest.raises(TraceError, match='task: statistics.*"task": "tensor"'):
        load_msprobe(tmp_path)
    content = json.loads((tmp_path / "dump.json").read_text())
    del content["task"]  # no header: the missing data_name gives it away
    (tmp_path / "dump.json").write_text(json.dumps(content))
    with pytest.raises(TraceError, match='without a tensor file.*"task": "tensor"'):
        load_msprobe(tmp_path)


class _Payload:
    def __reduce__(self):
        return (EXECUTED.append, ("code ran",))


def test_pickled_object_is_refused_and_never_run(dump):
    rank, _ = dump
    name = "Module.head.Linear.forward.0.output.0.pt"
    torch.save(_Payload(), rank / "dump_tensor_data" / name)
    trace = load_msprobe(rank)  # lazily: the bad file is only opened when used
    with pytest.raises(TraceError, match=rf"{name}: refused.*weights_only=True") as info:
        trace.tensor(name)
    assert "it calls getattr" in str(info.value)  # how pickle reaches EXECUTED.append
    assert "weights_only=False" not in str(info.value)  # no advice to turn the guard off
    assert EXECUTED == []


def _rewrite_pickle(path: Path, old: bytes, new: bytes) -> None:
    """Edit the pickle inside a saved tensor file, as another machine might have written it."""
    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info.filename)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            target.writestr(info, data)


def test_tensors_saved_on_the_npu_load_on_a_cpu_only_machine(dump):
    rank, saved = dump
    name = "Module.head.Linear.forward.0.output.0.pt"
    # the storage location "cpu" becomes "npu:0" (pickle BINUNICODE: length-prefixed)
    _rewrite_pickle(
        rank / "dump_tensor_data" / name, b"X\x03\x00\x00\x00cpu", b"X\x05\x00\x00\x00npu:0"
    )
    tensor = load_msprobe(rank).tensor(name)
    assert tensor.device.type == "cpu" and torch.equal(tensor, saved[name])


def test_old_torch_npu_tensor_format_is_refused_with_a_hint(dump):
    rank, _ = dump
    name = "Module.head.Linear.forward.0.output.0.pt"
    old = b"torch._utils\n_rebuild_tensor_v2\n"
    _rewrite_pickle(
        rank / "dump_tensor_data" / name, old, b"torch_npu.utils.storage\n_rebuild_npu_tensor\n"
    )
    with pytest.raises(
        TraceError, match="calls torch_npu.utils.storage._rebuild_npu_tensor: written by"
    ):
        load_msprobe(rank).tensor(name)


def test_truncated_pt_is_a_clear_error(dump):
    rank, _ = dump
    name = "Module.body.0.Linear.forward.0.output.0.pt"
    path = rank / "dump_tensor_data" / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TraceError, match=rf"{name}: not a readable .pt file.*truncated"):
        load_msprobe(rank).tensor(name)


def test_pt_holding_a_dict_or_the_wrong_shape_is_refused(dump):
    rank, _ = dump
    name = "Module.head.Linear.forward.0.output.0.pt"
    torch.save({"t": torch.ones(2, 3)}, rank / "dump_tensor_data" / name)
    with pytest.raises(TraceError, match="holds a dict, not a tensor"):
        load_msprobe(rank).tensor(name)
    torch.save(torch.ones(3, 3), rank / "dump_tensor_data" / name)
    with pytest.raises(TraceError, match="inconsistent"):
        load_msprobe(rank).tensor(name)


@pytest.mark.parametrize("bad", ["../../outside.pt", "/etc/passwd", "sub/../../x.pt", "..\\x.pt"])
def test_data_names_cannot_leave_the_dump(dump, bad):
    rank, _ = dump
    (rank.parent / "outside.pt").write_bytes(b"")

    def point_outside(data):
        data["Module.head.Linear.forward.0"]["output"][0]["data_name"] = bad

    _edit_dump_json(rank, point_outside)
    with pytest.raises(TraceError, match="not a file inside dump_tensor_data/; refused"):
        load_msprobe(rank)


def test_symlink_out_of_the_dump_is_refused(dump, tmp_path):
    rank, _ = dump
    name = "Module.head.Linear.forward.0.output.0.pt"
    target = tmp_path / "secret.pt"
    torch.save(torch.ones(2, 3), target)
    (rank / "dump_tensor_data" / name).unlink()
    os.symlink(target, rank / "dump_tensor_data" / name)
    with pytest.raises(TraceError, match="refused"):
        load_msprobe(rank)


def test_missing_tensor_file_and_api_only_dump(dump):
    rank, _ = dump
    (rank / "dump_tensor_data" / "Module.head.Linear.forward.0.output.0.pt").unlink()
    with pytest.raises(TraceError, match="missing; the dump is incomplete"):
        load_msprobe(rank)

    def only_apis(data):
        data.clear()
        data["Functional.relu.0.forward"] = {"input_args": [], "output": []}

    _edit_dump_json(rank, only_apis)
    with pytest.raises(TraceError, match="level L0 or mix"):
        load_msprobe(rank)


def test_mindspore_dump_is_refused(dump):
    rank, _ = dump
    content = json.loads((rank / "dump.json").read_text())
    content["framework"] = "mindspore"
    (rank / "dump.json").write_text(json.dumps(content))
    with pytest.raises(TraceError, match="only msprobe's PyTorch dumps"):
        load_msprobe(rank)
