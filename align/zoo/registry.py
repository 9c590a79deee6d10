"""The case registry, in the manner of timm's model registry.

A case is one frozen `Case`: how to build the model and its inputs, its loss, its task
metric, its documented figures and its training recipe. Families register theirs with
`@register_case` on a thin function returning the `Case`.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from align.errors import AlignError, UnknownCaseError
from align.zoo.recipe import Recipe

__all__ = ["FAMILIES", "Case", "Figure", "get_case", "is_case", "list_cases", "register_case"]


@dataclass(frozen=True)
class Figure:
    """One documented figure (Top-1, box AP, FPS...) with where and how it was measured."""

    metric: str  # "top1", "top5", "box_ap", "mask_ap", "fps"
    value: float
    source: str  # the page documenting it, and its table row
    conditions: str = ""  # device, cards, batch per card, epochs, precision, torch


@dataclass(frozen=True)
class Case:
    """Everything align needs to check, train and judge one model.

    build(): a fresh nn.Module (random init, in the mode the checks run it in).
    make_inputs(batch, seed): inputs for align.check (tensor, tuple or dict).
    loss_fn(output, inputs): scalar loss for backward/train; None = align's default.
    skip: a reason the case cannot run here (then tests skip with it, never pass).
    grad_inputs(inputs): the inputs backward differentiates; None = every floating one.
    slow_precisions: precisions whose tests are `slow` (the tag "slow" makes all of them).
    """

    name: str
    family: str
    source_model: str  # e.g. "timm:resnet50", "torchvision:ssd300_vgg16"
    task: str  # "classification", "detection", "instance_segmentation"
    build: Callable[[], torch.nn.Module]
    make_inputs: Callable[[int, int], Any]
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    figures: tuple[Figure, ...] = ()
    recipe: Recipe | None = None
    input_size: tuple[int, ...] = (3, 224, 224)
    test_batch: int = 2
    skip: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    grad_inputs: Callable[[Any], Any] | None = None
    # precisions whose CPU check takes many minutes: their test variants are marked slow
    slow_precisions: tuple[str, ...] = ()


# The family modules under align/zoo/ whose @register_case entries fill the registry.
FAMILIES = ("classification", "detection", "digits")


@dataclass(frozen=True)
class _Entry:
    """A registered case before it is built: its function and its family (its module)."""

    fn: Callable[[], Case]
    family: str


_entries: dict[str, _Entry] = {}
_built: dict[str, Case] = {}


def register_case(fn: Callable[[], Case]) -> Callable[[], Case]:
    """Decorator: register `fn`, named for its case and returning its Case, under its
    family (the module it is defined in). Nothing is built until `get_case` asks, as timm's
    register_model records an entry point and builds nothing."""
    if fn.__name__ in _entries:
        raise ValueError(f"case {fn.__name__!r} registered twice")
    _entries[fn.__name__] = _Entry(fn, fn.__module__.rpartition(".")[2])
    return fn


def _load_families() -> None:
    """Import every family module once: their @register_case entries fill the registry."""
    for family in FAMILIES:
        importlib.import_module(f"align.zoo.{family}")


def list_cases(
    filter: str | Iterable[str] = "*",
    exclude: str | Iterable[str] = (),
    *,
    family: str | None = None,
) -> list[str]:
    """Sorted names of registered cases matching fnmatch `filter` and none of `exclude`.

    Args:
        filter: fnmatch pattern(s); a case matching any of them is listed.
        exclude: fnmatch pattern(s); a case matching any of them is left out.
        family: only the cases of this family ("classification", "detection", ...);
            an unknown family raises AlignError naming the known ones.

    Example: list_cases("resnet*", exclude="*cifar*") -> ["resnet50", "resnetv1d152"];
    list_cases(family="detection") -> ["fcos_r50", "retinanet_r50", ...]
    """
    _load_families()
    if family is not None and family not in {e.family for e in _entries.values()}:
        known = ", ".join(sorted({e.family for e in _entries.values()}))
        raise AlignError(f"unknown case family {family!r}; known families: {known}")
    include = [filter] if isinstance(filter, str) else list(filter)
    excl = [exclude] if isinstance(exclude, str) else list(exclude)
    return sorted(
        n
        for n, entry in _entries.items()
        if (family is None or entry.family == family)
        and any(fnmatch.fnmatch(n, p) for p in include)
        and not any(fnmatch.fnmatch(n, p) for p in excl)
    )


def is_case(name: str) -> bool:
    _load_families()
    return name in _entries


def get_case(name: str) -> Case:
    """The registered Case called `name`; UnknownCaseError lists the known ones."""
    _load_families()
    if name not in _built:
        if name not in _entries:
            known = ", ".join(sorted(_entries))
            raise UnknownCaseError(
                f"unknown case {name!r}; registered cases: {known} "
                "(python -m align.list shows them with their documented figures)"
            )
        entry = _entries[name]
        case = entry.fn()
        if (case.name, case.family) != (name, entry.family):
            raise ValueError(
                f"@register_case {entry.fn.__module__}.{name} returned case {case.name!r} of "
                f"family {case.family!r}: a case function is named for its case and lives in "
                f"its family's module"
            )
        _built[name] = case
    return _built[name]
