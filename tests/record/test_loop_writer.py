"""align.Recorder's background writer: the same dump as a synchronous write, errors raised
in the loop, the dump complete when the loop is done, one step held in memory, its tensors
streamed to disk while it runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import align
from align.errors import AlignError
from align.record import loop, writer
from align.record.loop_dump import LoopDump

ROOT = Path(__file__).resolve().parents[2]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train(rec: align.Recorder, model: nn.Module, opt, steps: int, start: int = 0) -> None:
    torch.manual_seed(1)
    for step in range(start, start + steps):
        x = torch.randn(5, 6)
        with rec.step(step):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()


def _record(out: Path, steps=(0, 1, 2), train: int = 4, **kwargs) -> align.Recorder:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = align.Recorder(model, out, steps=steps, optimizer=opt, **kwargs)
    _train(rec, model, opt, train)
    return rec


@pytest.fixture
def slow_writes(monkeypatch) -> list[int]:
    """Each step's write starts late, so the loop has gone on (and changed its tensors)."""
    written = []
    write = loop._write_step

    def slow(trace, state, info, *rest):
        time.sleep(0.2)
        write(trace, state, info, *rest)
        written.append(info["step"])

    monkeypatch.setattr(loop, "_write_step", slow)
    return written


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_background_dump_is_the_synchronous_dump_bit_for_bit(tmp_path, slow_writes):
    _record(tmp_path / "sync", background=False)
    _record(tmp_path / "background")
    sync, background = _files(tmp_path / "sync"), _files(tmp_path / "background")
    assert sorted(sync) == sorted(background)
    assert "rank0/step000002/state.safetensors" in sync
    for name, data in sync.items():
        if name.endswith("step.json"):  # all but the seconds the step took
            mine, theirs = json.loads(data), json.loads(background[name])
            assert mine.pop("seconds") > 0 and theirs.pop("seconds") > 0
            assert mine == theirs, name
        else:
            assert data == background[name], name  # safetensors files byte for byte
    assert slow_writes == [0, 1, 2, 0, 1, 2]


def test_recorded_tensors_are_private_copies(tmp_path, monkeypatch):
    gate, write = threading.Event(), loop._write_step

    def gated(*args):
        assert gate.wait(60)
        write(*args)

    monkeypatch.setattr(loop, "_write_step", gated)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = align.Recorder(model, tmp_path / "d", steps=[0, 9], optimizer=opt)
    _train(rec, model, opt, 1)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = opt.state[model[0].weight]["momentum_buffer"].clone()
    _train(rec, model, opt, 3, start=1)  # while step 0 waits to be written
    gate.set()
    rec.close()
    step = LoopDump(tmp_path / "d").load(0, 0)
    assert torch.equal(step.state["param/0.weight"], after["0.weight"])
    assert torch.equal(step.state["buffer/1.running_mean"], after["1.running_mean"])
    assert torch.equal(step.state["optim/0/0.weight/momentum_buffer"], momentum)
    assert not torch.equal(model[0].weight.detach(), after["0.weight"])


def test_dump_is_complete_after_the_last_recorded_step_or_close(tmp_path, slow_writes):
    rec = _record(tmp_path / "last", steps=[0, 1, 2], train=3)
    assert LoopDump(tmp_path / "last").steps(0) == [0, 1, 2]  # no close(): the last step
    assert not rec._writer._thread  # the writer thread is gone
    # a loop that stops before its last recorded step: close() at the end of `with`
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with align.Recorder(model, tmp_path / "early", steps=range(10), optimizer=opt) as rec:
        _train(rec, model, opt, 3)
    dump = LoopDump(tmp_path / "early")
    assert dump.steps(0) == [0, 1, 2]
    assert all(dump.load(0, n).trace.param_grads for n in range(3))
    rec = _record(tmp_path / "flush", steps=[0, 9], train=1)
    rec.flush()
    assert LoopDump(tmp_path / "flush").steps(0) == [0]
    rec.close()


def test_dump_is_complete_at_interpreter_exit(tmp_path):
    script = textwrap.dedent(
        f"""
        import time, torch
        import align
        from align.record import loop, writer
        write = loop._write_step
        def slow(*args):
            time.sleep(0.3)
            write(*args)
        loop._write_step = slow
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        rec = align.Recorder(model, {str(tmp_path / "d")!r}, steps=[0, 1, 5])
        for step in range(2):
            with rec.step(step):
                model(torch.randn(4, 3)).sum().backward()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert LoopDump(tmp_path / "d").steps(0) == [0, 1]


def test_a_reader_in_the_process_waits_for_the_steps_being_written(tmp_path, monkeypatch):
    write = loop._write_step

    def slow(*args):
        time.sleep(0.5)
        write(*args)

    monkeypatch.setattr(loop, "_write_step", slow)
    ref = _record(tmp_path / "ref", steps=[0, 1, 9], train=2)  # no close: steps 0, 1 pending
    assert not (tmp_path / "ref/rank0/step000001").exists()
    # a target taking the reference's choices reads them once they are written
    target = _record(tmp_path / "tgt", steps=[0, 1], train=2, replay=tmp_path / "ref")
    assert target.steps == {0, 1} and LoopDump(tmp_path / "tgt").steps(0) == [0, 1]
    assert LoopDump(tmp_path / "ref").steps(0) == [0, 1]
    ref.close()


def _failing(monkeypatch, bad: int) -> threading.Event:
    """Make the write of step `bad` fail; the event is set once it has."""
    failed = threading.Event()
    write = loop._write_step

    def flaky(trace, state, info, *rest):
        if info["step"] == bad:
            failed.set()
            raise OSError(28, "No space left on device")
        write(trace, state, info, *rest)

    monkeypatch.setattr(loop, "_write_step", flaky)
    return failed


def test_failed_write_is_raised_at_the_next_step_naming_it(tmp_path, monkeypatch):
    failed = _failing(monkeypatch, bad=1)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = align.Recorder(model, tmp_path / "d", steps=[0, 1, 2, 3], optimizer=opt)
    _train(rec, model, opt, 2)
    assert failed.wait(60)
    while rec._writer._queue.unfinished_tasks:  # until the writer is done with step 1
        time.sleep(0.01)
    with pytest.raises(AlignError, match=r"step000001: writing recorded step 1 failed") as err:
        _train(rec, model, opt, 2, start=2)
    assert isinstance(err.value.__cause__, OSError)
    assert "No space left on device" in str(err.value)
    rec.close()  # raised once: nothing more to raise
    assert LoopDump(tmp_path / "d").steps(0) == [0]
    # the failed step and the one queued behind it leave nothing, not even hidden
    assert sorted(p.name for p in (tmp_path / "d" / "rank0").iterdir()) == [
        "loop.json",
        "step000000",
    ]


def test_failed_write_is_raised_at_close_or_by_the_last_step(tmp_path, monkeypatch):
    _failing(monkeypatch, bad=2)
    with pytest.raises(AlignError, match="writing recorded step 2 failed"):
        _record(tmp_path / "last", steps=[0, 1, 2], train=3)  # the last step flushes
    assert LoopDump(tmp_path / "last").steps(0) == [0, 1]
    rec = _record(tmp_path / "close", steps=[2, 7], train=3)
    with pytest.raises(AlignError, match=r"step000002: writing recorded step 2 failed"):
        rec.close()
    with pytest.raises(AlignError, match="writing recorded step 2 failed"):
        _record(tmp_path / "sync", steps=[2, 7], train=3, background=False)  # at once


@pytest.mark.parametrize("held", [1, 2])
def test_held_steps_stream_their_tensors_and_the_next_waits(tmp_path, monkeypatch, held):
    gate, write = threading.Event(), loop._write_step
    writing: list[int] = []

    def gated(trace, state, info, *rest):
        writing.append(info["step"])
        assert gate.wait(60)
        write(trace, state, info, *rest)

    monkeypatch.setattr(loop, "_write_step", gated)
    monkeypatch.setattr(writer, "STREAM_SHARD_BYTES", 256)  # a shard every few tensors
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = align.Recorder(model, tmp_path / "d", steps=range(5), optimizer=opt, steps_in_memory=held)
    entered: list[int] = []

    def train() -> None:
        torch.manual_seed(1)
        for step in range(5):
            with rec.step(step):
                entered.append(step)
                model(torch.randn(5, 6)).square().mean().backward()
                opt.step()

    loop_thread = threading.Thread(target=train)
    loop_thread.start()
    deadline = time.monotonic() + 60
    while (not writing or len(entered) < held) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # time enough to enter the next steps, were it allowed
    # step 0's shards were written while it ran; the rest of it waits at the gate, and the
    # step `held` waits for it at its start: `held` steps in memory
    assert (writing, entered) == ([0], list(range(held)))
    shards = list((tmp_path / "d" / "rank0").glob(".step000000.*/trace/tensors-*.safetensors"))
    assert len(shards) > 3, shards
    gate.set()
    loop_thread.join(60)
    assert not loop_thread.is_alive()
    assert entered == [0, 1, 2, 3, 4] and writing == [0, 1, 2, 3, 4]
    assert LoopDump(tmp_path / "d").steps(0) == [0, 1, 2, 3, 4]
