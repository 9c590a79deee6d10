"""align.zoo.models.resolve_model on the user's own builder (MODULE:FUNCTION): what it may
return, what --batch and --size then mean, and the error for anything else."""

from __future__ import annotations

import sys

import pytest
import torch

from align.errors import AlignError
from align.zoo.models import resolve_model

BUILDERS = """
import torch
from torch import nn

def model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(1), nn.LazyLinear(2))

def pair():
    return nn.Linear(5, 2), torch.ones(3, 5)

def triple():
    return nn.Linear(5, 2), torch.ones(3, 5), lambda out, x: out.sum()

def weights():
    return torch.randn(3)

def seeded():
    return nn.Linear(5, 2)
"""


@pytest.fixture(autouse=True)
def builders(tmp_path, monkeypatch):
    (tmp_path / "my_builders.py").write_text(BUILDERS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    sys.modules.pop("my_builders", None)


def test_a_model_alone_gets_images_of_batch_and_size():
    resolved = resolve_model("my_builders:model", None, None, seed=0, batch=3, image_size=16)
    assert resolved.inputs.shape == (3, 3, 16, 16) and resolved.case is None
    assert resolved.label == "my_builders:model"
    assert "align.check my_builders:model" in resolved.command(
        ("forward",), "fp32", "cpu", "cpu", None
    )


def test_a_pair_and_a_triple_give_their_inputs_and_loss():
    pair = resolve_model("my_builders:pair", None, None, seed=0)
    assert torch.equal(pair.inputs, torch.ones(3, 5)) and pair.loss_fn is None
    triple = resolve_model("my_builders:triple", None, None, seed=0)
    assert triple.loss_fn(torch.ones(2), None) == 2


def test_the_builder_runs_after_seeding_so_every_process_builds_the_same_weights():
    first = resolve_model("my_builders:seeded", None, None, seed=4).model
    torch.manual_seed(123)
    again = resolve_model("my_builders:seeded", None, None, seed=4).model
    assert torch.equal(first.weight, again.weight)


@pytest.mark.parametrize(
    "name, options, fragment",
    [
        ("my_builders:weights", {}, "return a model, (model, inputs) or (model, inputs, loss_fn)"),
        ("my_builders:pair", {"batch": 4}, "--batch and --size make images for a model alone"),
    ],
)
def test_anything_else_is_an_error_saying_what_to_return(name, options, fragment):
    with pytest.raises(AlignError) as caught:
        resolve_model(name, None, None, seed=0, **options)
    assert fragment in str(caught.value)
