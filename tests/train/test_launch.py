"""Launching: rendezvous choice, and a failing rank ends the run fast with a clear message."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from align.cases import get_case
from align.train.launch import WorkerFailedError, launch, launch_config
from align.train.options import RunOptions

RECIPE = get_case("digits").recipe


def _opts(tmp_path: Path, **kw) -> RunOptions:
    return RunOptions(
        case="digits",
        recipe=RECIPE,
        documented=RECIPE,
        device="cpu",
        backend="gloo",
        work_dir=tmp_path,
        cards_per_node=2,
        **kw,
    )


def test_one_node_is_standalone_and_several_are_static(tmp_path):
    one = launch_config(_opts(tmp_path))
    assert (one.rdzv_backend, one.rdzv_endpoint, one.max_restarts) == ("c10d", "localhost:0", 0)
    assert one.nproc_per_node == 2 and one.min_nodes == one.max_nodes == 1
    two = launch_config(_opts(tmp_path, nnodes=2, node_rank=1, master_addr="10.0.0.1"))
    assert (two.rdzv_backend, two.rdzv_endpoint) == ("static", "10.0.0.1:29500")
    assert two.rdzv_configs["rank"] == 1 and two.min_nodes == 2


@pytest.mark.timeout(120)
def test_a_rank_that_raises_ends_the_run_with_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_FAULT", "1:3")  # rank 1 raises after its 3rd iteration
    start = time.monotonic()
    with pytest.raises(WorkerFailedError) as info:
        launch(_opts(tmp_path))
    message = str(info.value)
    assert message.startswith("training failed on rank 1: RuntimeError: injected fault")
    assert str(tmp_path / "rank1.log") in message and "--resume" in message
    assert "injected fault" in (tmp_path / "rank1.log").read_text()  # the traceback
    assert time.monotonic() - start < 90
