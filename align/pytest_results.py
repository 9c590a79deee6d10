"""Pytest side of `--align-report DIR`: one result JSON per test and its JUnit properties.

conftest.py calls `record_result(item, report.to_dict() + metadata, directory)` for each
alignment test; `python -m align.report DIR` then reads the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from align.report.files import write_atomic

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NAME_CHARS = 120


def result_filename(nodeid: str) -> str:
    """`<sanitized nodeid>.<8 hex of its sha1>.json`: safe, readable, distinct per node id."""
    readable = _UNSAFE.sub("_", nodeid).strip("._")[:_NAME_CHARS] or "test"
    digest = hashlib.sha1(nodeid.encode("utf-8")).hexdigest()[:8]
    return f"{readable}.{digest}.json"


def _divergence_text(div: dict[str, Any]) -> str:
    return " ".join(str(div.get(k)) for k in ("module", "phase", "tensor") if div.get(k))


def record_result(item: Any, report_dict: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write the result atomically to `directory` and add its key figures as JUnit properties."""
    result = {**report_dict, "nodeid": item.nodeid}
    path = write_atomic(
        Path(directory) / result_filename(item.nodeid), json.dumps(result, indent=1, default=str)
    )
    properties = [("align_passed", str(bool(result.get("passed"))).lower())]
    culprits = result.get("culprits") or []
    if culprits:
        properties.append(("align_culprit", _divergence_text(culprits[0])))
    first = result.get("first_divergence")
    if first:
        properties += [
            ("align_first_divergence", _divergence_text(first)),
            ("align_first_divergence_metric", str(first.get("metric"))),
            ("align_first_divergence_value", str(first.get("value"))),
            ("align_first_divergence_limit", str(first.get("limit"))),
        ]
    item.user_properties.extend(properties)
    return path
