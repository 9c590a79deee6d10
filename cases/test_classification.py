"""Alignment of the image-classification cases (align/cases/classification.py).

Parametrized by the root conftest from the registry: case x device variant (cpu / cuda /
npu, each with its marker) x phase x --precision. `pytest -m npu cases/` runs the NPU
variants; a failure prints the report and the command that reruns it alone.
"""

FAMILY = "classification"


def test_alignment(align_params, run_alignment):
    """The target matches the reference against the float64 golden (align.check)."""
    run_alignment()
