"""align.record.trace: the on-disk format of a trace (safetensors shards + manifest.json).

Round trips, storage of shared tensors once, atomic saves, and every way a dump that
travelled between machines can be broken or crafted: each must be a TraceError naming the
file, and nothing outside the dump directory may ever be opened.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import align
import align.record.trace as trace_mod
from align.errors import AlignError, TraceError
from align.record.readers import load_trace
from align.record.trace import MANIFEST, Call, Trace


class Net(nn.Module):
    """A container whose output is its last child's (a shared tensor), an in-place ReLU,
    a module called twice and a parameter-free op between calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(self.body[1](h - 0.25))


def _captured() -> Trace:
    torch.manual_seed(0)
    return align.capture(Net(), torch.randn(4, 6), device="cpu")


def _mixed() -> Trace:
    """An in-memory trace with every dtype the harness meets and a key used three times."""
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "t0": torch.randn(3, 5, generator=gen),
        "t1": torch.randn(2, 4, generator=gen, dtype=torch.float64),
        "t2": torch.randn(7, generator=gen).to(torch.bfloat16),
        "t3": torch.randn(2, 3, 2, generator=gen).to(torch.float16),
        "t4": torch.arange(-5, 6, dtype=torch.int64),
        "t5": torch.tensor([True, False, True]),
        "t6": torch.empty(0, 4),
        "t7": torch.tensor(3.5),  # 0-d
        "t8": torch.randn(4, 3, generator=gen).t(),  # not contiguous
    }
    calls = [
        Call(
            "",
            0,
            "Net",
            None,
            inputs=["t0"],
            outputs=["t1"],
            grad_outputs=["t2"],
            grad_inputs=[None],
        ),
        Call(
            "a",
            0,
            "Linear",
            0,
            inputs=["t0", None],
            outputs=["t1"],
            grad_outputs=["t2"],
            grad_inputs=["t3"],
        ),
        Call("a", 1, "Linear", 0, inputs=["t4", "t5"], outputs=["t6", "t7"]),
        Call("b.c", 0, "Conv2d", 0, inputs=["t8"], outputs=["t1"]),
    ]
    return Trace(
        calls=calls,
        tensors=tensors,
        param_grads={"a.weight": "t3", "b.c.bias": "t7"},
        backward_order=[0, 1],
        forward_order=[1, 2, 3, 0],
        meta={"device": "cpu", "precision": "fp32", "seed": 3, "nested": {"x": [1, 2.5, None]}},
    )


def _same_records(a: Trace, b: Trace) -> None:
    assert b.calls == a.calls
    assert b.param_grads == a.param_grads
    assert b.backward_order == a.backward_order
    assert b.backward_events == a.backward_events
    assert b.forward_order == a.forward_order
    assert b.keys() == a.keys()
    for key in a.keys():
        x, y = a.tensor(key), b.tensor(key)
        assert y.dtype == x.dtype and y.shape == x.shape, key
        assert torch.equal(y, x), key


def _shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("tensors-*.safetensors"))  # decisions.safetensors: no shard


def _manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def _write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest))


def _read_all(directory: Path) -> None:
    trace = load_trace(directory)
    for key in trace.keys():
        trace.tensor(key)


# -- round trip -------------------------------------------------------------------------


def test_round_trip_of_every_dtype_and_record(tmp_path):
    original = _mixed()
    saved = original.save(tmp_path / "dump")
    loaded = load_trace(saved)
    _same_records(original, loaded)
    assert loaded.meta == original.meta
    assert loaded.tensor("t2").dtype == torch.bfloat16
    assert loaded.tensor("t3").dtype == torch.float16
    assert loaded.tensor("t4").dtype == torch.int64
    assert loaded.tensor("t7").shape == ()
    assert loaded.modules() == ["", "a", "b.c"]
    assert [c.key for c in loaded.children(0)] == [("a", 0), ("a", 1), ("b.c", 0)]


def test_round_trip_of_a_captured_model(tmp_path):
    original = _captured()
    assert original.backward_order and original.param_grads  # a capture with backward
    loaded = load_trace(original.save(tmp_path / "dump"))
    _same_records(original, loaded)
    assert loaded.meta["seed"] == 0 and loaded.meta["precision"] == "fp32"
    assert loaded.meta["loss"] == original.meta["loss"]
    assert set(loaded.param_grads) == {n for n, _ in Net().named_parameters()}


def test_honest_draws_round_trip_and_differ_from_the_run(tmp_path):
    torch.manual_seed(0)
    original = align.capture(Net(), torch.randn(4, 6), device="cpu", draws=2)
    assert len(original.draws) == 2 and original.backward_events
    loaded = load_trace(original.save(tmp_path / "dump"))
    assert len(loaded.draws) == 2
    for mine, theirs in zip(original.draws, loaded.draws):
        _same_records(mine, theirs)
        assert theirs.meta["jitter"] is not None
    key = original.calls[-1].outputs[0]
    a, b = loaded.tensor(key), loaded.draws[0].tensor(loaded.draws[0].calls[-1].outputs[0])
    assert not torch.equal(a, b)  # jittered by about one unit roundoff
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_dump_missing_a_draw_is_refused(tmp_path):
    torch.manual_seed(0)
    path = align.capture(Net(), torch.randn(4, 6), device="cpu", draws=1).save(tmp_path / "d")
    shutil.rmtree(path / "draws" / "0")
    with pytest.raises(TraceError, match="draws"):
        load_trace(path)


class Pooled(nn.Module):
    """A max-pool and a sort: two discrete choices a dump carries (align.numerics.decisions)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        y = nn.functional.max_pool2d(self.conv(x), 2)
        return y.flatten(1).sort(dim=1).values


def test_decisions_round_trip_and_a_target_dump_replays_them(tmp_path):
    torch.manual_seed(0)
    model, x = Pooled(), torch.randn(2, 1, 8, 8)
    ref = align.capture(model, x, device="cpu")
    assert [op.split("(")[0] for op, _ in ref.decisions] == [
        "aten.max_pool2d_with_indices.default",
        "aten.sort.default",
    ]
    loaded = load_trace(ref.save(tmp_path / "ref"))
    assert [op for op, _ in loaded.decisions] == [op for op, _ in ref.decisions]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ref.decisions, loaded.decisions))
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        flipped.conv.bias += 0.1 * torch.tensor([1.0, -1.0])  # reorders the sort
    own = align.capture(flipped, x, device="cpu")
    replayed = align.capture(flipped, x, device="cpu", decisions_of=loaded)
    assert not torch.equal(own.decisions[1][1], ref.decisions[1][1])
    assert torch.equal(replayed.decisions[1][1], ref.decisions[1][1])


def test_a_dump_with_unreadable_decisions_is_refused(tmp_path):
    torch.manual_seed(0)
    path = align.capture(Pooled(), torch.randn(2, 1, 8, 8), device="cpu").save(tmp_path / "d")
    data = (path / "decisions.safetensors").read_bytes()
    (path / "decisions.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="2 discrete choices cannot be read"):
        load_trace(path)


@pytest.mark.parametrize(
    "faults",
    [{"module": "m"}, [{"module": "m", "call": "0", "op": "x", "message": ""}], [7]],
)
def test_a_dump_with_malformed_faults_is_refused(tmp_path, faults):
    path = _mixed().save(tmp_path / "d")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["faults"] = faults
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TraceError, match="'faults' must be a list"):
        load_trace(path)


def test_a_loaded_trace_saves_again_identically(tmp_path):
    first = load_trace(_mixed().save(tmp_path / "one"))
    second = load_trace(first.save(tmp_path / "two"))
    _same_records(first, second)
    # a loaded trace saved over its own directory reads its tensors before replacing it
    third = load_trace(second.save(tmp_path / "two"))
    _same_records(first, third)


def test_many_shards_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(trace_mod, "SHARD_BYTES", 64)
    original = _mixed()
    saved = original.save(tmp_path / "dump")
    assert len(_shards(saved)) >= 3
    _same_records(original, load_trace(saved))


def test_a_dump_moved_elsewhere_still_loads(tmp_path):
    original = _captured()
    saved = original.save(tmp_path / "machine_a" / "run")
    moved = tmp_path / "machine_b" / "elsewhere"
    moved.parent.mkdir()
    shutil.move(str(saved), str(moved))
    assert not saved.exists()
    _same_records(original, load_trace(moved))
    text = (moved / MANIFEST).read_text()
    assert str(tmp_path) not in text  # no recorded absolute path to the shards


def test_a_relative_directory_and_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = _mixed()
    original.save("rel")
    _same_records(original, load_trace("rel"))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    original.save(".")  # an empty current directory becomes the dump
    _same_records(original, load_trace(empty))


# -- shared tensors are stored once -----------------------------------------------------


def _raw_bytes(trace: Trace) -> int:
    return sum(trace.tensor(k).numel() * trace.tensor(k).element_size() for k in trace.keys())


def test_a_key_used_by_several_records_is_stored_once(tmp_path):
    original = _mixed()
    saved = original.save(tmp_path / "dump")
    header_budget = 1024 + 160 * len(original.keys())
    on_disk = sum(p.stat().st_size for p in _shards(saved))
    assert on_disk <= _raw_bytes(original) + header_budget
    assert len(_manifest(saved)["tensors"]) == len(original.keys()) == 9


def test_a_captured_container_output_is_its_last_childs_tensor(tmp_path):
    original = _captured()
    calls = original.by_key()
    body, relu = calls[("body", 0)], calls[("body.1", 0)]
    assert body.outputs == relu.outputs  # one tensor, two records
    head = calls[("head", 0)]
    model = calls[("", 0)]
    assert model.outputs == head.outputs
    saved = original.save(tmp_path / "dump")
    on_disk = sum(p.stat().st_size for p in _shards(saved))
    assert on_disk <= _raw_bytes(original) + 1024 + 160 * len(original.keys())
    # the raw bytes of the unique tensors are well below one copy per record
    per_record = sum(
        original.tensor(k).numel() * original.tensor(k).element_size()
        for c in original.calls
        for slot in ("inputs", "outputs", "grad_outputs", "grad_inputs")
        for k in getattr(c, slot)
        if k is not None
    )
    assert on_disk < per_record


# -- atomic save ------------------------------------------------------------------------


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _failing_save_file(monkeypatch, after: int) -> None:
    """Make the safetensors writer fail after `after` shards were written."""
    real = trace_mod.save_file
    written = []

    def flaky(tensors, filename, *args, **kwargs):
        if len(written) >= after:
            raise OSError(28, "No space left on device")
        written.append(filename)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(trace_mod, "save_file", flaky)
    monkeypatch.setattr(trace_mod, "SHARD_BYTES", 64)


def test_a_failure_mid_save_leaves_nothing(tmp_path, monkeypatch):
    _failing_save_file(monkeypatch, after=2)
    with pytest.raises(OSError, match="No space"):
        _mixed().save(tmp_path / "dump")
    assert _entries(tmp_path) == []  # no dump, no temporary directory


def test_a_failure_mid_save_keeps_the_previous_dump(tmp_path, monkeypatch):
    old = _captured()
    old.save(tmp_path / "dump")
    before = {p.name: p.read_bytes() for p in (tmp_path / "dump").iterdir()}
    _failing_save_file(monkeypatch, after=1)
    with pytest.raises(OSError):
        _mixed().save(tmp_path / "dump")
    assert _entries(tmp_path) == ["dump"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "dump").iterdir()} == before
    _same_records(old, load_trace(tmp_path / "dump"))


def test_an_interrupt_mid_save_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trace_mod, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _mixed().save(tmp_path / "dump")
    assert _entries(tmp_path) == []


def test_a_failing_final_rename_keeps_the_previous_dump(tmp_path, monkeypatch):
    old = _captured()
    old.save(tmp_path / "dump")
    real = os.replace

    def failing(src, dst, *args, **kwargs):
        if Path(dst) == tmp_path / "dump":
            raise OSError(5, "I/O error")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(trace_mod.os, "replace", failing)
    with pytest.raises(OSError, match="I/O"):
        _mixed().save(tmp_path / "dump")
    assert _entries(tmp_path) == ["dump"]
    _same_records(old, load_trace(tmp_path / "dump"))


def test_a_complete_save_replaces_the_previous_dump(tmp_path):
    _captured().save(tmp_path / "dump")
    new = _mixed()
    new.save(tmp_path / "dump")
    assert _entries(tmp_path) == ["dump"]
    _same_records(new, load_trace(tmp_path / "dump"))
    assert _entries(tmp_path / "dump") == sorted(
        [MANIFEST, *(p.name for p in _shards(tmp_path / "dump"))]
    )


def test_saving_over_a_directory_that_is_not_a_dump_is_refused(tmp_path):
    user = tmp_path / "results"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(TraceError, match="not an align trace"):
        _mixed().save(user)
    assert (user / "notes.txt").read_text() == "precious"
    assert _entries(tmp_path) == ["results"]
    a_file = tmp_path / "a_file"
    a_file.write_text("precious")
    with pytest.raises(TraceError, match="not an align trace"):
        _mixed().save(a_file)
    assert a_file.read_text() == "precious"


# -- broken and crafted dumps -----------------------------------------------------------


@pytest.fixture
def dump(tmp_path) -> Path:
    return _mixed().save(tmp_path / "dump")


def test_errors_are_align_errors_for_the_cli():
    assert issubclass(TraceError, AlignError)


def test_missing_directory_or_manifest(tmp_path, dump):
    with pytest.raises(TraceError, match="manifest.json"):
        load_trace(tmp_path / "nowhere")
    (dump / MANIFEST).unlink()
    with pytest.raises(TraceError, match=f"{dump}.*manifest.json"):
        load_trace(dump)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"\xff\xfe\x00garbage", b'{"format": "align.trace/1", "calls": ['],
)
def test_manifest_that_is_not_json(dump, content):
    (dump / MANIFEST).write_bytes(content)
    with pytest.raises(TraceError, match=f"{dump / MANIFEST}.*not valid JSON"):
        load_trace(dump)


@pytest.mark.parametrize("fmt", ["align.trace/2", None, 1, "msprobe"])
def test_wrong_format_field(dump, fmt):
    manifest = _manifest(dump)
    manifest["format"] = fmt
    _write_manifest(dump, manifest)
    with pytest.raises(TraceError, match=f"{dump / MANIFEST}.*align.trace/1"):
        load_trace(dump)


def test_a_manifest_that_is_not_an_object(dump):
    (dump / MANIFEST).write_text("[1, 2, 3]")
    with pytest.raises(TraceError, match=str(dump / MANIFEST)):
        load_trace(dump)


@pytest.mark.parametrize(
    "field, value",
    [
        ("tensors", None),
        ("tensors", ["t0"]),
        ("tensors", {"t0": "tensors-00001.safetensors"}),
        (
            "tensors",
            {
                "t0": {
                    "shard": "tensors-00001.safetensors",
                    "shape": "3x5",
                    "dtype": "torch.float32",
                }
            },
        ),
        ("calls", None),
        ("calls", ["a string"]),
        ("calls", [{"module": "a"}]),
        ("calls", [{"module": "a", "index": 0, "cls": "X", "parent": None, "bogus": 1}]),
        ("calls", [{"module": "a", "index": 0, "cls": "X", "parent": 7, "outputs": []}]),
        ("calls", [{"module": "a", "index": 0, "cls": "X", "parent": None, "outputs": [3]}]),
        ("calls", [{"module": "a", "index": 0, "cls": "X", "parent": None, "outputs": "t0"}]),
        (
            "calls",
            [{"module": "a", "index": 0, "cls": "X", "parent": None, "buffer_names": ["m"]}],
        ),
        ("calls", [{"module": "a", "index": 0, "cls": "X", "parent": None, "buffer_names": "m"}]),
        ("param_grads", ["a.weight"]),
        ("param_grads", {"a.weight": 3}),
        ("backward_order", [0, 99]),
        ("backward_order", ["first"]),
        ("forward_order", [0, -1]),
        ("forward_order", "0123"),
        ("meta", [1, 2]),
    ],
)
def test_malformed_manifest_fields(dump, field, value):
    manifest = _manifest(dump)
    if value is None:
        del manifest[field]
    else:
        manifest[field] = value
    _write_manifest(dump, manifest)
    with pytest.raises(TraceError, match=str(dump / MANIFEST)):
        load_trace(dump)


def test_records_that_refer_to_tensors_not_in_the_dump(dump):
    manifest = _manifest(dump)
    del manifest["tensors"]["t4"]
    _write_manifest(dump, manifest)
    with pytest.raises(TraceError, match=f"{dump / MANIFEST}.*t4"):
        load_trace(dump)


@pytest.mark.parametrize("cut", [1, 3, 8])
def test_a_truncated_shard(dump, cut):
    shard = _shards(dump)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-cut])
    with pytest.raises(TraceError, match=str(shard)):
        _read_all(dump)


def test_a_shard_with_a_garbage_header(dump):
    shard = _shards(dump)[0]
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])  # header length beyond the file
    with pytest.raises(TraceError, match=str(shard)):
        _read_all(dump)


def test_a_missing_shard(dump):
    shard = _shards(dump)[0]
    shard.unlink()
    with pytest.raises(TraceError, match=f"{dump / MANIFEST}.*{shard.name}.*missing"):
        load_trace(dump)


def test_a_missing_tensor_in_a_shard(dump, monkeypatch):
    manifest = _manifest(dump)
    entry = manifest["tensors"].pop("t4")
    manifest["tensors"]["t99"] = entry  # the shard has no t99
    manifest["calls"][2]["inputs"][0] = "t99"
    _write_manifest(dump, manifest)
    trace = load_trace(dump)
    with pytest.raises(TraceError, match=f"{dump / entry['shard']}.*t99"):
        trace.tensor("t99")


@pytest.mark.parametrize(
    "change",
    [
        {"shape": [5, 3]},
        {"shape": [15]},
        {"shape": []},
        {"dtype": "torch.float64"},
        {"dtype": "torch.bfloat16"},
    ],
)
def test_manifest_shape_or_dtype_disagrees_with_the_shard(dump, change):
    manifest = _manifest(dump)
    manifest["tensors"]["t0"].update(change)
    _write_manifest(dump, manifest)
    shard = dump / manifest["tensors"]["t0"]["shard"]
    trace = load_trace(dump)
    with pytest.raises(TraceError, match=f"{shard}.*t0.*manifest says"):
        trace.tensor("t0")


def _spy_on_opens(monkeypatch) -> list[str]:
    opened: list[str] = []
    real = trace_mod.safe_open

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(trace_mod, "safe_open", spy)
    return opened


@pytest.mark.parametrize(
    "name",
    [
        "../outside.safetensors",
        "../dump2/tensors-00001.safetensors",
        "sub/../../outside.safetensors",
        "/etc/passwd",
        "ABSOLUTE",
        "tensors-00001.safetensors/../../outside.safetensors",
        "..",
        "",
        None,
        7,
    ],
)
def test_shard_names_that_leave_the_dump_are_refused_unopened(tmp_path, dump, monkeypatch, name):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(_shards(dump)[0], outside)  # a valid file there, so only the check can refuse
    shutil.copytree(dump, tmp_path / "dump2")
    if name == "ABSOLUTE":
        name = str(outside)
    manifest = _manifest(dump)
    manifest["tensors"]["t0"]["shard"] = name
    _write_manifest(dump, manifest)
    opened = _spy_on_opens(monkeypatch)
    with pytest.raises(TraceError, match=f"{dump / MANIFEST}.*t0"):
        _read_all(dump)
    assert opened == []


def test_a_shard_that_links_out_of_the_dump_is_refused_unopened(tmp_path, dump, monkeypatch):
    shard = _shards(dump)[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(str(shard), str(outside))
    shard.symlink_to(outside)
    opened = _spy_on_opens(monkeypatch)
    with pytest.raises(TraceError, match=f"{dump / MANIFEST}.*{shard.name}"):
        _read_all(dump)
    assert opened == []


def test_a_dump_reached_through_a_symlinked_directory_loads(tmp_path, dump):
    link = tmp_path / "link"
    link.symlink_to(dump, target_is_directory=True)
    _same_records(_mixed(), load_trace(link))


def test_json_manifest_is_parsed_as_data_only(dump):
    manifest = _manifest(dump)
    manifest["meta"] = {"__class__": "os.system", "cmd": "touch /tmp/pwned", "py/object": "x"}
    _write_manifest(dump, manifest)
    assert load_trace(dump).meta["__class__"] == "os.system"  # a string, nothing more
