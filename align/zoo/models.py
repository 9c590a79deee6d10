"""Turn what the user named (an nn.Module, a registered case, a timm model, their own
builder as MODULE:FUNCTION) into a model, inputs, a loss and tolerances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from align.errors import AlignError, UnknownCaseError
from align.runtime.user_code import call_user_function, is_user_function
from align.zoo import get_case, is_case, list_cases
from align.zoo.golden import case_tolerance


@dataclass
class Resolved:
    """A model ready to check, with where it came from."""

    model: nn.Module
    inputs: Any
    loss_fn: Any
    case: str | None
    label: str
    grad_inputs: Any = None  # which inputs backward differentiates (None: every float)

    def tolerance(self, phases: tuple[str, ...], precision: str) -> dict | None:
        """Tolerance from the case's golden file (None for a plain module)."""
        if self.case is None:
            return None

        return case_tolerance(self.case, phases, precision)

    def command(self, phases, precision: str, reference: str, target: str, emulate) -> str:
        """The one command that reproduces this check alone ('' for a plain module)."""
        name = self.case or (self.label if is_user_function(self.label) else None)
        if name is None:
            return ""
        cmd = (
            f"python -m align.check {name} --phases {','.join(phases)} "
            f"--precision {precision} --reference {reference} --target {target}"
        )
        return cmd + (f" --emulate {emulate}" if emulate else "")


def resolve_model(
    model: nn.Module | str,
    inputs: Any,
    loss_fn: Any,
    seed: int,
    batch: int | None = None,
    image_size: int | None = None,
) -> Resolved:
    """A Resolved for a module, a registered case name, a timm model name, or MODULE:FUNCTION
    (`_built_by_user`)."""
    if isinstance(model, nn.Module):
        if inputs is None:
            raise AlignError("inputs are required when model is an nn.Module")
        return Resolved(model, inputs, loss_fn, None, type(model).__name__)
    if not isinstance(model, str):
        raise AlignError(f"model must be an nn.Module or a name, not {type(model).__name__}")

    # a named model's random weights come from `seed`, so that every process (a dump on
    # each machine, a check) builds the same model: torch's default seed is per process
    torch.manual_seed(seed)
    if is_user_function(model):
        return _built_by_user(model, inputs, loss_fn, seed, batch, image_size)
    if is_case(model):
        case = get_case(model)
        if case.skip:
            raise AlignError(f"case {model} cannot run here: {case.skip}")
        built = case.build()
        if inputs is None:
            if image_size is not None and case.task != "classification":
                raise AlignError("--size applies to classification cases only")
            inputs = case.make_inputs(batch or case.test_batch, seed)
            if image_size is not None:
                inputs = torch.nn.functional.interpolate(inputs, size=(image_size, image_size))
        return Resolved(
            built, inputs, loss_fn or case.loss_fn, case.name, case.source_model, case.grad_inputs
        )
    return _timm_model(model, inputs, loss_fn, seed, batch, image_size)


def _built_by_user(text, inputs, loss_fn, seed, batch, image_size) -> Resolved:
    """FUNCTION() in MODULE, called after seeding (every process builds the same weights):
    a model (then `batch` images of `image_size`, 2 x 3 x 224 x 224 by default), a
    (model, inputs) pair, or (model, inputs, loss_fn) with loss_fn(output, inputs)."""
    built = call_user_function(text)
    parts = built if isinstance(built, tuple) else (built,)
    if not (1 <= len(parts) <= 3 and isinstance(parts[0], nn.Module)):
        raise AlignError(
            f"{text}() returned {type(built).__name__}: return a model, (model, inputs) or "
            "(model, inputs, loss_fn)"
        )
    model = parts[0]
    if inputs is None and len(parts) > 1:
        inputs = parts[1]
    if inputs is None:
        size = image_size or 224
        gen = torch.Generator().manual_seed(seed)
        inputs = torch.randn(batch or 2, 3, size, size, generator=gen)
    elif image_size is not None or batch is not None:
        raise AlignError(f"--batch and --size make images for a model alone: {text}() gave inputs")
    if loss_fn is None and len(parts) == 3:
        loss_fn = parts[2]
    return Resolved(model, inputs, loss_fn, None, text)


def _timm_model(name, inputs, loss_fn, seed, batch, image_size) -> Resolved:
    import timm

    if not timm.is_model(name):
        raise UnknownCaseError(
            f"unknown model {name!r}: not a registered case ({', '.join(list_cases())}) "
            "nor a timm model name (timm.list_models() lists those)"
        )
    try:
        model = timm.create_model(name, pretrained=False, drop_rate=0.0, drop_path_rate=0.0)
    except TypeError:  # some timm families take no drop_path_rate
        model = timm.create_model(name, pretrained=False, drop_rate=0.0)
    model.train()
    if inputs is None:
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        if image_size is not None:
            size = (size[0], image_size, image_size)
        gen = torch.Generator().manual_seed(seed)
        inputs = torch.randn((batch or 2, *size), generator=gen)
    return Resolved(model, inputs, loss_fn, None, f"timm:{name}")
