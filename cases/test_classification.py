"""Alignment of the image-classification cases (align/zoo/classification.py).

Parametrized from the registry as timm's tests are from `list_models`; align's pytest
plugin adds the device variant (cpu / cuda / npu, each with its marker), the phase and
the precisions of --align-precision. `pytest -m npu cases/` runs the NPU variants; a
failure prints the report and the command that reruns it alone.
"""

from collections.abc import Callable

import pytest

from align.zoo import list_cases


@pytest.mark.parametrize("align_case", list_cases(family="classification"))
def test_alignment(align_case: str, run_alignment: Callable[[], object]) -> None:
    """The target matches the reference against the float64 golden (align.check)."""
    run_alignment()
