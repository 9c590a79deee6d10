"""Precision policies: aliases, casting, autocast, o2's fp32 norm layers."""

import pytest
import torch
from torch import nn

from align.errors import AlignError
from align.numerics.precision import (
    KERNEL_ACCURACY,
    error_floor,
    get_policy,
    held_dtype,
    kernel_accuracy,
    kernel_bias,
    round_to,
    shares_statistics,
    unit_roundoff,
    unscaled_dtype,
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


def test_an_fp32_tensor_is_held_at_the_narrowest_precision_its_values_fit():
    """bf16 values, fp16 values, and fp16 values divided by a loss scale (a power of two:
    below fp16's range, still fp16's 11 bits) are held at that precision."""
    g = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert held_dtype(g.to(torch.bfloat16).float()) == torch.bfloat16
    assert held_dtype(g.to(torch.float16).float()) == torch.float16
    assert held_dtype(g.to(torch.float16).float() / 65536) == torch.float16
    assert held_dtype(g.float()) == torch.float32
    assert held_dtype(g[:4].to(torch.bfloat16).float()) == torch.float32  # too few to tell
    assert held_dtype(torch.zeros(100)) == torch.float32


def test_rounding_to_fp16_precision_keeps_float32s_range():
    """An unscaled fp16 gradient's values, far below fp16's smallest normal number, round
    to fp16's 11 bits without flushing; bf16 rounds as a cast does."""
    g = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 1e-7
    rounded = round_to(g, torch.float16)
    assert rounded.dtype == torch.float32 and held_dtype(rounded) == torch.float16
    assert (rounded - g).abs().max() <= g.abs().max() * 2.0**-11
    assert (g.to(torch.float16) == 0).sum() > 0  # what a cast to fp16 would have lost
    assert torch.equal(round_to(g, torch.bfloat16), g.to(torch.bfloat16).float())
    assert round_to(g, torch.float32) is g


def test_a_gradient_divided_by_its_loss_scale_leaves_fp16_for_float32():
    assert unscaled_dtype(torch.float16, 65536.0) == torch.float32
    assert unscaled_dtype(torch.bfloat16, 65536.0) == torch.bfloat16  # fp32's range already
    assert unscaled_dtype(torch.float16, 1.0) == torch.float16
    assert unscaled_dtype(torch.int64, 65536.0) == torch.int64


def test_the_golden_keeps_complex_weights_complex_in_double():
    # Module.to(float64) casts a complex weight to float64, its imaginary part dropped:
    # an FNO's golden then raised on a complex-by-real product (or, worse, ran on half a weight)
    for name, kept in (("fp64", torch.complex128), ("o2-fp16", torch.complex64)):
        model = nn.Linear(2, 2)
        model.spectral = nn.Parameter(torch.tensor([1 + 2j, 3 - 1j], dtype=torch.cfloat))
        model.register_buffer("filter", torch.tensor([2 - 1j], dtype=torch.cfloat))
        get_policy(name).prepare(model)
        assert model.weight.dtype != torch.float32
        assert model.spectral.dtype == model.filter.dtype == kept, name
        assert model.spectral.tolist() == [1 + 2j, 3 - 1j] and model.filter.tolist() == [2 - 1j]
