"""The zoo: the registered cases, their golden files and how a model name becomes one.

Index:
    registry.py        Case, Figure, @register_case, list_cases / get_case (lazy, as timm's)
    classification.py  the ImageNet / CIFAR classifiers (timm, torchvision)
    detection.py       the COCO detectors (torchvision) and SOLOv2 (mmdet, solov2.py)
    digits.py          the embedded scikit-learn digits case (no dataset needed)
    recipe.py          a case's training recipe (optimizer, schedule, epochs)
    golden.py          golden files: figures with their sources, tolerances
    golden_files/      one TOML per case (package data)
    models.py          a model argument (case, timm name or module) resolved for a check

Add a case: a function named for it, decorated with @register_case, in its family's
module, and align/zoo/golden_files/<case>.toml with its figures and their sources.
"""

from align.zoo.registry import (
    FAMILIES,
    Case,
    Figure,
    get_case,
    is_case,
    list_cases,
    register_case,
)

__all__ = ["FAMILIES", "Case", "Figure", "get_case", "is_case", "list_cases", "register_case"]
