"""align: cross-device accuracy alignment and regression testing for PyTorch models.

    report = align.check("resnet50", precision="amp-bf16")
    print(report)                      # verdict, first divergence, culprit layers

Layers, each importing only those above it in this list (tests/test_layout.py):
    errors.py, files.py  errors and exit codes; atomic writes
    numerics/   names, precisions, metrics, the verdict, honest draws, decisions, emulation
    runtime/    devices and the environment record
    record/     running a model into a Trace; dumps of align, Recorder loops and msprobe
    zoo/        the case registry, the cases, their golden files
    judge/      comparison, isolation, short training, step and msprobe judging, Report
    api.py      align.check, align.capture, align.compare: the public entry points
    train/      full training runs by a case's recipe (align run)
    report/     nightly HTML and Markdown reports with history (align report)
    commands/   the `align` command; check.py, compare.py, dump.py, list.py, run.py and
                golden.py here are its `python -m align.<name>` forms
    pytest_plugin.py, testing/     the pytest plugin (pytest11); honest and faulty targets for tests
docs/ARCHITECTURE.md follows one check from the command line to the verdict.
"""

import importlib
import sys
import types
from typing import Any

from align.runtime.devices import guard_npu_autoload

guard_npu_autoload()  # before torch: torch_npu without CANN must not break `import torch`

# public name -> its module, imported on first use: `import align` (and so its pytest
# plugin, loaded by every pytest run where align is installed) does not import torch
_EXPORTS = {
    "capture": "align.api",
    "CheckOptions": "align.api",
    "check": "align.api",
    "compare": "align.api",
    "decision": "align.numerics.outside",
    "get_case": "align.zoo",
    "list_cases": "align.zoo",
    "register_case": "align.zoo",
    "Recorder": "align.record.loop",
    "Report": "align.judge.report",
    "Trace": "align.record.trace",
    "load_trace": "align.record.readers",
    "Divergence": "align.numerics.verdict",
    "Tolerance": "align.numerics.verdict",
}


class _Package(types.ModuleType):
    """The align package: importing a submodule that shares a public function's name
    (align/record/capture.py, the `python -m align.check` and `align.compare` shims) must not
    replace `align.capture`, `align.check` or `align.compare`, the functions."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'align' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


__all__ = sorted(_EXPORTS)
