"""Decisions made where PyTorch's dispatcher does not see them, and how to see them.

A C++ extension's own Python binding runs its loops on raw memory: no aten op of its
decision reaches a dispatch mode. mmcv's `nms` is one (mmdet's detectors keep their boxes
with it, on an NPU too). While a run records or replays its decisions
(align.numerics.decisions), each function listed here is replaced by a wrapper that
routes its calls to the run, and put back after.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["NMS", "wrap"]

# NMS functions that return the indices of the boxes they keep, called (boxes, scores,
# iou_threshold, ...): (module, attribute path in it). Wrapped only once the module is
# imported: a model that uses it imported it when it was built.
NMS = (("mmcv.ops.nms", "ext_module.nms"),)

Route = Callable[[str, Callable[..., Any], tuple, dict], Any]


def wrap(route: Route) -> Callable[[], None]:
    """Route every call of the listed functions of imported modules through
    `route(name, function, args, kwargs)`; returns what puts the functions back."""
    undo = []
    for module_name, path in NMS:
        module = sys.modules.get(module_name)
        if module is None:
            continue
        *owner_path, attribute = path.split(".")
        try:
            owner = functools.reduce(getattr, owner_path, module)
            function = getattr(owner, attribute)
        except AttributeError:  # another version of the module: nothing of it to wrap
            continue
        name = f"{module_name}.{path}"

        def routed(*args, _name=name, _function=function, **kwargs):
            return route(_name, _function, args, kwargs)

        setattr(owner, attribute, routed)
        undo.append((owner, attribute, function))

    def restore() -> None:
        for owner, attribute, function in reversed(undo):
            setattr(owner, attribute, function)

    return restore
