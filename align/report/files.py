"""Result files on disk: the one guarded JSON read every reader of results goes through
(atomic writes are align.files)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from align.errors import AlignError

# align's results nest 4 deep (rows[] -> row -> metrics -> value); a deeper file is not
# one of them, and nesting near the recursion limit breaks json, repr and the renderers.
MAX_JSON_DEPTH = 32


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value of a result file; AlignError naming the file if it cannot be one.

    Besides unreadable and malformed files this refuses what Python's json accepts but
    no align writer produces: numbers beyond float range (1e400, an integer of 400
    digits) and nesting deeper than MAX_JSON_DEPTH. NaN and Infinity, which json.dump
    writes for non-finite metrics, are kept.
    """
    too_deep = f"nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        text = Path(path).read_text(encoding="utf-8")
        value = json.loads(text, parse_float=_float, parse_int=_int)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = too_deep if isinstance(exc, RecursionError) else str(exc)
        raise AlignError(f"{path}: not a readable JSON result ({reason})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise AlignError(f"{path}: not a readable JSON result ({too_deep})")
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
