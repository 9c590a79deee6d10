"""What align's pytest plugin records of each check: JUnit properties and result files.

align/pytest_plugin.py adds `junit_properties(result)` to the test's report and, with
`--align-report DIR`, writes the result with `write_result(name, result, DIR)`;
`python -m align.report DIR` then reads the directory.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from align.files import write_json_atomic

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NAME_CHARS = 120
# what ran, as JUnit properties (align_case, align_target...) when the result has them
_RUN_KEYS = ("case", "model", "variant", "target", "phase", "precision", "reproduce")


def result_filename(nodeid: str) -> str:
    """`<sanitized nodeid>.<8 hex of its sha1>.json`: safe, readable, distinct per node id."""
    readable = _UNSAFE.sub("_", nodeid).strip("._")[:_NAME_CHARS] or "test"
    digest = hashlib.sha1(nodeid.encode("utf-8")).hexdigest()[:8]
    return f"{readable}.{digest}.json"


def _divergence_text(div: dict[str, Any]) -> str:
    return " ".join(str(div.get(k)) for k in ("module", "phase", "tensor") if div.get(k))


def write_result(name: str, result: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write `result` atomically to `directory` under `result_filename(name)`."""
    path = Path(directory) / result_filename(name)
    return write_json_atomic(path, result)


def junit_properties(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The result's key figures as JUnit properties: what ran, verdict, culprit, first
    divergence and the command that reproduces it."""
    properties = [(f"align_{key}", str(result[key])) for key in _RUN_KEYS if result.get(key)]
    properties.append(("align_passed", str(bool(result.get("passed"))).lower()))
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
    return properties
