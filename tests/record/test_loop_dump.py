"""align.record.loop_dump: a Recorder dump read back rank by rank and step by step, and
what a reader says of a dump that is not one or is inconsistent."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import align
from align.errors import TraceError
from align.record.loop_dump import LoopDump, is_dump


@pytest.fixture
def dump(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    weights = {}
    with align.Recorder(model, tmp_path / "d", steps=[1, 2], optimizer=opt) as rec:
        for n in range(3):
            weights[n] = {k: v.clone() for k, v in model.state_dict().items()}
            with rec.step(n):
                model(torch.randn(5, 4)).square().mean().backward()
                opt.step()
                opt.zero_grad()
    return tmp_path / "d", weights


def test_steps_and_the_weights_each_started_from(dump):
    root, weights = dump
    assert is_dump(root) and not is_dump(root / "rank0")
    read = LoopDump(root)
    assert list(read.ranks) == [0] and read.steps(0) == [1, 2]
    for n in (1, 2):  # step 1 from its `before/` state, step 2 from step 1's parameters
        before = read.weights_before(0, n)
        assert before.keys() == weights[n].keys()
        assert all(torch.equal(before[k], weights[n][k]) for k in before)
    step = read.load(0, 2)
    assert step.number == 2 and step.trace.calls[0].module == "" and "loss" in step.state


def test_what_is_not_a_dump_or_not_consistent_is_a_trace_error(dump, tmp_path):
    root, _ = dump
    with pytest.raises(TraceError, match="no such dump directory"):
        LoopDump(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match="no rank\\*/ directories"):
        LoopDump(tmp_path / "empty")
    step = root / "rank0" / "step000002"
    info = json.loads((step / "step.json").read_text())
    (step / "step.json").write_text(json.dumps({**info, "format": "other/1"}))
    with pytest.raises(TraceError, match="not an align.loop/1 record"):
        LoopDump(root).load(0, 2)
    (step / "step.json").write_text(json.dumps(info))
    save_file({k: torch.zeros(1) for k in info["state"]}, str(step / "state.safetensors"))
    with pytest.raises(TraceError, match="is not what step.json says"):
        LoopDump(root).load(0, 2)
