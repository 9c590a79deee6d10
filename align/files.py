"""Files on disk. Atomic writes: a reader sees the old file (or directory) or the new
one, never half of one; and the one guarded JSON read (`read_json`).

Every file align writes (results, reports, dumps, checkpoints' JSON) goes through here,
with one file mode: what a plain open() would give (0666, or 0777 for a directory, less
the umask), so results and reports share the permissions the user chose.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align.errors import AlignError, TraceError

__all__ = [
    "place_dir",
    "read_json",
    "replace_dir",
    "staging_dir",
    "write_atomic",
    "write_json_atomic",
]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: os.umask can only be read by setting it


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same directory and os.replace."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 1) -> Path:
    """Write `data` as JSON to `path` atomically (values JSON lacks are written as str)."""
    return write_atomic(path, json.dumps(data, indent=indent, default=str) + "\n")


def replace_dir(
    directory: str | os.PathLike, write: Callable[[Path], None], marker: str, what: str
) -> Path:
    """Fill a temporary sibling of `directory` with `write(tmp)`, then rename it into place:
    the directory is complete or untouched. A non-empty one without `marker` is refused."""
    tmp = staging_dir(directory, marker, what)
    try:
        write(tmp)
        return place_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def staging_dir(directory: str | os.PathLike, marker: str, what: str) -> Path:
    """A new hidden temporary sibling of `directory`, to fill and then `place_dir`; a
    non-empty `directory` without `marker` (not one of align's) is refused first."""
    target = Path(os.path.abspath(directory))  # "." has no name to make a sibling of
    if target.exists() or target.is_symlink():
        if not target.is_dir() or (any(target.iterdir()) and not (target / marker).is_file()):
            raise TraceError(
                f"{target}: exists and is not an align {what} (no {marker}); refusing "
                f"to replace it: write the {what} to a new or empty directory"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private
    return tmp


def place_dir(tmp: Path, directory: str | os.PathLike) -> Path:
    """Rename the filled `tmp` (from `staging_dir`) to `directory`, replacing what was there
    only once the new one is in place."""
    target = Path(os.path.abspath(directory))
    old = tmp.with_name(tmp.name + ".old")
    if target.exists():
        os.rename(target, old)  # keep the previous dump until the new one is in place
    try:
        os.replace(tmp, target)
    except BaseException:
        if old.exists():
            os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


# align's results nest 4 deep (rows[] -> row -> metrics -> value); a deeper file is not
# one of them, and nesting near the recursion limit breaks json, repr and the renderers.
MAX_JSON_DEPTH = 32


def read_json(
    path: str | os.PathLike,
    *,
    what: str = "a readable JSON result",
    error: type[AlignError] = AlignError,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """The JSON value of a file align reads; `error` ("PATH: not WHAT (why)") if it
    cannot be one. Every JSON file align reads (results, dumps' manifests and records,
    msprobe's dump.json, which nests its arguments deeper: `max_depth`) goes through here.

    Besides unreadable and malformed files this refuses what Python's json accepts but
    no align writer produces: numbers beyond float range (1e400, an integer of 400
    digits) and nesting deeper than `max_depth`. NaN and Infinity, which json.dump
    writes for non-finite metrics, are kept.
    """
    too_deep = f"nested deeper than {max_depth} levels"
    try:
        text = Path(path).read_text(encoding="utf-8")
        value = json.loads(text, parse_float=_float, parse_int=_int)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = too_deep if isinstance(exc, RecursionError) else str(exc)
        raise error(f"{path}: not {what} ({reason})") from None
    if _depth(value) > max_depth:
        raise error(f"{path}: not {what} ({too_deep})")
    return value


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # a literal such as 1e400, not json's Infinity
        raise ValueError(_out_of_range(text))
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) <= 309 and abs(value := int(text)) <= sys.float_info.max:
        return value
    raise ValueError(_out_of_range(text))  # 309 digits: also before int()'s 4300-digit limit


def _out_of_range(text: str) -> str:
    return f"number {text if len(text) <= 24 else text[:20] + '...'} is out of float range"


def _depth(value: Any) -> int:
    """How many arrays and objects deep `value` goes (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item)
    return deepest
