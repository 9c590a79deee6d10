"""Start the workers of a full run through torch's elastic launcher, the engine of torchrun.

One node: a standalone c10d rendezvous on localhost (torchrun --standalone). Several
nodes: the static rendezvous at --master-addr:--master-port with --node-rank (torchrun's
default). No restarts: a rank that raises or dies ends the run, the other ranks are
stopped, and the error names the rank, its message and its log.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from align.errors import AlignError
from align.train.options import RunOptions
from align.train.worker import run_worker

DEFAULT_MASTER_PORT = 29500  # torchrun's
# The signals torch's elastic agent takes over for good when it starts the workers
# (PContext.start in torch/distributed/elastic/multiprocessing/api.py): these four, and
# in newer torch (2.14 here) those TORCHELASTIC_SIGNALS_TO_HANDLE names, these by default.
ELASTIC_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


class WorkerFailedError(AlignError):
    """A training rank raised or died; the message names it and says where its log is."""


def launch_config(opts: RunOptions) -> LaunchConfig:
    """The elastic LaunchConfig for `opts`: cards_per_node workers on each of nnodes."""
    if opts.nnodes == 1 and opts.master_port is None:
        rendezvous: dict[str, Any] = {"rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0"}
    else:
        port = opts.master_port or DEFAULT_MASTER_PORT
        rendezvous = {
            "rdzv_backend": "static",
            "rdzv_endpoint": f"{opts.master_addr}:{port}",
            "rdzv_configs": {"rank": opts.node_rank},
        }
    return LaunchConfig(
        min_nodes=opts.nnodes,
        max_nodes=opts.nnodes,
        nproc_per_node=opts.cards_per_node,
        run_id=f"align-{opts.case}-{uuid.uuid4().hex[:8]}",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(opts.work_dir / "elastic")),
        **rendezvous,
    )


def launch(opts: RunOptions) -> dict[str, Any] | None:
    """Train on every rank; rank 0's report (None on a node other than node 0)."""
    opts.work_dir.mkdir(parents=True, exist_ok=True)
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # its failure lines are replaced by ours
    try:
        with _signal_handlers_restored():
            results = elastic_launch(launch_config(opts), run_worker)(opts)
    except ChildFailedError as e:
        raise WorkerFailedError(describe_failure(e, opts)) from None
    except SignalException as e:  # Ctrl-C or a kill: the agent has stopped the ranks
        raise AlignError(
            f"stopped by {e.sigval.name}; this node's ranks were stopped. Add --resume to "
            f"continue from the last checkpoint in {opts.work_dir}"
        ) from None
    finally:
        elastic_log.setLevel(level)
    return results.get(0)


@contextmanager
def _signal_handlers_restored() -> Iterator[None]:
    """Put back the handlers the elastic agent replaces, so that after a launch Ctrl-C and
    SIGTERM reach the caller (pytest, a notebook) again instead of torch's handler."""
    names = [*ELASTIC_SIGNALS, *os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "").split(",")]
    signals = {getattr(signal, name.strip(), None) for name in names}
    saved = {
        sig: signal.getsignal(sig)
        for sig in signals
        if isinstance(sig, signal.Signals)
        and threading.current_thread() is threading.main_thread()  # else torch sets none
    }
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(sig, handler)


def describe_failure(error: ChildFailedError, opts: RunOptions) -> str:
    """Which rank failed first and why, the others, and where the logs are."""
    first_rank, first = error.get_first_failure()
    lines = [f"training failed on rank {first_rank}: {_reason(first)}"]
    lines += [
        f"  rank {rank} also failed: {_reason(failure)}"
        for rank, failure in sorted(error.failures.items())
        if rank != first_rank
    ]
    lines.append(f"  log: {opts.work_dir / f'rank{first_rank}.log'}")
    lines.append(
        f"  the other ranks were stopped; fix the cause and add --resume to continue "
        f"from the last checkpoint in {opts.work_dir}"
    )
    return "\n".join(lines)


def _reason(failure: Any) -> str:
    message = failure.message
    if isinstance(message, dict):  # an error file whose format the launcher did not parse
        message = message.get("message", message)
    message = str(message).strip() or "no message"
    return f"{message} (exit code {failure.exitcode}, pid {failure.pid})"
