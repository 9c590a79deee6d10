"""Decisions made where PyTorch's dispatcher does not see them, and how to see them.

A C++ extension's own Python binding runs its loops on raw memory, and numpy or scipy
code (DETR's Hungarian matching through `scipy.optimize.linear_sum_assignment`) works on
arrays: no aten op of their decisions reaches a dispatch mode. While a run records or
replays its decisions (align.numerics.decisions), their calls are routed to it:

- the NMS functions listed in NMS (mmcv's `nms`, which mmdet's detectors keep their
  boxes with, on an NPU too) are replaced by a wrapper, and put back after;
- a user's own function marked `@align.decision` routes itself: each integer or bool
  tensor it returns is the reference's on the other runs.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["NMS", "decision", "wrap"]

# NMS functions that return the indices of the boxes they keep, called (boxes, scores,
# iou_threshold, ...): (module, attribute path in it). Wrapped only once the module is
# imported: a model that uses it imported it when it was built.
NMS = (("mmcv.ops.nms", "ext_module.nms"),)

# route(name, function, args, kwargs, kind): kind "nms" (NMS) or "choice" (`decision`)
Route = Callable[[str, Callable[..., Any], tuple, dict, str], Any]
_ROUTE: list[Route] = []  # the route while a run records or replays (at most one)

F = TypeVar("F", bound=Callable[..., Any])


def decision(function: F) -> F:
    """Mark `function` as a discrete choice made outside PyTorch (numpy, scipy, a C++
    extension): while align records a run, the integer and bool tensors it returns are
    recorded, and the target, golden and honest runs take the reference's in call order.
    Outside align, it runs unchanged."""
    name = f"{function.__module__}.{function.__qualname__}"

    @functools.wraps(function)
    def decided(*args: Any, **kwargs: Any) -> Any:
        if not _ROUTE:
            return function(*args, **kwargs)
        return _ROUTE[-1](name, function, args, kwargs, "choice")

    return decided  # type: ignore[return-value]


def wrap(route: Route) -> Callable[[], None]:
    """Route every call of the listed functions of imported modules, and of functions
    marked `decision`, through `route`; returns what puts everything back."""
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
            return route(_name, _function, args, kwargs, "nms")

        setattr(owner, attribute, routed)
        undo.append((owner, attribute, function))
    _ROUTE.append(route)

    def restore() -> None:
        _ROUTE.remove(route)
        for owner, attribute, function in reversed(undo):
            setattr(owner, attribute, function)

    return restore
