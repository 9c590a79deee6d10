"""Tests of align.numerics.emulate against floating-point theory, not against the implementation.

Expected values are worked out by hand from the TF32 format (1 sign, 8 exponent, 10
mantissa bits, round to nearest even), and the emulated products are checked against
float64 with the classical error bound of rounding each factor to 10 mantissa bits
(relative error u = 2^-11 each) plus fp32 accumulation (gamma_k = k 2^-24 / (1 - k 2^-24)).
"""

from __future__ import annotations

import json
import math
from dataclasses import FrozenInstanceError

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from align.errors import AlignError
from align.numerics.emulate import (
    FP16_ACCUMULATE_BLOCK,
    PROFILES,
    Emulation,
    parse_emulation,
    to_tf32,
)

U = 2.0**-11  # unit roundoff of a 10-bit mantissa (TF32, HF32 and fp16 alike)
FP32_MAX = torch.finfo(torch.float32).max
TF32_MAX = (2 - 2.0**-10) * 2.0**127

fp32_values = st.floats(width=32, allow_nan=False, allow_infinity=False)
# a shared machine times noisily: no per-example deadline
few_examples = settings(deadline=None, max_examples=150)


def tf32_reference(x: float) -> float:
    """Round x to 11 significant bits (10 stored) by arithmetic: Python's round() is
    round-half-even, and below 2^-126 the spacing stays 2^-136 (gradual underflow)."""
    if x == 0:
        return x
    _, e = math.frexp(x)  # |x| = m 2^e with 0.5 <= m < 1
    quantum = 2.0 ** (max(e, -125) - 11)
    return round(x / quantum) * quantum


def rounded(x: float) -> float:
    return to_tf32(torch.tensor([x], dtype=torch.float32)).item()


def gamma(k: int) -> float:
    return k * 2.0**-24 / (1 - k * 2.0**-24)


def tf32_bound(k: int) -> float:
    """|emulated - exact| <= this * sum_i |a_i b_i| for a k-term product sum."""
    return 2 * U + U * U + gamma(k) * (1 + U) ** 2


# --- the rounding primitive ---------------------------------------------------------


@pytest.mark.parametrize(
    "x, expected",
    [
        (1.0, 1.0),
        (1 + 2.0**-10, 1 + 2.0**-10),  # representable: unchanged
        (1 + 2.0**-11, 1.0),  # tie, 1.0 has an even last bit
        (1 + 3 * 2.0**-11, 1 + 2.0**-9),  # tie, 1 + 2^-10 is odd: up to even
        (1 + 2.0**-11 + 2.0**-23, 1 + 2.0**-10),  # just above the tie
        (1 + 2.0**-11 - 2.0**-23, 1.0),  # just below the tie
        (1 / 3, 1365 / 4096),  # 0x3EAAAAAB: dropped bits 0x0AAB < 0x1000, truncates
        (2 - 2.0**-23, 2.0),  # carry out of the mantissa bumps the exponent
        (2 - 2.0**-11, 2.0),  # tie between 2 - 2^-10 (odd) and 2: carries
        (-(1 + 2.0**-11), -1.0),
        (-(1 + 3 * 2.0**-11), -(1 + 2.0**-9)),
        (-(2 - 2.0**-23), -2.0),
        (TF32_MAX, TF32_MAX),
        (FP32_MAX, math.inf),  # above TF32_MAX + half a step: overflows like IEEE
        (-FP32_MAX, -math.inf),
        (2.0**-136, 2.0**-136),  # smallest TF32 subnormal
        (2.0**-149, 0.0),  # smallest fp32 subnormal: below half a step
        (3 * 2.0**-137, 2.0**-135),  # tie between 2^-136 (odd) and 2^-135
        (2.0**-126 - 2.0**-149, 2.0**-126),  # largest subnormal carries to the smallest normal
        (math.inf, math.inf),
        (-math.inf, -math.inf),
    ],
)
def test_to_tf32_known_values(x: float, expected: float) -> None:
    assert rounded(x) == expected


@pytest.mark.parametrize("x", [0.0, -0.0, 2.0**-149, -(2.0**-149)])
def test_to_tf32_keeps_the_sign_of_zero(x: float) -> None:
    out = to_tf32(torch.tensor([x], dtype=torch.float32))
    assert out.item() == 0.0
    assert torch.signbit(out).item() == (math.copysign(1, x) < 0)


def test_to_tf32_keeps_nan_and_layout() -> None:
    assert math.isnan(rounded(math.nan))
    t = torch.randn(5, 7)
    assert torch.equal(to_tf32(t.t()), to_tf32(t).t())  # strided input, same values
    assert torch.equal(to_tf32(t.t().contiguous()), to_tf32(t).t())


def test_to_tf32_rejects_other_dtypes() -> None:
    with pytest.raises(TypeError, match="float32"):
        to_tf32(torch.ones(2, dtype=torch.float64))


@few_examples
@given(fp32_values)
def test_to_tf32_is_round_half_even_to_11_significant_bits(x: float) -> None:
    expected = torch.tensor([tf32_reference(x)], dtype=torch.float32)  # 2^128 becomes inf
    out = to_tf32(torch.tensor([x], dtype=torch.float32))
    assert out.item() == expected.item()
    assert torch.signbit(out).item() == (math.copysign(1, x) < 0)


@few_examples
@given(
    st.floats(min_value=2.0**-126, max_value=TF32_MAX, width=32),
    st.sampled_from([1.0, -1.0]),
)
def test_relative_error_of_normal_values_is_at_most_2_to_minus_11(x: float, sign: float) -> None:
    x *= sign
    assert abs(rounded(x) - x) <= U * abs(x)


@few_examples
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64))
def test_to_tf32_is_idempotent_monotone_and_drops_13_bits(values: list[float]) -> None:
    t = torch.tensor(sorted(values), dtype=torch.float32)
    once = to_tf32(t)
    assert torch.equal(to_tf32(once), once)
    assert bool((once[1:] >= once[:-1]).all())
    finite = torch.isfinite(once)
    assert bool((once[finite].view(torch.int32) & 0x1FFF == 0).all())


# --- emulated products against float64 -----------------------------------------------


def test_emulated_matmul_error_is_the_10_bit_input_rounding_error() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 256, generator=g), torch.randn(256, 24, generator=g)
    exact = a.double() @ b.double()
    scale = a.abs().double() @ b.abs().double()
    with parse_emulation("tf32-matmul").mode():
        emulated = a @ b
    emulated_err = (emulated.double() - exact).abs()
    plain_err = ((a @ b).double() - exact).abs()

    assert bool((emulated_err <= tf32_bound(256) * scale).all())
    # it is the product of the rounded inputs, summed in fp32
    of_rounded = to_tf32(a).double() @ to_tf32(b).double()
    assert bool(((emulated.double() - of_rounded).abs() <= gamma(256) * scale).all())
    # and clearly worse than fp32, so a mode that does nothing fails
    assert emulated_err.max() > 100 * plain_err.max()


def test_emulated_conv_forward_and_backward_error_bounds() -> None:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 16, 10, 10, generator=g), torch.randn(8, 16, 3, 3, generator=g)
    bias, cotangent = torch.randn(8, generator=g), torch.randn(2, 8, 8, 8, generator=g)

    def run(dtype: torch.dtype, emulation: str | None = None) -> list[torch.Tensor]:
        xs, ws, bs = (t.to(dtype, copy=True).requires_grad_() for t in (x, w, bias))
        mode = parse_emulation(emulation).mode() if emulation else torch.enable_grad()
        with mode:
            out = F.conv2d(xs, ws, bs)
            (out * cotangent.to(dtype)).sum().backward()  # grad_output does not depend on out
        return [out.detach().double(), xs.grad.double(), ws.grad.double(), bs.grad.double()]

    exact, plain, emulated = run(torch.float64), run(torch.float32), run(torch.float32, "hf32-conv")
    with torch.no_grad():  # the same sums over |terms|, for the bounds
        xa, wa, ca = x.abs().double(), w.abs().double(), cotangent.abs().double()
        scales = [
            F.conv2d(xa, wa, bias.abs().double()),
            torch.nn.grad.conv2d_input(x.shape, wa, ca),
            torch.nn.grad.conv2d_weight(xa, w.shape, ca),
        ]
    terms = [16 * 9 + 1, 8 * 9, 2 * 8 * 8]  # terms summed per output / input / weight element
    for e, p, x_, scale, k in zip(emulated, plain, exact, scales, terms, strict=False):
        emulated_err, plain_err = (e - x_).abs(), (p - x_).abs()
        assert bool((emulated_err <= tf32_bound(k) * scale).all())
        assert emulated_err.max() > 100 * plain_err.max()
    # the bias gradient is a plain sum of grad_output, not a product: untouched
    assert torch.equal(emulated[3], plain[3])


@pytest.mark.parametrize("profile", ["cuda-tf32", "npu-fp32,hf32-matmul", "fp16-accumulate"])
def test_the_added_bias_is_not_rounded_to_tf32(profile: str) -> None:
    # with a zero factor the output is the bias alone: fp32 under TF32/HF32, where only the
    # multiplied factors are converted; fp16 under fp16-accumulate, where it seeds the sum
    bias = torch.full((3,), 1 + 2.0**-20)
    expected = bias.half().float() if profile == "fp16-accumulate" else bias
    with parse_emulation(profile).mode():
        linear = F.linear(torch.ones(2, 4), torch.zeros(3, 4), bias)
        conv = F.conv2d(torch.ones(1, 4, 2, 2), torch.zeros(3, 4, 1, 1), bias)
    assert torch.equal(linear, expected.expand(2, 3))
    assert torch.equal(conv, expected.view(1, 3, 1, 1).expand(1, 3, 2, 2))


def fp16_bound(k: int, blocks: int, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(relative, absolute) error bound of fp16-accumulate over k products of entries of a
    and b in `blocks` blocks: both factors rounded (u each), fp32 sums within a block, two
    fp16 roundings (u each) per block of partial and running sums, which stay within 1% of
    the sum of |terms|. Values below 2^-14 are fp16 subnormals, rounded with an absolute
    error up to 2^-25: the absolute part."""
    relative = tf32_bound(FP16_ACCUMULATE_BLOCK) + 2 * blocks * U * 1.01
    absolute = (k * (a.abs().max() + b.abs().max()).item() + 2 * blocks) * 2.0**-25
    return relative, absolute


def test_fp16_accumulate_matmul_rounds_partial_sums_to_fp16() -> None:
    # 2048 + 1 + 1 over three blocks: 2049 is a tie in fp16 (spacing 2 above 2048) and
    # rounds to even 2048, twice; rounding only the exact 2050 would keep it.
    a = torch.zeros(1, 3 * FP16_ACCUMULATE_BLOCK)
    a[0, 0] = 2048.0
    a[0, FP16_ACCUMULATE_BLOCK:] = 1.0 / FP16_ACCUMULATE_BLOCK
    b = torch.ones(3 * FP16_ACCUMULATE_BLOCK, 1)
    with parse_emulation("fp16-accumulate").mode():
        assert (a @ b).item() == 2048.0
        # a 1x1 convolution sums FP16_ACCUMULATE_BLOCK input channels per block
        out = F.conv2d(a.view(1, -1, 1, 1), b.view(1, -1, 1, 1))
        assert out.item() == 2048.0
    assert (a @ b).item() == 2050.0


def fp16_case(case: str) -> tuple:
    """fn(x, w, b), x, w, b, products summed per output element, fp16 blocks per output."""
    g = torch.Generator().manual_seed(2)
    if case == "linear":
        x, w, b = (torch.randn(*shape, generator=g) for shape in ((5, 100), (6, 100), (6,)))
        return (lambda x, w, b: F.linear(x, w, b)), x, w, b, 100, 4
    if case == "bmm":
        x, w = torch.randn(3, 4, 100, generator=g), torch.randn(3, 100, 5, generator=g)
        return (lambda x, w, b: x @ w), x, w, torch.zeros(()), 100, 4
    if case == "mv":
        x, w = torch.randn(7, 100, generator=g), torch.randn(100, generator=g)
        return (lambda x, w, b: x @ w), x, w, torch.zeros(()), 100, 4
    # 12 input channels, a 3x3 window: blocks of 32 // 9 = 3 channels
    groups = 1 if case == "conv" else 3  # 4 channels per group: a block boundary inside
    transposed = case.startswith("transposed")
    conv = F.conv_transpose2d if transposed else F.conv2d
    w_shape = (12, 6 // groups, 3, 3) if transposed else (6, 12 // groups, 3, 3)
    x, w, b = (torch.randn(*shape, generator=g) for shape in ((2, 12, 9, 9), w_shape, (6,)))
    per_group = 12 // groups
    return (lambda x, w, b: conv(x, w, b, groups=groups)), x, w, b, per_group * 9, per_group // 3


@pytest.mark.parametrize(
    "case", ["linear", "bmm", "mv", "conv", "grouped-conv", "transposed-grouped-conv"]
)
def test_fp16_accumulate_error_bound_and_fp16_values(case: str) -> None:
    fn, x, w, b, k, blocks = fp16_case(case)
    exact = fn(x.double(), w.double(), b.double())
    sum_of_terms = fn(x.abs().double(), w.abs().double(), b.abs().double())
    with parse_emulation("fp16-accumulate").mode():
        emulated = fn(x, w, b)
    relative, absolute = fp16_bound(k, blocks, x, w)
    error = (emulated.double() - exact).abs()
    assert bool((error <= relative * sum_of_terms + absolute).all())
    assert error.max() > 100 * (fn(x, w, b).double() - exact).abs().max()
    assert torch.equal(emulated.half().float(), emulated)  # results are fp16 values


# --- which ops each profile touches ---------------------------------------------------


def forward_backward(fn, *inputs: torch.Tensor, emulation: str | None = None) -> list[torch.Tensor]:
    """fn's output and the gradients of <output, fixed cotangent> w.r.t. the inputs."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    with parse_emulation(emulation).mode() if emulation else torch.enable_grad():
        out = fn(*leaves)
        cotangent = torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype)
        (out * cotangent).sum().backward()
    return [out.detach(), *(t.grad for t in leaves)]


def conv_case(dtype: torch.dtype = torch.float32) -> tuple:
    g = torch.Generator().manual_seed(3)
    x, w, b = (
        torch.randn(2, 4, 6, 6, generator=g),
        torch.randn(5, 4, 3, 3, generator=g),
        torch.randn(5),
    )
    return (lambda x, w, b: F.conv2d(x, w, b, padding=1)), x.to(dtype), w.to(dtype), b.to(dtype)


def linear_case(dtype: torch.dtype = torch.float32) -> tuple:
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(2, 3, 40, generator=g), torch.randn(7, 40, generator=g), torch.randn(7)
    return (lambda x, w, b: F.linear(x, w, b)), x.to(dtype), w.to(dtype), b.to(dtype)


def bmm_case() -> tuple:
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 5, 40, generator=g), torch.randn(2, 6, 40, generator=g)
    return (lambda q, k: torch.einsum("bqd,bkd->bqk", q, k)), q, k


@pytest.mark.parametrize(
    "profile, changes_conv, changes_matmul",
    [
        ("npu-fp32", True, False),
        ("cuda-fp32", True, False),
        ("hf32-conv", True, False),
        ("tf32-conv", True, False),
        ("hf32-matmul", False, True),
        ("tf32-matmul", False, True),
        ("cuda-tf32", True, True),
        ("tf32", True, True),
        ("fp16-accumulate", True, True),
    ],
)
def test_a_profile_changes_exactly_the_ops_it_claims(
    profile: str, changes_conv: bool, changes_matmul: bool
) -> None:
    for case, changes in (
        (conv_case(), changes_conv),
        (linear_case(), changes_matmul),
        (bmm_case(), changes_matmul),
    ):
        plain = forward_backward(*case)
        emulated = forward_backward(*case, emulation=profile)
        # the output and the gradients of both factors (a bias gradient is a sum: not here)
        for p, e in zip(plain[:3], emulated[:3], strict=True):
            assert torch.equal(p, e) != changes


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_elementwise_normalization_and_reductions_are_bit_identical(profile: str) -> None:
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    weight, bias = torch.rand(4, generator=g), torch.randn(4, generator=g)

    def ops(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = F.relu(x) + y * 0.3 - F.gelu(y)
        z = F.batch_norm(z, None, None, weight, bias, training=True)
        z = F.layer_norm(z, z.shape[1:]) + F.softmax(z, dim=1)
        return F.avg_pool2d(z, 2).sum(dim=(2, 3)) + z.mean()

    plain = forward_backward(ops, x, y)
    emulated = forward_backward(ops, x, y, emulation=profile)
    assert all(torch.equal(p, e) for p, e in zip(plain, emulated, strict=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("profile", ["cuda-tf32", "npu-fp32", "fp16-accumulate"])
def test_other_dtypes_pass_through_bit_identically(profile: str, dtype: torch.dtype) -> None:
    for case in (conv_case(dtype), linear_case(dtype)):
        plain = forward_backward(*case)
        emulated = forward_backward(*case, emulation=profile)
        assert all(torch.equal(p, e) for p, e in zip(plain, emulated, strict=True))


def test_inference_mode_is_emulated_too() -> None:
    # under inference_mode linear and conv2d reach the mode undecomposed
    for fn, *inputs in (conv_case(), linear_case()):
        with torch.no_grad(), parse_emulation("cuda-tf32").mode():
            expected = fn(*inputs)
        with torch.inference_mode(), parse_emulation("cuda-tf32").mode():
            out = fn(*inputs)
        assert torch.equal(out, expected)
        assert not torch.equal(out, fn(*inputs))


# --- parsing and records --------------------------------------------------------------


def test_profiles_match_the_device_defaults() -> None:
    assert PROFILES["npu-fp32"] == ("hf32-conv",)
    assert PROFILES["cuda-fp32"] == ("tf32-conv",)
    assert set(PROFILES["cuda-tf32"]) == {"tf32-conv", "tf32-matmul"}
    for switch in ("hf32-conv", "hf32-matmul", "tf32-conv", "tf32-matmul", "fp16-accumulate"):
        assert PROFILES[switch] == (switch,)
    assert parse_emulation("tf32").switches == ("tf32-conv", "tf32-matmul")


def test_parse_a_comma_list() -> None:
    emulation = parse_emulation(" tf32-matmul, HF32-conv ")
    assert emulation.switches == ("hf32-conv", "tf32-matmul")
    assert emulation.name == "tf32-matmul,hf32-conv"
    assert parse_emulation("npu-fp32") == Emulation("npu-fp32", ("hf32-conv",))


@pytest.mark.parametrize("spec", ["npu-fp16", "tf32,bogus", "", " , "])
def test_unknown_names_are_align_errors_listing_the_known(spec: str) -> None:
    with pytest.raises(AlignError, match="npu-fp32.*cuda-tf32.*fp16-accumulate"):
        parse_emulation(spec)


def test_invalid_switch_sets_are_rejected() -> None:
    with pytest.raises(AlignError, match="do not combine"):
        parse_emulation("fp16-accumulate,tf32-matmul")
    with pytest.raises(AlignError, match="known switches"):
        Emulation("x", ("tf16-conv",))
    with pytest.raises(FrozenInstanceError):
        parse_emulation("tf32").name = "y"  # type: ignore[misc]


def test_record_and_describe() -> None:
    emulation = parse_emulation("npu-fp32")
    record = emulation.record()
    assert record == {"name": "npu-fp32", "switches": ["hf32-conv"], "note": "emulated on cpu"}
    assert json.loads(json.dumps(record)) == record
    for spec, says in (
        ("npu-fp32", "HF32"),
        ("tf32-matmul", "Matrix products"),
        ("fp16-accumulate", "fp16"),
    ):
        text = parse_emulation(spec).describe()
        assert "emulation on the CPU, not the device" in text
        assert says in text
        assert "\n" not in text
