"""Launching: rendezvous choice, a failing or stopped rank ends the run fast with a clear
message, and the caller's signal handlers survive the launch."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from align.errors import AlignError
from align.train.launch import WorkerFailedError, launch, launch_config
from align.train.options import RunOptions
from align.zoo import get_case

RECIPE = get_case("digits").recipe
# torch's elastic agent replaces these for good unless launch() puts them back
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _handlers() -> dict[signal.Signals, object]:
    return {sig: signal.getsignal(sig) for sig in SIGNALS}


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
    before = _handlers()
    start = time.monotonic()
    with pytest.raises(WorkerFailedError) as info:
        launch(_opts(tmp_path))
    assert _handlers() == before  # Ctrl-C and SIGTERM reach pytest again
    message = str(info.value)
    assert message.startswith("training failed on rank 1: RuntimeError: injected fault")
    assert str(tmp_path / "rank1.log") in message and "--resume" in message
    assert "injected fault" in (tmp_path / "rank1.log").read_text()  # the traceback
    assert time.monotonic() - start < 90


@pytest.mark.timeout(120)
def test_sigterm_stops_the_ranks_and_says_how_to_resume(tmp_path):
    def stop_once_training() -> None:  # rank0.log: the agent's handlers are in place
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if (tmp_path / "rank0.log").exists():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.1)

    before = _handlers()
    threading.Thread(target=stop_once_training, daemon=True).start()
    with pytest.raises(AlignError, match=f"stopped by SIGTERM.*--resume .*{tmp_path}"):
        launch(_opts(tmp_path))
    assert _handlers() == before
