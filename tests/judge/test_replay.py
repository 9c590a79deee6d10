"""align.judge.replay: msprobe API calls re-run in float64 from their dumped inputs (the
end-to-end culprit test is tests/record/test_msprobe.py)."""

from __future__ import annotations

import pytest
import torch

from align.judge.replay import (
    REPLAYABLE,
    _function,
    _replay,
    _replay_backward,
    _Unreplayable,
    _value,
)


@pytest.mark.parametrize(
    "api",
    ["Torch.save", "Torch.load", "Functional.dropout", "NPU.npu_fusion_attention", "os.system"],
)
def test_only_listed_arithmetic_is_ever_called(api):
    with pytest.raises(_Unreplayable, match="not replayed"):
        _function(api)


def test_every_listed_api_exists_in_this_torch():
    for prefix, names in REPLAYABLE.items():
        for name in names:
            assert callable(_function(f"{prefix}.{name}")), f"{prefix}.{name}"


def test_a_call_is_rerun_in_float64_from_its_arguments():
    x = torch.randn(2, 3)
    tensors = {"x.pt": x, "w.pt": torch.randn(4, 3)}
    entry = {
        "input_args": [
            {"type": "torch.Tensor", "data_name": "x.pt"},
            {"type": "torch.Tensor", "data_name": "w.pt"},
            None,
        ],
        "input_kwargs": {},
    }
    (out,), ran = _replay("Functional.linear", entry, tensors)
    assert out.dtype == torch.float64 and ran & {"addmm", "mm"}  # a reduction: its floor
    assert torch.allclose(out, x.double() @ tensors["w.pt"].double().T)
    # in place: the dumped input is not changed
    entry = {
        "input_args": [{"type": "torch.Tensor", "data_name": "x.pt"}, {"type": "int", "value": 1}]
    }
    _replay("Tensor.add_", entry, tensors)
    assert torch.equal(tensors["x.pt"], x)


@pytest.mark.parametrize(
    "value, why",
    [
        ({"type": "torch.Tensor", "data_name": "missing.pt"}, "without its file"),
        ({"type": "torch.dtype", "value": "torch.float16"}, "type torch.dtype"),
        ({"type": "int", "value": [1]}, "type int"),
        ("text", "no known form"),
    ],
)
def test_arguments_that_cannot_be_rebuilt_leave_the_call_out(value, why):
    with pytest.raises(_Unreplayable, match=why):
        _value(value, {})


def test_a_backward_is_rerun_in_float64_as_msprobe_hooks_it():
    """msprobe hooks the autograd node of a call's output and dumps the gradients it sends
    to its inputs, in the node's order: a linear without bias is an mm of the input and
    the transposed weight, with a bias an addmm (bias, input, transposed weight). The
    replay gives those, from the dumped output gradient; an input the dump says needed no
    gradient gets none."""
    x, w, b, g = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4), torch.randn(2, 4)
    tensors = {"x.pt": x, "w.pt": w, "b.pt": b, "g.pt": g}
    arg = {k: {"type": "torch.Tensor", "data_name": f"{k}.pt"} for k in "xwb"}
    backward = {"input": [{"type": "torch.Tensor", "data_name": "g.pt"}]}
    forward = {"input_args": [arg["x"], arg["w"]]}
    (gx, gwt), ran = _replay_backward("Functional.linear", forward, backward, tensors)
    assert gx.dtype == torch.float64 and ran  # the ops it ran give its floor
    torch.testing.assert_close(gx, g.double() @ w.double())
    torch.testing.assert_close(gwt, (g.double().T @ x.double()).T)
    forward = {"input_args": [{**arg["x"], "requires_grad": False}, arg["w"], arg["b"]]}
    (gb, gx, gwt), _ = _replay_backward("Functional.linear", forward, backward, tensors)
    torch.testing.assert_close(gb, g.double().sum(0))
    assert gx is None and gwt.shape == (3, 4)  # x needed no gradient on the device
    with pytest.raises(_Unreplayable, match="in-place"):
        _replay_backward("Tensor.add_", forward, backward, tensors)
    with pytest.raises(_Unreplayable, match="no output gradient"):
        _replay_backward("Functional.linear", forward, {"input": [None]}, tensors)


def test_an_in_place_functional_call_replays_its_backward_on_a_copy():
    """F.relu(x, inplace=True) wrote a non-leaf on the device; its replay writes a copy of
    its input, so its backward is re-run (it failed on a leaf before)."""
    x, g = torch.randn(2, 5), torch.randn(2, 5)
    forward = {
        "input_args": [{"type": "torch.Tensor", "data_name": "x", "requires_grad": True}],
        "input_kwargs": {"inplace": {"type": "bool", "value": True}},
    }
    backward = {"input": [{"type": "torch.Tensor", "data_name": "g"}]}
    (gx,), _ = _replay_backward("Functional.relu", forward, backward, {"x": x, "g": g})
    torch.testing.assert_close(gx, g.double() * (x > 0))


def test_a_batch_norm_replays_its_backward_and_draws_its_statistics_in_one_pass():
    """msprobe dumps a batch_norm's running statistics as tensor arguments that need no
    gradient: its node sends gradients to input, weight and bias only. With `one_pass`, the
    replay's statistics are summed as a one-pass kernel's are: per-channel offsets (and
    gains: align.numerics.one_pass's tests say how large)."""
    x, dy = torch.randn(4, 3, 5, 5) + 6, torch.randn(4, 3, 5, 5)
    tensors = {"x": x, "m": torch.zeros(3), "v": torch.ones(3), "w": torch.rand(3), "dy": dy}
    tensor = [{"type": "torch.Tensor", "data_name": k, "requires_grad": k in "xw"} for k in "xmvw"]
    forward = {
        "input_args": [*tensor, None, {"type": "bool", "value": True}]
        + [{"type": "float", "value": 0.1}, {"type": "float", "value": 1e-5}]
    }
    backward = {"input": [{"type": "torch.Tensor", "data_name": "dy"}]}
    (gx, gw, gb), _ = _replay_backward("Functional.batch_norm", forward, backward, tensors)
    assert gx.shape == x.shape and gw.shape == (3,) and gb is None  # no bias: none sent
    (exact,), ran = _replay("Functional.batch_norm", forward, tensors)
    (drawn,), _ = _replay("Functional.batch_norm", forward, tensors, one_pass=0)
    offsets = (drawn - exact).mean((0, 2, 3))
    assert "native_batch_norm" in ran and offsets.abs().min() > 1e-9
    (g_drawn, *_), _ = _replay_backward("Functional.batch_norm", forward, backward, tensors, 0)
    assert not torch.equal(g_drawn, gx)
