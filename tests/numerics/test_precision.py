"""Precision policies: aliases, casting, autocast, o2's fp32 norm layers."""

import pytest
import torch
from torch import nn

from align.errors import AlignError
from align.numerics.precision import (
    KERNEL_ACCURACY,
    error_floor,
    get_policy,
    kernel_accuracy,
    kernel_bias,
    shares_statistics,
    unit_roundoff,
)


@pytest.mark.parametrize(
    "name, canonical",
    [("O1", "amp-fp16"), ("o2", "o2-fp16"), ("AMP-BF16", "amp-bf16"), ("fp32", "fp32")],
)
def test_aliases(name, canonical):
    assert get_policy(name).name == canonical


def test_unknown_precision_lists_known():
    with pytest.raises(AlignError, match="amp-bf16"):
        get_policy("fp8")


def test_o2_halves_model_but_keeps_norms_fp32():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Linear(4, 2)
    )
    get_policy("o2-fp16").prepare(model)
    assert model[0].weight.dtype == torch.float16
    assert model[3].weight.dtype == torch.float16
    assert model[1].weight.dtype == torch.float32 and model[1].running_mean.dtype == torch.float32
    assert model[2].weight.dtype == torch.float32


def test_cast_inputs_copies_and_keeps_integers():
    x = {"img": torch.ones(2), "label": torch.tensor([1])}
    out = get_policy("o2-fp16").cast_inputs(x, torch.device("cpu"))
    assert out["img"].dtype == torch.float16 and out["label"].dtype == torch.int64
    out32 = get_policy("fp32").cast_inputs(x, torch.device("cpu"))
    assert out32["img"] is not x["img"]  # a private copy, never the caller's tensor


def test_autocast_applies_low_precision():
    policy = get_policy("amp-bf16")
    with policy.autocast(torch.device("cpu")):
        y = nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == torch.bfloat16
    with get_policy("fp32").autocast(torch.device("cpu")):
        assert nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32


def test_floors_order_by_precision():
    assert (
        unit_roundoff(torch.float64) < unit_roundoff(torch.float32) < unit_roundoff(torch.float16)
    )
    assert error_floor(torch.float32) < error_floor(torch.float16) < error_floor(torch.bfloat16)


def test_kernel_bias_is_one_rounding_but_for_transcendental_functions():
    """A slice may share one rounding's bias; a 2-ulp transcendental kernel all of it."""
    assert kernel_bias(kernel_accuracy({"add", "mul"})) == 1.0
    assert kernel_bias(kernel_accuracy({"convolution", "add"})) == 1.0
    transcendental = KERNEL_ACCURACY["transcendental"]
    assert kernel_bias(kernel_accuracy({"convolution", "silu"})) == transcendental


def test_a_normalization_shares_statistics_and_a_convolution_does_not():
    assert shares_statistics({"convolution", "native_batch_norm"})
    assert shares_statistics({"native_layer_norm_backward"})
    assert not shares_statistics({"convolution", "relu", "mean"})
