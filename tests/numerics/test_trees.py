"""Pytree flattening into a user's dataclass instances (align.numerics.trees)."""

from __future__ import annotations

import dataclasses

import torch

from align.numerics.trees import Fields, closed, flatten, map_leaves, opened, unflatten


@dataclasses.dataclass(frozen=True)
class Inner:
    x: torch.Tensor
    name: str


@dataclasses.dataclass(slots=True)
class Outer:
    inner: Inner
    items: list
    weight: float = 1.0
    hidden: int = dataclasses.field(default=3, init=False)


def _tree() -> tuple:
    return (
        [Outer(Inner(torch.ones(2), "a"), [torch.zeros(1), 2]), 5],
        {"k": Inner(torch.ones(3), "b")},
    )


def test_the_tensors_a_dataclass_holds_are_leaves_and_the_instances_come_back():
    tree = _tree()
    leaves, spec = flatten(tree)
    assert [x.shape for x in leaves if isinstance(x, torch.Tensor)] == [(2,), (1,), (3,)]
    doubled = [x * 2 if isinstance(x, torch.Tensor) else x for x in leaves]
    (outer, five), kw = unflatten(doubled, spec)
    assert type(outer) is Outer and type(outer.inner) is Inner and five == 5
    assert torch.equal(outer.inner.x, torch.full((2,), 2.0)) and outer.inner.name == "a"
    assert (
        outer.items[1] == 2 and outer.hidden == 3 and torch.equal(kw["k"].x, torch.full((3,), 2.0))
    )
    assert torch.equal(tree[0][0].inner.x, torch.ones(2))  # the originals are not written to


def test_a_cast_reaches_the_tensors_in_dataclasses():
    cast = map_leaves(lambda x: x.double() if isinstance(x, torch.Tensor) else x, _tree())
    assert cast[0][0].inner.x.dtype == torch.float64 and cast[1]["k"].x.dtype == torch.float64


def test_fields_read_from_a_dump_make_a_dataclass_of_that_name():
    made = closed(Fields(None, "Batch", ("features", "scale"), [torch.ones(1), 0.5]))
    assert type(made).__name__ == "Batch" and dataclasses.is_dataclass(made)
    assert made.scale == 0.5 and torch.equal(made.features, torch.ones(1))
    assert opened(made).names == ("features", "scale")
    plain = [1, (2.0, "x"), {"a": None}]
    assert opened(plain) == plain and closed(plain) == plain
