"""Writing recorded steps off the training loop (align.record.loop).

`StepWriter` writes each step on one background thread, in order, while the loop goes on.
At most `HELD` steps are in memory at once (the one being written and the one being
recorded): a recorded step waits at its start until the writer has room. A failed write
is raised in the loop, at the next `rec.step()` or at `flush` / `close`. A reader of a dump
in the same process first waits for its steps (`wait_for_writes`).
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from align.errors import AlignError

HELD = 2  # steps in memory at once: the one being written, the one being recorded
_ACTIVE: set[StepWriter] = set()  # writers with a thread: steps may still be unwritten


@dataclass
class _Job:
    step: int
    directory: Path
    write: Callable[[], object]  # writes the step to `directory`


class StepWriter:
    """Writes recorded steps under `root` in order: on one daemon thread (`background`) or
    at once."""

    def __init__(self, root: Path, background: bool) -> None:
        self.root, self.background = Path(os.path.abspath(root)), background
        self._room = threading.Semaphore(HELD)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the two below, set on the writer thread
        self._error: AlignError | None = None
        self._dropped: list[int] = []

    def reserve(self) -> None:
        """Wait for room for one more step in memory; `cancel` or `submit` it after."""
        self._room.acquire()

    def cancel(self) -> None:
        """The reserved step failed: there is nothing to write."""
        self._room.release()

    def submit(self, step: int, directory: Path, write: Callable[[], object]) -> None:
        """Write the reserved step, now or on the writer thread (started if need be)."""
        job = _Job(step, directory, write)
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
            if failed:
                self._dropped.append(job.step)
        try:
            if not failed:
                job.write()
        except BaseException as exc:  # raised in the loop: nothing may be lost here
            error = AlignError(
                f"{job.directory}: writing recorded step {job.step} failed: "
                f"{type(exc).__name__}: {exc}"
            )
            error.__cause__ = exc
            with self._lock:
                self._error = error
        finally:
            self._room.release()


def wait_for_writes(dump: str | os.PathLike) -> None:
    """Wait until this process has written every step it recorded under `dump`, so that
    a reader sees the dump whole (a failed write is still raised in its own loop)."""
    dump = Path(os.path.abspath(dump))
    for writer in list(_ACTIVE):
        if writer.root.is_relative_to(dump):
            writer.wait()
