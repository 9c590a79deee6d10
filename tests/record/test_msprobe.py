"""align.record.msprobe: reading msprobe PyTorch tensor dumps written here in msprobe's format."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import zipfile
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import align
from align.errors import TraceError
from align.judge.msprobe_dumps import align_calls
from align.judge.replay import replay_draws
from align.judge.statistics import bound
from align.record.msprobe import is_msprobe_dump, load_dump, load_msprobe, statistics_only
from align.record.readers import load_trace

EXECUTED: list[str] = []


class Net(nn.Module):
    """body (Sequential of Linear + ReLU) and head (Linear); the ReLU is called twice.

    `variant` changes the API sequence as a port might: "cast" adds a Tensor.float,
    "fused" computes the shift with torch.add instead of Tensor.sub.
    """

    def __init__(self, variant: str = "") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.variant == "cast":
            h = h.float()
        h = torch.add(h, -0.1) if self.variant == "fused" else h - 0.1
        return self.head(self.body[1](h))


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


def _api_name(func) -> str:
    """msprobe's prefix for a torch callable (docs/05.data_dump_PyTorch.md prefix table)."""
    qualname = getattr(func, "__qualname__", func.__name__)
    if qualname.startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{func.__name__}"
    if getattr(func, "__module__", "") in ("torch._C._nn", "torch.nn.functional"):
        return f"Functional.{func.__name__}"
    return f"Torch.{func.__name__}"


def write_dump(
    directory: Path,
    task: str = "tensor",
    level: str = "L0",
    *,
    seed: int = 0,
    gain: tuple[str, int] | None = None,
    backward_gain: tuple[str, int] | None = None,
    honest: bool = False,
    variant: str = "",
    loss_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Run Net under msprobe-like hooks and write dump.json, construct.json, stack.json, .pt.

    level L0 records module calls, L1 API calls (construct.json then empty, as msprobe
    writes it), mix both with each API's module call in construct.json. `gain` scales
    one API call's output by 1.01 (a faulty kernel), `backward_gain` the gradients it
    sends back (a faulty backward kernel); `honest` runs in float64 and
    rounds what it records to float32 (an honest device: fp32 rounding noise only);
    `loss_scale` multiplies the loss before backward, as a GradScaler does.
    Returns the tensors by data name (what a correct reader must give back).
    """
    torch.manual_seed(seed)
    model = Net(variant)
    x = torch.randn(2, 4, requires_grad=True)
    if honest:
        model, x = model.double(), x.detach().double().requires_grad_()
    tensor_dir = directory / "dump_tensor_data"
    tensor_dir.mkdir(parents=True)
    data: dict[str, dict] = {}
    construct: dict[str, str | None] = {}
    stacks: dict[str, list[str]] = {}
    saved: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    stack: list[str] = []

    def record(t: torch.Tensor, name: str) -> dict:
        with torch._C.DisableTorchFunction():  # the dumper's own work is not an API call
            return _record(t, name)

    def _record(t: torch.Tensor, name: str) -> dict:
        needs_grad = t.requires_grad  # as msprobe writes it: the tensor's, not the copy's
        t = t.detach().float() if honest else t.detach()
        if task != "tensor":
            return {**_stats(t, None), "requires_grad": needs_grad}
        saved[name] = t.clone()
        torch.save(saved[name], tensor_dir / name)
        return {**_stats(t, name), "requires_grad": needs_grad}

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

    class ApiHooks(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = own = func(*args, **(kwargs or {}))
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return out
            api = _api_name(func)
            n = counts[api] = counts.get(api, -1) + 1
            if gain == (api, n):
                out = own * 1.01
            name = f"{api}.{n}.forward"
            if level == "mix":
                construct[name] = stack[-1] if stack else None
            frames = [f for f in inspect.stack()[1:] if f.code_context]
            stacks[name] = [  # msprobe's frame format (analyze_api_call_stack)
                f"File {f.filename}, line {f.lineno}, in {f.function}, \n "
                + f.code_context[0].strip()
                for f in frames
            ]
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            data[name] = {
                "input_args": [record(a, f"{name}.input.{i}.pt") for i, a in enumerate(tensors)],
                "input_kwargs": {},
                "output": [record(out, f"{name}.output.0.pt")],
            }
            if own.requires_grad:  # msprobe hooks the autograd node of the call's output
                backward = f"{api}.{n}.backward"
                if backward_gain == (api, n):  # a kernel whose backward alone is wrong
                    own.grad_fn.register_hook(
                        lambda grad_in, _: tuple(None if g is None else g * 1.01 for g in grad_in)
                    )
                own.grad_fn.register_hook(partial(node_hook, backward))
            return out

    def node_hook(backward: str, grad_inputs: tuple, grad_outputs: tuple) -> None:
        """msprobe's backward record: the gradient into the node as `input`, the ones it
        sends to its inputs, in its order (None where it sends none), as `output`."""
        data[backward] = {
            "input": [record(grad_outputs[0], f"{backward}.input.0.pt")],
            "output": [
                None if g is None else record(g, f"{backward}.output.{i}.pt")
                for i, g in enumerate(grad_inputs)
            ],
        }

    if level in ("L0", "mix"):
        for qualname, module in model.named_modules():
            if qualname:  # msprobe skips the root model
                prefix = f"Module.{qualname}.{type(module).__name__}."
                module.register_forward_pre_hook(pre_hook(prefix))
                module.register_forward_hook(post_hook(prefix))
    with ApiHooks() if level in ("L1", "mix") else contextlib.nullcontext():
        loss = model(x).square().sum()
    (loss * loss_scale).backward()
    if level in ("L0", "mix"):
        data["Module.head.Linear.parameters_grad.0"] = {  # .0: the step's first gradient
            "weight": [
                record(model.head.weight.grad, "Module.head.Linear.parameters_grad.0.weight.pt")
            ]
        }
    header = {"task": task, "level": level, "framework": "pytorch"}
    dump = {**header, "dump_data_dir": "/gone/on/npu/box", "data": data}
    (directory / "dump.json").write_text(json.dumps(dump, indent=1))
    (directory / "construct.json").write_text(json.dumps(construct if level != "L1" else {}))
    # msprobe's newer stack.json: {"0": [[call names], [frames]], ...}
    new_stack = {str(i): [[name], frames] for i, (name, frames) in enumerate(stacks.items())}
    (directory / "stack.json").write_text(json.dumps(new_stack))
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


def test_statistics_only_dump_is_read_without_tensors(tmp_path):
    write_dump(tmp_path, task="statistics")
    trace = load_msprobe(tmp_path)
    assert statistics_only(trace) and len(trace.calls) == 5
    head = trace.by_key()[("head", 0)]
    assert trace.tensors.stats[head.outputs[0]]["shape"] == [2, 3]
    with pytest.raises(TraceError, match='statistics-only dump.*"task": "tensor"'):
        trace.tensor(head.outputs[0])
    content = json.loads((tmp_path / "dump.json").read_text())
    del content["task"]  # no header: no data_name anywhere gives it away
    (tmp_path / "dump.json").write_text(json.dumps(content))
    assert statistics_only(load_msprobe(tmp_path))


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


def test_missing_tensor_file_and_empty_dump(dump):
    rank, _ = dump
    (rank / "dump_tensor_data" / "Module.head.Linear.forward.0.output.0.pt").unlink()
    with pytest.raises(TraceError, match="missing; the dump is incomplete"):
        load_msprobe(rank)
    _edit_dump_json(rank, dict.clear)
    with pytest.raises(TraceError, match="no module or API entries"):
        load_msprobe(rank)


def test_mindspore_dump_is_refused(dump):
    rank, _ = dump
    content = json.loads((rank / "dump.json").read_text())
    content["framework"] = "mindspore"
    (rank / "dump.json").write_text(json.dumps(content))
    with pytest.raises(TraceError, match="only msprobe's PyTorch dumps"):
        load_msprobe(rank)


# --- levels L1 and mix -----------------------------------------------------------------


def test_l1_api_calls_become_calls_named_by_msprobe_count(tmp_path):
    saved = write_dump(tmp_path, level="L1")
    trace = load_msprobe(tmp_path)
    labels = [c.label for c in trace.calls if c.outputs]
    assert labels[:5] == [
        "Functional.linear",
        "Functional.relu",
        "Tensor.sub",
        "Functional.relu#1",
        "Functional.linear#1",
    ]
    assert all(c.parent is None and c.cls == "api" for c in trace.calls)  # L1: no nesting
    head = trace.by_key()[("Functional.linear", 1)]
    key = "Functional.linear.1.forward.output.0.pt"
    assert head.outputs == [key] and torch.equal(trace.tensor(key), saved[key])
    # backward "input" is the gradient of the forward output
    assert torch.allclose(trace.tensor(head.grad_outputs[0]), 2 * saved[key])
    assert trace.meta["level"] == "L1"
    assert trace.meta["where"]["Functional.linear#1"].startswith("test_msprobe.py:")
    assert "self.head(" in trace.meta["where"]["Functional.linear#1"]


def test_mix_names_api_calls_after_their_module_and_nests_them(tmp_path):
    write_dump(tmp_path, level="mix")
    trace = load_msprobe(tmp_path)
    labels = [c.label for c in trace.calls]
    for label in (
        "body.0/Functional.linear",
        "body.1/Functional.relu",
        "head/Functional.linear",
        "body.1#1/Functional.relu",
        "Tensor.sub",
        "body.0",
        "head",
    ):
        assert label in labels
    by_label = {c.label: c for c in trace.calls}
    parent = trace.calls[by_label["head/Functional.linear"].parent]
    assert parent.label == "head" and trace.calls[by_label["body.0"].parent].label == "body"
    order = [trace.calls[p].label for p in trace.forward_order]
    assert order.index("body.0/Functional.linear") < order.index("body.0") < order.index("body")
    assert set(trace.param_grads) == {"head.weight"}


# --- comparing dumps -------------------------------------------------------------------


def _pair(tmp_path: Path, **target) -> tuple[Path, Path]:
    options = {k: target.pop(k) for k in ("task", "level") if k in target}
    ref, tgt = tmp_path / "ref", tmp_path / "tgt"
    write_dump(ref, **options)
    write_dump(tgt, **options, **target)
    return ref, tgt


@pytest.mark.parametrize("level", ["L1", "mix"])
def test_tensor_dumps_of_l1_and_mix_compare_and_name_the_faulty_api(tmp_path, level):
    ref, tgt = _pair(tmp_path, level=level)
    assert align.compare(ref, tgt).passed
    ref, tgt = _pair(tmp_path / "faulty", level=level, gain=("Functional.linear", 1))
    report = align.compare(ref, tgt)
    first = report.first_divergence
    assert not report.passed and first.phase == "forward"
    assert (first.module, first.call) == (
        ("head/Functional.linear", 0) if level == "mix" else ("Functional.linear", 1)
    )
    assert "called at test_msprobe.py:" in first.message and "self.head(" in first.message


@pytest.mark.parametrize("level", ["L1", "mix"])
def test_api_calls_rerun_from_the_dump_name_the_faulty_kernel_without_a_golden(tmp_path, level):
    """Each API call re-run in float64 from its own dumped inputs (align.judge.replay): the
    linear whose kernel is 1% off is a culprit, the calls after it, fed its output, are
    not; an honest target (float64 rounded to float32) has none."""
    ref, tgt = _pair(tmp_path / "faulty", level=level, gain=("Functional.linear", 1))
    report = align.compare(ref, tgt)
    faulty = ("head/Functional.linear", 0) if level == "mix" else ("Functional.linear", 1)
    assert [(c.module, c.call) for c in report.culprits] == [faulty]
    assert any("re-run in float64 from their dumped inputs" in n for n in report.notes)
    replayed = {r.module for r in report.local_rows}
    assert len(replayed) >= 3  # both linears and the ReLUs at least
    ref, tgt = _pair(tmp_path / "honest", level=level, honest=True)
    honest = align.compare(ref, tgt)
    assert honest.passed and not honest.culprits, honest
    assert any(r.metrics["rel_rmse"] > 0 for r in honest.local_rows)


@pytest.mark.parametrize("level", ["L1", "mix"])
def test_a_faulty_backward_kernel_is_named_by_its_float64_replay(tmp_path, level):
    """The linear whose backward alone is 1% off: its input gradients against the call
    re-run in float64 from its dumped inputs and differentiated against its dumped output
    gradient; its forward and every other call pass."""
    ref, tgt = _pair(tmp_path / "faulty", level=level, backward_gain=("Functional.linear", 1))
    report = align.compare(ref, tgt)
    faulty = ("head/Functional.linear", 0) if level == "mix" else ("Functional.linear", 1)
    assert [(c.module, c.call, c.phase) for c in report.culprits] == [(*faulty, "backward")]
    backward = [r for r in report.local_rows if r.phase == "backward"]
    assert len({r.module for r in backward}) >= 3 and all(
        r.passed for r in backward if (r.module, r.call) != faulty
    )
    ref, tgt = _pair(tmp_path / "honest", level=level, honest=True)
    honest = align.compare(ref, tgt)
    assert honest.passed and not honest.culprits, honest
    assert any(r.phase == "backward" and r.metrics["rel_rmse"] > 0 for r in honest.local_rows)


def test_statistics_honest_rounding_passes_and_a_one_percent_gain_fails(tmp_path):
    ref, tgt = _pair(tmp_path, task="statistics", level="mix", honest=True)
    report = align.compare(ref, tgt)
    assert report.passed, report
    assert any(r.metrics.get("norm_dev", 0) > 0 for r in report.rows)  # noise was there
    assert any("statistics only" in n and "much weaker" in n for n in report.notes)
    ref, tgt = _pair(
        tmp_path / "gain",
        task="statistics",
        level="mix",
        gain=("Functional.linear", 1),
        honest=True,
    )
    report = align.compare(ref, tgt)
    first = report.first_divergence
    assert not report.passed
    assert (first.module, first.phase, first.tensor) == (
        "head/Functional.linear",
        "forward",
        "output[0]",
    )
    assert first.value == pytest.approx(0.01, rel=0.05) and first.limit == bound(torch.float32)
    assert "on the target" in first.message and "called at" in first.message


@pytest.mark.parametrize("task", ["tensor", "statistics"])
def test_a_target_at_another_loss_scale_is_judged_unscaled_and_said_so(tmp_path, task):
    """Two honest devices whose GradScalers parted (2^10 and 2^9): every gradient of the
    target is half the reference's. Judged unscaled it passes, with a note naming the
    factor; a 1% backward fault under the other scale still fails, at its own call."""
    ref, tgt = tmp_path / "ref", tmp_path / "tgt"
    write_dump(ref, task, "mix", honest=True, loss_scale=1024.0)
    write_dump(tgt, task, "mix", honest=True, loss_scale=512.0)
    report = align.compare(ref, tgt)
    assert report.passed, report
    assert any("2^-1 times the reference's" in n for n in report.notes)
    assert any(r.phase == "backward" and r.passed for r in report.rows)
    faulty = tmp_path / "faulty"
    write_dump(faulty, task, "mix", loss_scale=512.0, backward_gain=("Functional.linear", 1))
    report = align.compare(ref, faulty)
    first = report.first_divergence
    assert not report.passed and first.phase == "backward"
    assert first.module.split("/")[0] == "head", first
    assert any("2^-1 times the reference's" in n for n in report.notes)


def test_a_gradient_gain_that_is_no_power_of_two_is_not_taken_for_a_loss_scale(tmp_path):
    ref, tgt = tmp_path / "ref", tmp_path / "tgt"
    write_dump(ref, "tensor", "mix", loss_scale=1024.0)
    write_dump(tgt, "tensor", "mix", loss_scale=1024.0 * 1.3)
    report = align.compare(ref, tgt)
    assert not report.passed and report.first_divergence.phase == "backward"
    assert not any("loss scale differs" in n for n in report.notes)


def test_statistics_bound_scales_with_the_dtype():
    assert bound(torch.float32) == pytest.approx(2.5e-4, rel=0.01)
    assert bound(torch.float16) == pytest.approx(4.15e-3, rel=0.01)
    assert bound(torch.bfloat16) == pytest.approx(3.15e-2, rel=0.01)
    assert bound(torch.bfloat16) > 0.01  # a 1% gain is invisible in bf16 statistics


def test_a_tensor_dump_against_a_statistics_dump_is_judged_on_statistics(tmp_path):
    ref, tgt = tmp_path / "ref", tmp_path / "tgt"
    write_dump(ref, level="L1")
    write_dump(tgt, task="statistics", level="L1")
    report = align.compare(ref, tgt)
    assert report.passed and report.meta["model"] == "msprobe statistics"


@pytest.mark.parametrize("variant", ["cast", "fused"])
def test_mismatched_api_sequences_are_aligned_and_the_rest_judged(tmp_path, variant):
    ref, tgt = _pair(tmp_path, level="mix", variant=variant)
    report = align.compare(ref, tgt)
    assert report.passed, report
    note = next(n for n in report.notes if "no counterpart" in n)
    if variant == "cast":
        assert "target only: Tensor.float" in note and "reference only" not in note
    else:
        assert "reference only: Tensor.sub" in note and "target only: Torch.add" in note
    judged = {r.module for r in report.rows}
    assert {"head/Functional.linear", "body.1#1/Functional.relu", "head"} <= judged
    ref, tgt = _pair(tmp_path / "gain", level="mix", variant=variant, gain=("Functional.linear", 1))
    assert align.compare(ref, tgt).first_divergence.module == "head/Functional.linear"


def test_align_calls_matches_by_name_and_shape_in_order(tmp_path):
    ref, tgt = _pair(tmp_path, level="L1", variant="cast")
    r, (t,), unmatched = align_calls(load_msprobe(ref), [load_msprobe(tgt)])
    assert [c.key for c in r.calls] == [c.key for c in t.calls]
    assert unmatched == ["target only: Tensor.float"]


def _multi(root: Path, faulty: tuple[int, int] | None = None, ranks=(0, 1), steps=(0, 1)):
    for step in steps:
        for rank in ranks:
            gain = ("Functional.linear", 1) if faulty == (step, rank) else None
            write_dump(
                root / f"step{step}" / f"rank{rank}",
                task="statistics",
                level="mix",
                seed=10 * step + rank,
                gain=gain,
            )


def test_multi_step_multi_rank_pairs_the_same_step_and_rank(tmp_path):
    _multi(tmp_path / "ref")
    _multi(tmp_path / "tgt")
    report = align.compare(tmp_path / "ref", tmp_path / "tgt")
    assert report.passed and report.meta["dumps"] == [
        "step0/rank0",
        "step0/rank1",
        "step1/rank0",
        "step1/rank1",
    ]
    _multi(tmp_path / "bad", faulty=(1, 1))
    report = align.compare(tmp_path / "ref", tmp_path / "bad")
    assert not report.passed and report.meta["first_failing_dump"] == "step1/rank1"
    assert report.first_divergence.module == "[step1/rank1] head/Functional.linear"
    assert "First failing: step1/rank1" in report.notes[0]
    assert "step0/rank0: ok" in report.notes[0]


def test_steps_or_ranks_on_one_side_only_are_a_note_and_none_in_common_an_error(tmp_path):
    _multi(tmp_path / "ref")
    _multi(tmp_path / "tgt", ranks=(0,))
    report = align.compare(tmp_path / "ref", tmp_path / "tgt")
    assert report.passed and report.meta["dumps"] == ["step0/rank0", "step1/rank0"]
    assert any(
        "only in the reference dump, not compared: step0/rank1, step1/rank1" in n
        for n in report.notes
    )
    _multi(tmp_path / "other", steps=(5,))
    with pytest.raises(TraceError, match="no step/rank in common"):
        align.compare(tmp_path / "ref", tmp_path / "other")


def _cli(*args: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "align.compare", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_exit_codes_on_msprobe_dumps(tmp_path):
    _multi(tmp_path / "ref", steps=(0,))
    _multi(tmp_path / "tgt", steps=(0,))
    _multi(tmp_path / "bad", faulty=(0, 1), steps=(0,))
    _multi(tmp_path / "other", steps=(3,))
    ok = _cli(tmp_path / "ref", tmp_path / "tgt")
    assert ok.returncode == 0, ok.stderr
    assert "ALIGNED" in ok.stdout and "statistics only" in ok.stdout
    bad = _cli(tmp_path / "ref", tmp_path / "bad", "--json", tmp_path / "r.json")
    assert bad.returncode == 1, bad.stderr
    assert "[step0/rank1] head/Functional.linear" in bad.stdout
    assert json.loads((tmp_path / "r.json").read_text())["first_failing_dump"] == "step0/rank1"
    none = _cli(tmp_path / "ref", tmp_path / "other")
    assert none.returncode == 2 and "no step/rank in common" in none.stderr
    assert "Traceback" not in none.stderr


# --- crafted dumps ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: e["output"][0].update(shape="abc"), "shape 'abc'|shape abc"),
        (lambda e: e["output"][0].update(shape=[1 << 30] * 3), "more than any device holds"),
        (lambda e: e["output"][0].update(shape=[-2, 3]), "not a list of at most"),
        (lambda e: e["output"][0].update(dtype=7), "dtype 7 is not a string"),
        (lambda e: e["output"][0].update(Max="big"), "Max not numbers"),
        (
            lambda e: e.update(output=[[[[e["output"]]]]] * 1 if False else _deep(40)),
            "nests arguments too deeply",
        ),
    ],
)
def test_crafted_fields_are_clear_errors(dump, edit, message):
    rank, _ = dump
    _edit_dump_json(rank, lambda data: edit(data["Module.head.Linear.forward.0"]))
    with pytest.raises(TraceError, match=message):
        load_msprobe(rank)


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_truncated_json_and_bad_stack_are_clear_errors(dump):
    rank, _ = dump
    stack = rank / "stack.json"
    stack.write_text(json.dumps({"Functional.relu.0.forward": "not frames"}))
    with pytest.raises(TraceError, match="stack of Functional.relu.0.forward is not a list"):
        load_msprobe(rank)
    stack.unlink()
    text = (rank / "dump.json").read_text()
    (rank / "dump.json").write_text(text[: len(text) // 2])
    with pytest.raises(TraceError, match="not valid JSON.*corrupt"):
        load_msprobe(rank)
    (rank / "dump.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(TraceError, match="not valid JSON"):
        load_msprobe(rank)


def test_pt_smaller_than_its_declared_shape_is_refused_unread(dump):
    rank, _ = dump
    name = "Module.head.Linear.forward.0.output.0.pt"
    _edit_dump_json(
        rank,
        lambda d: d["Module.head.Linear.forward.0"]["output"][0].update(shape=[1 << 20, 1 << 10]),
    )
    with pytest.raises(TraceError, match=rf"{name}: not a readable .pt file: it has \d+ bytes"):
        load_msprobe(rank).tensor(name)


def test_tensor_directory_linked_out_of_the_dump_is_refused(dump, tmp_path):
    rank, _ = dump
    shutil.move(str(rank / "dump_tensor_data"), tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", rank / "dump_tensor_data")
    with pytest.raises(TraceError, match="links out of the dump; refused"):
        load_msprobe(rank)


def test_pickle_in_an_l1_dump_is_never_run_through_compare(tmp_path):
    ref, tgt = _pair(tmp_path, level="L1")
    name = "Functional.linear.0.forward.output.0.pt"
    torch.save(_Payload(), tgt / "dump_tensor_data" / name)
    with pytest.raises(TraceError, match="refused.*weights_only=True"):
        align.compare(ref, tgt)
    assert EXECUTED == []


def _batch_norm_dump(
    directory: Path, layout: torch.memory_format, eps: float = 1e-5, mean: float = 6.0
) -> None:
    """An L1 dump of one Functional.batch_norm in training, as msprobe writes its arguments
    (tensors, then the bool and floats), of an input whose channel means are `mean` of its
    standard deviations; `eps` is the one the kernel uses (the dump says 1e-5)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 16, 32, 32, generator=gen) + mean).contiguous(memory_format=layout)
    dy = torch.randn(8, 16, 32, 32, generator=gen).contiguous(memory_format=layout)
    weight, bias = torch.rand(16, generator=gen) + 0.5, torch.rand(16, generator=gen) - 0.5
    inputs = [x, torch.zeros(16), torch.ones(16), weight, bias]
    leaves = [t.clone().requires_grad_(i in (0, 3, 4)) for i, t in enumerate(inputs)]
    with torch.no_grad():
        moved = [t.clone() for t in inputs]  # the running statistics, as dumped: before
    out = torch.nn.functional.batch_norm(*leaves, True, 0.1, eps)
    grads = torch.autograd.grad(out, [leaves[0], leaves[3], leaves[4]], dy)
    tensor_dir = directory / "dump_tensor_data"
    tensor_dir.mkdir(parents=True)

    def record(t: torch.Tensor, name: str, needs_grad: bool = False) -> dict:
        torch.save(t.detach().contiguous().clone(), tensor_dir / name)
        return {**_stats(t.detach(), name), "requires_grad": needs_grad}

    name = "Functional.batch_norm.0"
    data = {
        f"{name}.forward": {
            "input_args": [
                record(t, f"{name}.forward.input.{i}.pt", leaves[i].requires_grad)
                for i, t in enumerate(moved)
            ]
            + [{"type": "bool", "value": True}, {"type": "float", "value": 0.1}]
            + [{"type": "float", "value": 1e-5}],
            "input_kwargs": {},
            "output": [record(out, f"{name}.forward.output.0.pt")],
        },
        f"{name}.backward": {
            "input": [record(dy, f"{name}.backward.input.0.pt")],
            "output": [  # what its autograd node sends: input, weight, bias
                record(g, f"{name}.backward.output.{i}.pt") for i, g in enumerate(grads)
            ],
        },
    }
    dump = {"task": "tensor", "level": "L1", "framework": "pytorch", "data": data}
    (directory / "dump.json").write_text(json.dumps(dump))
    (directory / "construct.json").write_text("{}")
    (directory / "stack.json").write_text("{}")


@pytest.mark.usefixtures("one_thread")
def test_a_one_pass_batch_norm_passes_its_replay_and_a_wrong_eps_is_named(tmp_path):
    """The CPU's channels_last BatchNorm sums each channel's mean in one chain, as an
    Ascend one does: at mean / std 6 it passes, forward and backward (whose running
    statistics have no gradient: not differentiated), and a kernel with eps 1e-2 is named."""
    _batch_norm_dump(tmp_path / "ref", torch.contiguous_format)
    _batch_norm_dump(tmp_path / "cl", torch.channels_last)
    honest = align.compare(tmp_path / "ref", tmp_path / "cl")
    assert honest.passed and not honest.culprits, honest
    assert {r.phase for r in honest.local_rows} == {"forward", "backward"}
    _batch_norm_dump(tmp_path / "eps", torch.channels_last, eps=1e-2)
    report = align.compare(tmp_path / "ref", tmp_path / "eps")
    assert [c.module for c in report.culprits] == ["Functional.batch_norm"], report


@pytest.mark.usefixtures("one_thread")
def test_without_a_golden_a_one_pass_batch_norm_far_from_zero_mean_passes_the_whole_network(
    tmp_path,
):
    """Without a golden dump, whole-network tensors had dtype floors alone for limits: the
    CPU's channels_last BatchNorm at channel mean / std 30 was 2.5x the fp32 floor off the
    contiguous one, and failed. Its replay's honest draws (a one-pass kernel's error on the
    reference's inputs) widen them now; a kernel with eps 1e-2 is still named."""
    _batch_norm_dump(tmp_path / "ref", torch.contiguous_format, mean=30)
    _batch_norm_dump(tmp_path / "cl", torch.channels_last, mean=30)
    honest = align.compare(tmp_path / "ref", tmp_path / "cl")
    assert honest.passed, [r for r in honest.rows if r.failed]
    _batch_norm_dump(tmp_path / "eps", torch.channels_last, eps=1e-2, mean=30)
    report = align.compare(tmp_path / "ref", tmp_path / "eps")
    assert [c.module for c in report.culprits] == ["Functional.batch_norm"], report


def test_replay_draws_move_only_replayed_tensors_by_an_honest_kernels_error(tmp_path):
    """The first draw moves each replayed call's tensors by the reference kernel's own error
    (its tensor less the float64 replay), the second by a one-pass kernel's only where the
    call normalized by statistics; anything not replayed is the reference's own tensor."""
    _batch_norm_dump(tmp_path, torch.contiguous_format, mean=30)
    ref = load_dump(tmp_path)
    own, one_pass = replay_draws(ref, ref)
    key = ref.calls[0].outputs[0]
    exact = torch.nn.functional.batch_norm(
        *(ref.tensors[f"Functional.batch_norm.0.forward.input.{i}.pt"].double() for i in range(5)),
        True, 0.1, 1e-5,
    )  # fmt: skip
    r = ref.tensors[key].double()
    torch.testing.assert_close(own.tensor(key), r + (r - exact), rtol=0, atol=1e-12)
    moved = (one_pass.tensor(key) - r).norm() / r.norm()
    assert 1e-5 < moved < 0.05, moved  # a one-pass kernel's error at mean / std 30
    grad_output = ref.calls[0].grad_outputs[0]
    assert torch.equal(own.tensor(grad_output), ref.tensors[grad_output])  # not a result


def test_a_gradient_recorded_with_another_shape_on_one_side_is_a_note_not_a_crash(tmp_path):
    """msprobe hooks the autograd node of a call's output, which a device or layout may
    build otherwise (a channels_last adaptive_avg_pool2d's is a view's: its input gradient
    came out output-shaped): such a tensor is listed in a note and left out, the rest of
    the call and of the dump judged as usual."""
    ref, tgt = _pair(tmp_path, level="L1", honest=True)

    def reshaped(data: dict) -> None:
        entry = data["Functional.linear.1.backward"]
        entry["output"][1] = entry["input"][0]  # the input gradient, output-shaped

    _edit_dump_json(tgt, reshaped)
    report = align.compare(ref, tgt)
    assert report.passed, report
    note = next(n for n in report.notes if "other shapes on each side" in n)
    assert "Functional.linear#1 grad_inputs[1]" in note, note
    judged = {(r.module, r.call, r.tensor) for r in report.rows}
    assert ("Functional.linear", 1, "grad_input[2]") in judged  # the others are
    assert ("Functional.linear", 1, "grad_input[1]") not in judged
