"""A module call's arguments written as JSON and read back (align.record.arguments)."""

from __future__ import annotations

import collections
import dataclasses
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._pytree import tree_flatten, tree_unflatten

from align.errors import TraceError
from align.numerics.trees import flatten, unflatten
from align.record.arguments import spec_from_json, spec_to_json
from align.record.capture import CallSpec

plain = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
named = st.sampled_from([torch.float16, torch.bfloat16, torch.int64, torch.channels_last])
leaf = plain | named | st.builds(lambda n: torch.arange(float(n)), st.integers(0, 3))
trees = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4), inner, max_size=3)
        | st.dictionaries(st.text(max_size=4), inner, max_size=3).map(collections.OrderedDict)
    ),
    max_leaves=12,
)


def _spec(args: tuple, kwargs: dict, output, training: bool, autocast: bool = True) -> CallSpec:
    leaves, spec = tree_flatten((args, kwargs))
    out_leaves, out_spec = tree_flatten(output)
    hide = [None if isinstance(x, torch.Tensor) else x for x in leaves]
    out_hide = [None if isinstance(x, torch.Tensor) else x for x in out_leaves]
    return CallSpec(spec, hide, out_spec, out_hide, training, autocast)


@given(
    st.lists(trees, max_size=3).map(tuple),
    st.dictionaries(st.text(max_size=4), trees, max_size=2),
    trees,
    st.booleans(),
    st.booleans(),
)
def test_written_arguments_rebuild_the_call_with_its_tensors(
    args, kwargs, output, training, autocast
):
    spec = _spec(args, kwargs, output, training, autocast)
    read = spec_from_json(json.loads(json.dumps(spec_to_json(spec))), "here")
    assert isinstance(read, CallSpec) and read.training == training
    assert read.autocast == autocast
    original, structure = tree_flatten((args, kwargs))
    # the tensors come from the dump, the rest from the record
    leaves = [x if isinstance(x, torch.Tensor) else v for x, v in zip(original, read.in_leaves)]
    rebuilt = tree_unflatten(leaves, read.in_spec)
    assert read.in_spec == structure and read.out_spec == tree_flatten(output)[1]
    again = tree_flatten(rebuilt)[0]
    assert all(
        a is b if isinstance(a, torch.Tensor) else (a == b and type(a) is type(b))
        for a, b in zip(again, original, strict=True)
    )


Pair = collections.namedtuple("Pair", ["features", "scale"])


def test_a_namedtuple_is_rebuilt_with_its_name_and_fields():
    """Its fields read by name and by position; the type is made anew, not imported."""
    spec = _spec((Pair(torch.ones(2), 0.5),), {}, Pair(torch.ones(1), None), False)
    read = spec_from_json(json.loads(json.dumps(spec_to_json(spec))), "here")
    ((pair,), _) = tree_unflatten([torch.ones(2), read.in_leaves[1]], read.in_spec)
    assert type(pair).__name__ == "Pair" and type(pair) is not Pair
    assert pair.scale == 0.5 and pair[1] == 0.5 and torch.equal(pair.features, torch.ones(2))
    assert tree_unflatten([torch.ones(1), None], read.out_spec)._fields == Pair._fields


@dataclasses.dataclass(frozen=True)
class Batch:
    features: torch.Tensor
    scale: float
    _tag: str = "x"


def test_a_dataclass_is_rebuilt_with_its_name_and_fields():
    """The capture opens it (align.numerics.trees); read from a dump, it is an instance of
    a dataclass made anew with its name and fields, its fields read by name."""
    leaves, spec = flatten(((Batch(torch.ones(2), 0.5),), {}))
    out_leaves, out_spec = flatten(Batch(torch.ones(1), 2.0, "y"))
    hide = [None if isinstance(x, torch.Tensor) else x for x in leaves]
    out_hide = [None if isinstance(x, torch.Tensor) else x for x in out_leaves]
    written = spec_to_json(CallSpec(spec, hide, out_spec, out_hide, True))
    assert written["in"]["tuple"][0] == {
        "tuple": [{"dataclass": ["Batch", ["features", "scale", "_tag"], [0, 0, 0]]}]
    }
    read = spec_from_json(json.loads(json.dumps(written)), "here")
    ((batch,), _) = unflatten([torch.ones(2), *read.in_leaves[1:]], read.in_spec)
    assert type(batch).__name__ == "Batch" and type(batch) is not Batch
    assert dataclasses.is_dataclass(batch) and (batch.scale, batch._tag) == (0.5, "x")
    assert torch.equal(batch.features, torch.ones(2))
    assert unflatten([torch.ones(1), 2.0, "y"], read.out_spec)._tag == "y"


class Config:
    scale = 2.0


def test_a_call_with_a_value_json_cannot_hold_says_why():
    spec = _spec((torch.ones(2), Config()), {}, torch.ones(2), True)
    assert spec_to_json(spec) == {"not_recorded": "an argument of type Config"}
    assert spec_from_json(spec_to_json(spec), "here") == "an argument of type Config"


def test_a_device_reads_as_where_the_call_runs_again():
    spec = _spec((torch.ones(2), torch.device("cuda", 1)), {"to": torch.device("cpu")}, (), True)
    written = json.loads(json.dumps(spec_to_json(spec)))
    assert written["in_leaves"] == [None, {"device": "cuda:1"}, {"device": "cpu"}]
    here = spec_from_json(written, "here", torch.device("cpu"))
    assert here.in_leaves[1:] == [torch.device("cpu")] * 2
    assert spec_from_json(written, "here").in_leaves[1] == torch.device("cuda", 1)
    npu = {**written, "in_leaves": [None, {"device": "npu:0"}, {"device": "cpu"}]}
    assert spec_from_json(npu, "here", torch.device("cpu")).in_leaves[1] == torch.device("cpu")
    with pytest.raises(TraceError, match="a device this torch does not know"):
        spec_from_json(npu, "here")  # (without torch_npu)


def test_dtypes_and_memory_formats_are_written_by_name():
    spec = _spec((torch.ones(2), torch.float16), {"memory_format": torch.channels_last}, (), True)
    written = spec_to_json(spec)
    assert written["in_leaves"] == [None, {"dtype": "float16"}, {"memory_format": "channels_last"}]
    read = spec_from_json(json.loads(json.dumps(written)), "here")
    assert read.in_leaves[1:] == [torch.float16, torch.channels_last]


GOOD = {"in": 0, "in_leaves": [1], "out": 0, "out_leaves": [None], "training": True}


def test_the_good_entry_reads():
    assert isinstance(spec_from_json(GOOD, "here"), CallSpec)
    assert spec_from_json(GOOD, "here").autocast  # an earlier version's dump: on


@pytest.mark.parametrize(
    "entry",
    [
        {**GOOD, "in": {"builtins.eval": [0]}},  # only tuples, lists and dicts are built
        {**GOOD, "in_leaves": [[1]]},  # a leaf that is not a plain value
        {**GOOD, "in_leaves": [{"dtype": "os.system"}]},  # names are looked up, not evaluated
        {**GOOD, "in_leaves": [{"builtins": "eval"}]},
        {**GOOD, "in_leaves": [{"dtype": "float16", "memory_format": "channels_last"}]},
        {**GOOD, "in_leaves": [{"device": 0}]},
        {**GOOD, "in_leaves": [1, 2]},  # more leaves than places
        {**GOOD, "training": "yes"},
        {**GOOD, "autocast": 1},
        {**GOOD, "in": {"tuple": 5}},
        {**GOOD, "in": {"namedtuple": ["os.system", ["a"], [0]]}},  # names are identifiers
        {**GOOD, "in": {"namedtuple": ["P", ["__class__"], [0]]}},
        {**GOOD, "in": {"namedtuple": ["P", ["a", "a"], [0, 0]]}},
        {**GOOD, "in": {"namedtuple": ["P", ["a", "b"], [0]]}},
        {**GOOD, "in": {"dataclass": ["D", ["__class__"], [0]]}},  # no dunder is set
        {**GOOD, "in": {"dataclass": ["os.path", ["a"], [0]]}},
        {**GOOD, "in": {"dataclass": ["D", ["a", "b"], [0]]}},
        {**GOOD, "in": {"dataclass": ["D", "a", [0]]}},
        {**GOOD, "in": {"OrderedDict": [[1, 0]]}},
        {k: v for k, v in GOOD.items() if k != "out"},
        "not a dict",
    ],
)
def test_a_malformed_entry_is_a_trace_error(entry):
    with pytest.raises(TraceError, match="step 3, call fc: a call's arguments are malformed"):
        spec_from_json(entry, "step 3, call fc")
