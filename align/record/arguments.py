"""A module call's arguments and results as JSON, its tensors left out: with the tensors a
dump holds, what is needed to call the module again (align.judge.step_isolation).

A capture's CallSpec (align.record.capture) keeps the call's pytree structure and its
non-tensor leaves in memory. Here the structure is written as nested tuples, lists and
dicts with string keys, and the leaves as JSON's plain values, torch's dtypes and memory
formats by name ({"dtype": "float16"}: `x.to(torch.float16)` inside a module), or a
device ({"device": "npu:0"}: read back as the device the call runs on again, where its
tensors are: a module moving data to its model's device moves it there); a call whose
arguments hold anything else (a user's object) is written as the reason it cannot be
rebuilt. An OrderedDict (torchvision's feature maps) is rebuilt as one, a namedtuple as a
namedtuple of the same type name and fields, made anew (`collections.namedtuple`: the
module reads its fields by name or position), and a dataclass instance, which the capture
opens into its fields (align.numerics.trees), as an instance of a dataclass of the same
name and fields, made anew: the user's class is never imported.
Reading builds nothing but those containers, plain values and the named torch constants
it looks up in fixed tables: a crafted dump cannot make align import or call anything.
"""

from __future__ import annotations

import collections
import functools
import keyword
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from align.errors import TraceError
from align.numerics.trees import Fields
from align.record.capture import CallSpec

__all__ = ["spec_from_json", "spec_to_json"]

PLAIN = (type(None), bool, int, float, str)
# torch constants a leaf may name, by kind: looked up, never evaluated
NAMED = {
    "dtype": {
        str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
    },
    "memory_format": {
        name: getattr(torch, name)
        for name in ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")
    },
}
_LEAF = 0  # a leaf's place in a written structure
_CONTAINERS = {"tuple": tuple, "list": list}
_MAPPINGS = {"dict": dict, "OrderedDict": collections.OrderedDict}


class _NotPlain(ValueError):
    """The call holds a value or a container this format does not write."""


def spec_to_json(spec: CallSpec) -> dict[str, Any]:
    """The call's structure, plain leaves, training and autocast flags; or why it cannot be
    written."""
    try:
        if spec.out_spec is None:
            raise _NotPlain("a call that did not return")
        return {
            "in": _structure(spec.in_spec),
            "in_leaves": [_plain(v) for v in spec.in_leaves],
            "out": _structure(spec.out_spec),
            "out_leaves": [_plain(v) for v in spec.out_leaves],
            "training": spec.training,
            "autocast": spec.autocast,
            "out_grad": spec.out_grad,
        }
    except _NotPlain as exc:
        return {"not_recorded": str(exc)}


def spec_from_json(data: Any, where: str, device: torch.device | None = None) -> CallSpec | str:
    """The CallSpec written by `spec_to_json`, or the reason the call was not written; a
    malformed entry is a TraceError naming `where`. A device argument reads as `device`
    (where the call runs again), else as the device recorded."""
    if isinstance(data, dict) and isinstance(data.get("not_recorded"), str):
        return data["not_recorded"]
    try:
        in_spec, in_leaves = _spec(data["in"], data["in_leaves"], device)
        out_spec, out_leaves = _spec(data["out"], data["out_leaves"], device)
        training = data["training"]
        # (dumps of earlier versions: autocast on, every output differentiable)
        autocast, out_grad = data.get("autocast", True), data.get("out_grad", [])
        if not isinstance(training, bool) or not isinstance(autocast, bool):
            raise ValueError("'training' or 'autocast' is not a boolean")
        if not isinstance(out_grad, list) or not all(isinstance(g, bool) for g in out_grad):
            raise ValueError("'out_grad' is not a list of booleans")
        if out_grad and len(out_grad) != len(out_leaves):
            raise ValueError("'out_grad' does not hold one flag per output")
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(
            f"{where}: a call's arguments are malformed ({exc}); the dump is corrupt: record "
            "it again"
        ) from exc
    return CallSpec(in_spec, in_leaves, out_spec, out_leaves, training, autocast, out_grad)


def _plain(value: Any) -> Any:
    if type(value) in PLAIN:
        return value
    if type(value) is torch.device:
        return {"device": str(value)}
    for kind, names in NAMED.items():
        name = next((n for n, v in names.items() if v == value and type(v) is type(value)), None)
        if name is not None:
            return {kind: name}
    raise _NotPlain(f"an argument of type {type(value).__name__}")


def _leaf(value: Any, device: torch.device | None) -> Any:
    """A written leaf as the value it stands for."""
    if type(value) in PLAIN:
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((kind, name),) = value.items()
        if isinstance(name, str) and name in NAMED.get(kind, {}):
            return NAMED[kind][name]
        if kind == "device" and isinstance(name, str):
            return device or _device(name)
    raise ValueError(
        f"a leaf is neither a plain value, a named dtype or format nor a device: {value!r:.60}"
    )


def _device(name: str) -> torch.device:
    """A recorded device by name (torch parses it: nothing is run)."""
    try:
        return torch.device(name)
    except RuntimeError as exc:  # "npu:0" without torch_npu
        raise ValueError(f"a device this torch does not know: {name!r:.40}") from exc


def _structure(spec: TreeSpec) -> Any:
    return _written(tree_unflatten([_Slot() for _ in range(spec.num_leaves)], spec))


def _written(tree: Any) -> Any:
    if isinstance(tree, _Slot):
        return _LEAF
    if type(tree) in (tuple, list):
        return {type(tree).__name__: [_written(c) for c in tree]}
    if type(tree) in (dict, collections.OrderedDict) and all(isinstance(k, str) for k in tree):
        return {type(tree).__name__: [[k, _written(c)] for k, c in tree.items()]}
    if isinstance(tree, tuple) and isinstance(getattr(type(tree), "_fields", None), tuple):
        fields = list(type(tree)._fields)
        return {"namedtuple": [type(tree).__name__, fields, [_written(c) for c in tree]]}
    if isinstance(tree, Fields):
        return {"dataclass": [tree.name, list(tree.names), [_written(c) for c in tree.values]]}
    raise _NotPlain(f"arguments in a {type(tree).__name__}")


class _Slot:
    """A leaf's place while a structure is rebuilt."""


def _tree(node: Any, depth: int = 0) -> Any:
    if depth > 32:
        raise ValueError("arguments nested deeper than 32")
    if node == _LEAF and type(node) is int:
        return _Slot()
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"not a written structure: {str(node)[:60]}")
    ((kind, children),) = node.items()
    if not isinstance(children, list):
        raise ValueError(f"{kind} without a list of children")
    if kind in _CONTAINERS:
        return _CONTAINERS[kind](_tree(c, depth + 1) for c in children)
    if kind in _MAPPINGS and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in children
    ):
        return _MAPPINGS[kind]((k, _tree(c, depth + 1)) for k, c in children)
    if kind in ("namedtuple", "dataclass") and len(children) == 3:
        name, fields, items = children
        reserved = "__" if kind == "dataclass" else "_"  # a field name may not start so
        if _identifiers([name]) and isinstance(fields, list) and isinstance(items, list):
            if _identifiers(fields, reserved) and len(set(fields)) == len(fields) == len(items):
                values = [_tree(c, depth + 1) for c in items]
                if kind == "dataclass":
                    return Fields(None, name, tuple(fields), values)
                return _namedtuple(name, tuple(fields))(*values)
        raise ValueError(f"a malformed {kind}: {str(children)[:60]}")
    raise ValueError(f"an unknown container {kind!r}")


def _identifiers(names: list, reserved: str = "") -> bool:
    """Whether `names` are identifiers that do not start with `reserved` ("_" for a
    namedtuple's fields, "__" for a dataclass's: no dunder attribute is ever set)."""
    return all(
        isinstance(n, str)
        and n.isidentifier()
        and not keyword.iskeyword(n)
        and not (reserved and n.startswith(reserved))
        for n in names
    )


@functools.lru_cache(maxsize=256)
def _namedtuple(name: str, fields: tuple[str, ...]) -> type:
    """A namedtuple type of this name and fields, one per pair (its values compare as the
    recorded ones do; the user's own class is never looked up)."""
    return collections.namedtuple(name, fields)


def _spec(structure: Any, leaves: Any, device: torch.device | None) -> tuple[TreeSpec, list[Any]]:
    slots, spec = tree_flatten(_tree(structure))
    if not isinstance(leaves, list) or len(leaves) != len(slots):
        raise ValueError("the leaves do not fill the structure")
    return spec, [_leaf(v, device) for v in leaves]
