"""align.check on inputs it must refuse or flag: structural mismatches, NaN, unknown names,
and the promise never to touch the caller's model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import align
from align.errors import (
    AlignError,
    DeviceUnavailableError,
    MismatchError,
    ModelRunError,
    UnknownCaseError,
)
from align.testing import perturb


class Net(nn.Module):
    """A small model with a container (body), a leaf after it (head) and a functional op."""

    def __init__(self, out: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, out)

    def forward(self, x):
        return self.head(self.norm(self.body(x)).tanh())


class NaNLinear(nn.Linear):
    """A kernel that writes NaN into the first feature of its output."""

    def forward(self, x):
        y = super().forward(x)
        mask = torch.zeros_like(y, dtype=torch.bool)
        mask[..., 0] = True
        return y.masked_fill(mask, float("nan"))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().train()


@pytest.fixture
def x():
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(1))


def check(model, inputs, **kw):
    kw = {"reference": "cpu", "target": "cpu", **kw}
    return align.check(model, inputs, **kw)


# -- structure ------------------------------------------------------------------------------


def test_target_returning_another_shape_is_an_error(net, x):
    class Flat(Net):
        def forward(self, x):
            return super().forward(x).reshape(-1)

    target = Flat()
    target.load_state_dict(net.state_dict())
    with pytest.raises(
        MismatchError, match=r"shape \(6, 4\) on the reference, \(24,\) on the target"
    ):
        check(net, x, target_model=target)


def test_target_module_with_another_shape_is_an_error(net, x):
    target = Net(out=5)
    with pytest.raises(MismatchError, match=r"\(6, 4\) on the reference, \(6, 5\) on the target"):
        check(net, x, target_model=target)


def test_a_count_decided_outside_the_dispatcher_is_named_as_such():
    """Rows selected through numpy (as a C++ extension selects boxes): float32 loses the
    1e-9 that float64 keeps, and the golden run selects rows the reference does not."""

    class Selects(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            near = (x[:, 0] + 1) - 1
            keep = torch.from_numpy(np.flatnonzero(near.detach().cpu().numpy() > 0))
            return self.fc(x), self.fc(x[keep])

    model = Selects()
    with pytest.raises(MismatchError, match="a count the run decides"):
        check(model, torch.full((4, 3), 1e-9), target_model=perturb(model))


class FunctionalNorm(Net):
    """The same computation without the `norm` module: batch norm applied functionally."""

    def __init__(self):
        super().__init__()
        del self.norm

    def forward(self, x):
        h = nn.functional.batch_norm(self.body(x), None, None, training=True, eps=1e-5)
        return self.head(h.tanh())


class Body(nn.Module):
    """body without its ReLU module (applied functionally): body.0 and body.2 only."""

    def __init__(self, first: nn.Module, last: nn.Module):
        super().__init__()
        self.add_module("0", first)
        self.add_module("2", last)

    def forward(self, x):
        return getattr(self, "2")(torch.relu(getattr(self, "0")(x)))


def test_target_missing_a_submodule_is_an_error_naming_it(net, x):
    target = FunctionalNorm()
    target.load_state_dict(net.state_dict(), strict=False)
    with pytest.raises(
        MismatchError,
        match=r"1 module call\(s\) of the reference are missing in "
        r"the target: norm\b",
    ) as info:
        check(net, x, target_model=target)
    assert "name_map" in str(info.value)  # says how to map renamed or fused modules


def test_a_submodule_mapped_to_none_is_skipped(net, x):
    target = FunctionalNorm()
    target.load_state_dict(net.state_dict(), strict=False)
    report = check(net, x, target_model=target, name_map={"norm": None})
    assert report.passed, str(report)
    isolation_notes = [n for n in report.notes if "not isolated" in n]
    # the root computes the norm itself on the target, so only the root cannot be isolated
    assert isolation_notes == [
        "<model> not isolated: RuntimeError: norm has no counterpart in the target (name_map)"
    ], report.notes


def test_target_missing_a_nested_submodule_is_an_error_naming_it(net, x):
    target = copy.deepcopy(net)
    target.body = Body(target.body[0], target.body[2])
    with pytest.raises(MismatchError, match=r"missing in the target: body\.1\b"):
        check(net, x, target_model=target)


# -- NaN on the target ----------------------------------------------------------------------


@pytest.fixture
def nan_target(net):
    target = copy.deepcopy(net)
    target.body[2].__class__ = NaNLinear
    return target


def test_nan_from_the_target_fails_nonfinite_and_names_the_module(net, x, nan_target):
    report = check(net, x, target_model=nan_target)
    assert not report.passed
    first = report.first_divergence
    assert first is not None and first.metric == "nonfinite", first
    assert first.phase == "forward" and first.value > 0 and first.limit == 0
    assert report.culprits, str(report)
    culprit = report.culprits[0]
    assert (culprit.module, culprit.metric, culprit.value) == ("body.2", "nonfinite", 6)
    assert "NaN/Inf on the target where the reference is finite" in culprit.message


def test_nan_first_divergence_is_the_module_that_produced_it(net, x, nan_target):
    report = check(net, x, target_model=nan_target, isolate_modules=False)
    assert report.first_divergence.module == "body.2", str(report.first_divergence)


def test_nan_in_the_target_under_amp(net, x, nan_target):
    report = check(net, x, target_model=nan_target, precision="amp-bf16")
    assert not report.passed
    assert report.culprits and report.culprits[0].module == "body.2"
    assert report.culprits[0].metric == "nonfinite"


# -- unknown names and missing arguments ----------------------------------------------------


def test_unknown_model_name_lists_the_cases():
    with pytest.raises(UnknownCaseError) as info:
        align.check("no_such_model_xyz", reference="cpu", target="cpu")
    message = str(info.value)
    assert "no_such_model_xyz" in message
    for case in align.list_cases()[:3]:
        assert case in message
    assert isinstance(info.value, AlignError) and isinstance(info.value, KeyError)


@pytest.mark.parametrize("precision", ["fp8", "bf16-amp", ""])
def test_unknown_precision(net, x, precision):
    with pytest.raises(AlignError, match=r"unknown precision .*fp32.*amp-bf16.*O1"):
        check(net, x, precision=precision)


@pytest.mark.parametrize("precision", ["O1", "o2", "AMP-BF16", " fp32 "])
def test_precision_aliases_are_accepted(net, x, precision):
    assert check(net, x, precision=precision, phases="forward").passed


@pytest.mark.parametrize("phases", ["forwards", ("forward", "bakward"), (), ""])
def test_unknown_phase(net, x, phases):
    with pytest.raises(AlignError, match=r"unknown phase.*choose from forward, backward, train"):
        check(net, x, phases=phases)


@pytest.mark.parametrize("where", ["reference", "target"])
@pytest.mark.parametrize("device", ["tpu", "cpu:0", "cuda:x", "gpu"])
def test_unknown_device(net, x, where, device):
    with pytest.raises(AlignError, match=r"unknown device .*use cpu, cuda, cuda:N, npu"):
        check(net, x, **{where: device})


def test_unavailable_device_says_why(net, x):
    from align.runtime.devices import discover

    status = discover()["npu"]
    if status.available:
        pytest.skip("an NPU is present")
    with pytest.raises(DeviceUnavailableError, match="npu"):
        check(net, x, target="npu")


def test_module_without_inputs(net):
    with pytest.raises(AlignError, match="inputs are required"):
        align.check(net, reference="cpu", target="cpu")


def test_model_of_another_type():
    with pytest.raises(AlignError, match="nn.Module or a name"):
        align.check(42, torch.zeros(1), reference="cpu", target="cpu")


class NoHalfKernel(nn.Linear):
    """A kernel this device lacks at half precision (CPU LSTMs under fp16 autocast)."""

    def forward(self, x):
        y = super().forward(x)
        if y.dtype == torch.half:
            raise RuntimeError("could not create a primitive descriptor")
        return y


@pytest.mark.parametrize("phases", ["forward,backward", "train"])
def test_a_model_that_cannot_run_at_a_precision_is_an_error_not_a_crash(net, x, phases):
    net.head = NoHalfKernel(16, 4)
    check(net, x, precision="amp-bf16", phases=phases, steps=2)  # runs
    with pytest.raises(ModelRunError, match=r"RuntimeError on cpu at amp-fp16: could not"):
        check(net, x, precision="amp-fp16", phases=phases, steps=2)


def _float32_only_loss(output, inputs):
    """A loss whose kernel has no bf16 version on the CPU (as ctc_loss's), as loss ops
    under autocast run in float32 where the script takes its loss there."""
    if output.dtype in (torch.bfloat16, torch.float16):
        raise NotImplementedError(f'"loss_cpu" not implemented for {output.dtype}')
    return output.square().mean()


@pytest.mark.parametrize("phases", ["forward,backward", "train"])
def test_a_loss_that_raises_is_an_error_saying_to_cast_the_outputs(net, x, phases):
    with pytest.raises(ModelRunError, match=r"loss_fn raised NotImplementedError on cpu at ") as e:
        check(net, x, precision="amp-bf16", phases=phases, steps=2, loss_fn=_float32_only_loss)
    assert "output.float()" in str(e.value)
    cast = check(
        net,
        x,
        precision="amp-bf16",
        phases=phases,
        steps=2,
        loss_fn=lambda out, inputs: _float32_only_loss(out.float(), inputs),
    )
    assert cast.passed


# -- the caller's model is never touched ----------------------------------------------------


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        + len(getattr(m, "_forward_hooks_with_kwargs", {}))
        + len(getattr(m, "_state_dict_hooks", {}))
        for m in model.modules()
    ) + sum(len(p._backward_hooks or {}) for p in model.parameters())


def _snapshot(model: nn.Module):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "strides": {k: v.stride() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": _hooks(model),
        "forward": {n: "forward" in m.__dict__ for n, m in model.named_modules()},
        "classes": {n: type(m) for n, m in model.named_modules()},
    }


def _assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    for key in ("dtypes", "strides", "requires_grad", "training", "hooks", "forward", "classes"):
        assert before[key] == after[key], key
    for n, g in before["grad"].items():
        got = after["grad"][n]
        assert (g is None and got is None) or torch.equal(g, got), n


@pytest.mark.parametrize(
    "precision,emulate", [("fp32", None), ("amp-bf16", None), ("fp32", "npu-fp32")]
)
def test_check_never_mutates_the_callers_models(net, x, nan_target, precision, emulate):
    net.head.weight.grad = torch.full_like(net.head.weight, 0.5)  # a grad the caller had
    net.body[0].bias.requires_grad_(False)  # a frozen parameter
    target = copy.deepcopy(net)
    target.norm.eps = 1e-2  # a fault, so the whole pipeline (golden, isolation) runs
    x_before = x.clone()
    snaps = {"model": _snapshot(net), "target": _snapshot(target)}
    report = check(net, x, target_model=target, precision=precision, emulate=emulate)
    assert not report.passed and report.culprits[0].module == "norm"
    _assert_same(snaps["model"], _snapshot(net))
    _assert_same(snaps["target"], _snapshot(target))
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None
    assert x.is_contiguous()


def test_check_without_target_model_never_mutates(net, x):
    before = _snapshot(net)
    report = check(net, x, emulate="npu-fp32")
    assert report.passed, str(report)
    _assert_same(before, _snapshot(net))


def test_check_in_eval_mode_keeps_eval_mode(net, x):
    net.eval()
    before = _snapshot(net)
    check(net, x, target_model=copy.deepcopy(net), precision="amp-bf16")
    _assert_same(before, _snapshot(net))


@pytest.mark.filterwarnings("ignore")  # gc.get_objects() meets deprecated objects
def test_check_does_not_leak_tensors(net, x):
    import gc

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    target = copy.deepcopy(net)
    target.norm.eps = 1e-2
    check(net, x, target_model=target)
    before = live()
    for _ in range(3):
        check(net, x, target_model=target)
    assert live() <= before, f"{live() - before} tensors leaked by 3 checks"
