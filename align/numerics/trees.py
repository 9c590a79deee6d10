"""A user's dataclass instances in a module call's arguments and results, opened into their
fields: the capture records the tensors they hold, a cast reaches them, and a dump can
rebuild the call.

torch's pytree sees a dataclass instance as one leaf, so a module called with a config or
a batch held in a dataclass would hide its tensors from the capture, and its call could
not be written. `opened(tree)` puts each instance (nested ones too) in a `Fields` node,
which is a pytree node of align's own: the user's class is not registered with pytree,
so nothing changes for their code or for torch.compile. `closed(tree)` makes the
instances again: a shallow copy of the instance it was opened from with the fields set
(frozen and slotted dataclasses too), or, for a call read from a dump, an instance of a
dataclass made anew with the recorded class name and field names
(`dataclasses.make_dataclass`: the module reads its fields by name; the user's class is
never imported).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from torch.utils._pytree import (
    TreeSpec,
    register_pytree_node,
    tree_flatten,
    tree_map,
    tree_unflatten,
)

__all__ = ["Fields", "closed", "flatten", "map_leaves", "opened", "unflatten"]


class Fields:
    """A dataclass instance's fields as a pytree node: `original`, the instance it was
    opened from (None when read from a dump), `name` its class's name."""

    __slots__ = ("original", "name", "names", "values")

    def __init__(self, original: Any, name: str, names: tuple[str, ...], values: list[Any]):
        self.original, self.name, self.names, self.values = original, name, names, values

    def __repr__(self) -> str:
        return f"Fields({self.name}, {dict(zip(self.names, self.values))!r:.80})"


register_pytree_node(
    Fields,
    lambda f: (list(f.values), (f.original, f.name, f.names)),
    lambda values, context: Fields(*context, list(values)),
    serialized_type_name="align.numerics.trees.Fields",
)


def _is_instance(x: Any) -> bool:
    return hasattr(type(x), "__dataclass_fields__") and not isinstance(x, type)  # (cheap)


def _open(x: Any) -> Any:
    if not _is_instance(x):
        return x
    names = tuple(f.name for f in dataclasses.fields(x))
    return Fields(x, type(x).__name__, names, [opened(getattr(x, n)) for n in names])


def opened(tree: Any) -> Any:
    """`tree` with every dataclass instance in it a `Fields` node."""
    return tree_map(_open, tree) if any(map(_is_instance, tree_flatten(tree)[0])) else tree


def _close(node: Any) -> Any:
    if not isinstance(node, Fields):
        return node
    values = [closed(v) for v in node.values]
    if node.original is None:
        return _made(node.name, node.names)(*values)
    made = copy.copy(node.original)
    for name, value in zip(node.names, values):
        object.__setattr__(made, name, value)  # (a frozen dataclass too)
    return made


def closed(tree: Any) -> Any:
    """`tree` with every `Fields` node a dataclass instance again."""
    return tree_map(_close, tree, is_leaf=lambda x: isinstance(x, Fields))


def _has_fields(spec: TreeSpec) -> bool:
    # (children() in recent torch, children_specs in older ones, deprecated now)
    children = spec.children() if hasattr(spec, "children") else spec.children_specs
    return spec.type is Fields or any(map(_has_fields, children))


@functools.lru_cache(maxsize=256)
def _made(name: str, names: tuple[str, ...]) -> type:
    """A dataclass of this name and fields, one per pair (made, never looked up)."""
    return dataclasses.make_dataclass(name, names)


def flatten(tree: Any) -> tuple[list[Any], TreeSpec]:
    """tree_flatten, dataclass instances opened: their fields' tensors are leaves (a tree
    without one is flattened once: the capture flattens every call's arguments)."""
    leaves, spec = tree_flatten(tree)
    if not any(map(_is_instance, leaves)):
        return leaves, spec
    return tree_flatten(tree_map(_open, tree))


def unflatten(leaves: list[Any], spec: TreeSpec) -> Any:
    """tree_unflatten of a `flatten` spec, its dataclass instances made again."""
    tree = tree_unflatten(leaves, spec)
    return closed(tree) if _has_fields(spec) else tree


def map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    """tree_map into dataclass instances too (a cast reaches the tensors they hold)."""
    leaves, spec = flatten(tree)
    return unflatten([fn(x) for x in leaves], spec)
