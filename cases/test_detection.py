"""Alignment of the detection cases (align/cases/detection.py), in train mode (losses).

Parametrized by the root conftest from the registry: case x device variant (cpu / cuda /
npu, each with its marker) x phase x --precision. A case that cannot run here
(solov2_r50) skips with its reason.
"""

FAMILY = "detection"


def test_alignment(align_params, run_alignment):
    """The target matches the reference against the float64 golden (align.check)."""
    run_alignment()
