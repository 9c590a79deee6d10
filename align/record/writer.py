"""Writing recorded steps off the training loop (align.record.loop).

`StepWriter` writes on one background thread, in order, while the loop goes on. A
recorded step streams: `StepFiles` gathers its tensors into shards as the step produces
them and hands each full shard to the writer, so the step's tensors go to disk while the
step runs; what is left (the last shard, the parameters and optimizer state after the
step, the records) is written once it ends, and the step's directory renamed into place.
At most `held` steps are in memory at once: a recorded step waits at its start until the
writer has room (`held` 1: until it has finished the one before). A failed write is raised in the
loop, at the next `rec.step()` or at `flush` / `close`. A reader of a dump in the same
process first waits for its steps (`wait_for_writes`).
"""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from align.errors import AlignError
from align.files import place_dir, staging_dir
from align.record.buffers import HostBuffers
from align.record.trace import ShardWriter

STREAM_SHARD_BYTES = 64 << 20  # a recorded step's tensors go to disk in shards this size
_ACTIVE: set[StepWriter] = set()  # writers with a thread: steps may still be unwritten


@dataclass
class _Job:
    step: int
    directory: Path
    write: Callable[[], object]  # writes (part of) the step to `directory`
    last: bool = True  # the step's last job: it frees the step's room
    dropped: Callable[[], object] | None = None  # undoes its parts, when a failure skips it


class StepWriter:
    """Writes recorded steps under `root` in order: on one daemon thread (`background`) or
    at once."""

    def __init__(self, root: Path, background: bool, held: int) -> None:
        self.root, self.background = Path(os.path.abspath(root)), background
        self._room = threading.Semaphore(held)  # recorded steps in memory at once
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the three below, set on the writer thread
        self._error: AlignError | None = None
        self._dropped: list[int] = []
        self._failed: int | None = None  # the step whose write failed

    def reserve(self) -> None:
        """Wait for room for one more step in memory; `cancel` or `submit` it after."""
        self._room.acquire()

    def cancel(self, step: int, directory: Path, clean: Callable[[], object]) -> None:
        """The reserved step failed: `clean` what its parts wrote, after them."""
        self._enqueue(_Job(step, directory, clean, dropped=clean))

    def submit_part(self, step: int, directory: Path, write: Callable[[], object]) -> None:
        """Write part of the reserved step (a shard), now or on the writer thread."""
        self._enqueue(_Job(step, directory, write, last=False))

    def submit(
        self,
        step: int,
        directory: Path,
        write: Callable[[], object],
        dropped: Callable[[], object] | None = None,
    ) -> None:
        """Write the rest of the reserved step, now or on the writer thread (started if need
        be); its room is free once that is done. `dropped` runs instead when an earlier
        failure skips it."""
        self._enqueue(_Job(step, directory, write, dropped=dropped))

    def _enqueue(self, job: _Job) -> None:
        if not self.background:
            self._run(job)
            self.check()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="align-writer", daemon=True)
            self._thread.start()
            atexit.register(self.close)
            _ACTIVE.add(self)
        self._queue.put(job)

    def check(self) -> None:
        """Raise (once) the error of a failed write, if one failed."""
        with self._lock:
            error, dropped = self._error, self._dropped
            self._error, self._dropped = None, []
        if error is not None:
            if dropped:
                error.add_note(f"steps {dropped}, queued after it, were not written")
            raise error

    def wait(self) -> None:
        """Wait until every submitted step is written."""
        self._queue.join()

    def flush(self) -> None:
        """Wait until every submitted step is written; raise a failed write's error."""
        self.wait()
        self.check()

    def close(self) -> None:
        """Flush, then stop the thread (a later `submit` starts another)."""
        try:
            self.flush()
        finally:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                self._thread = None
                atexit.unregister(self.close)
                _ACTIVE.discard(self)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            self._run(job)
            del job  # its tensors are freed now, not when the next step comes
            self._queue.task_done()
        self._queue.task_done()

    def _run(self, job: _Job) -> None:
        """Write one step; after a failure, drop the steps queued behind it until it is raised."""
        with self._lock:
            failed = self._error is not None
            if failed and job.step not in self._dropped + [self._failed]:
                self._dropped.append(job.step)
        try:
            if not failed:
                job.write()
            elif job.dropped is not None:
                job.dropped()
        except BaseException as exc:  # raised in the loop: nothing may be lost here
            error = AlignError(
                f"{job.directory}: writing recorded step {job.step} failed: "
                f"{type(exc).__name__}: {exc}"
            )
            error.__cause__ = exc
            with self._lock:
                self._error, self._failed = error, job.step
        finally:
            if job.last:
                self._room.release()


def wait_for_writes(dump: str | os.PathLike) -> None:
    """Wait until this process has written every step it recorded under `dump`, so that
    a reader sees the dump whole (a failed write is still raised in its own loop)."""
    dump = Path(os.path.abspath(dump))
    for writer in list(_ACTIVE):
        if writer.root.is_relative_to(dump):
            writer.wait()


class StepFiles:
    """One recorded step's directory while the step runs: a hidden temporary sibling of
    `directory` (align.files.staging_dir), whose trace shards `add` fills as tensors come
    and `writer` writes as each fills; `finish` writes the rest and renames it into place,
    `abandon` removes it. A killed process leaves only the hidden sibling."""

    def __init__(
        self,
        directory: Path,
        step: int,
        writer: StepWriter,
        buffers: HostBuffers,
        *,
        marker: str,
        trace_dir: str,
    ):
        self.directory, self.step, self.writer, self.buffers = directory, step, writer, buffers
        self.tmp = staging_dir(directory, marker, "step")
        (self.tmp / trace_dir).mkdir()
        self.shards = ShardWriter(self._save_shard, STREAM_SHARD_BYTES)
        self._trace_dir = self.tmp / trace_dir

    def add(self, key: str, t: torch.Tensor) -> None:
        """A private host copy of a recorded tensor (given to `buffers` once written)."""
        self.shards.add(key, t)

    def finish(self, write: Callable[[Path], object]) -> None:
        """Write the last shard, then `write(tmp)` the rest, then put the step in place."""
        self.shards.flush()

        def rest() -> None:
            try:
                write(self.tmp)
                place_dir(self.tmp, self.directory)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise

        self.writer.submit(self.step, self.directory, rest, dropped=self._remove)

    def abandon(self) -> None:
        """The step failed: nothing of it stays on disk (once the writer has removed what
        it wrote, which the loop waits for)."""
        self.writer.cancel(self.step, self.directory, self._remove)
        self.writer.wait()

    def _remove(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _save_shard(self, name: str, shard: dict[str, torch.Tensor]) -> None:
        def write() -> None:
            save_file({k: t.contiguous() for k, t in shard.items()}, str(self._trace_dir / name))
            self.buffers.give(shard.values())

        self.writer.submit_part(self.step, self.directory, write)
