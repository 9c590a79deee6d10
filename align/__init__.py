"""align: cross-device accuracy alignment and regression testing for PyTorch models.

report = align.check("resnet50", precision="amp-bf16")
print(report)                      # verdict, first divergence, culprit layers
"""

from align.devices import guard_npu_autoload

guard_npu_autoload()  # before torch: torch_npu without CANN must not break `import torch`

from align.api import capture, check, compare  # noqa: E402
from align.cases import get_case, list_cases, register_case  # noqa: E402
from align.loop import Recorder  # noqa: E402
from align.result import Report  # noqa: E402
from align.trace import Trace, load_trace  # noqa: E402
from align.verdict import Divergence, Tolerance  # noqa: E402

__all__ = [
    "Divergence",
    "Recorder",
    "Report",
    "Tolerance",
    "Trace",
    "capture",
    "check",
    "compare",
    "get_case",
    "list_cases",
    "load_trace",
    "register_case",
]
