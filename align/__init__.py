"""align: cross-device accuracy alignment and regression testing for PyTorch models.

report = align.check("resnet50", precision="amp-bf16")
print(report)                      # verdict, first divergence, culprit layers
"""

import importlib
import sys
import types
from typing import Any

from align.devices import guard_npu_autoload

guard_npu_autoload()  # before torch: torch_npu without CANN must not break `import torch`

# public name -> its module, imported on first use: `import align` (and so its pytest
# plugin, loaded by every pytest run where align is installed) does not import torch
_EXPORTS = {
    "capture": "align.api",
    "check": "align.api",
    "compare": "align.api",
    "get_case": "align.cases",
    "list_cases": "align.cases",
    "register_case": "align.cases",
    "Recorder": "align.loop",
    "Report": "align.result",
    "Trace": "align.trace",
    "load_trace": "align.trace",
    "Divergence": "align.verdict",
    "Tolerance": "align.verdict",
}


class _Package(types.ModuleType):
    """The align package: importing a submodule that shares a public function's name
    (align/capture.py, the `python -m align.check` and `align.compare` shims) must not
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
