"""Alignment of the detection cases (align/zoo/detection.py), in train mode (losses).

Parametrized from the registry as timm's tests are from `list_models`; align's pytest
plugin adds the device variant (cpu / cuda / npu, each with its marker), the phase and
the precisions of --align-precision. A case that cannot run here (solov2_r50) skips
with its reason.
"""

from collections.abc import Callable

import pytest

from align.zoo import list_cases


@pytest.mark.parametrize("align_case", list_cases(family="detection"))
def test_alignment(align_case: str, run_alignment: Callable[[], object]) -> None:
    """The target matches the reference against the float64 golden (align.check)."""
    run_alignment()
