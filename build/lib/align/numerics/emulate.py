"""Numerics emulation: predict on a CPU how a model will align on an NPU or a GPU.

Accelerators do not run "fp32" convolutions and matrix products in fp32 by default. Ascend
NPUs run fp32 convolutions in HF32 (`torch.npu.conv.allow_hf32` defaults to True, the
matmul switch to False); NVIDIA GPUs run them in TF32 (`torch.backends.cudnn.allow_tf32`
defaults to True, `torch.backends.cuda.matmul.allow_tf32` to False since torch 1.12). Both
formats keep fp32's 8-bit exponent but only 10 of its 23 mantissa bits, so those layers err
about 2^13 times more than on a CPU. An `Emulation` reproduces that on the CPU with a
`TorchDispatchMode`: it rounds the multiplied fp32 inputs of the affected aten ops to the
emulated format, computes, and returns fp32. A float64 golden run under the same mode stays
exact, because only float32 tensors are rounded.

    emulation = parse_emulation("npu-fp32")
    with emulation.mode():
        loss = model(x).sum()
        loss.backward()  # backward must run inside the mode too, to be emulated

This is a model of the number formats, not of the device kernels; `Emulation.describe()`
says what is and is not emulated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    autograd_would_have_decomposed,
)

from align.errors import AlignError

__all__ = ["FP16_ACCUMULATE_BLOCK", "PROFILES", "Emulation", "parse_emulation", "to_tf32"]

# Switches in the order they are recorded; a profile is a named set of them.
_SWITCHES = ("hf32-conv", "hf32-matmul", "tf32-conv", "tf32-matmul", "fp16-accumulate")

PROFILES: dict[str, tuple[str, ...]] = {
    # fp32 on Ascend with default settings: convolutions in HF32, matmuls in fp32.
    "npu-fp32": ("hf32-conv",),
    # fp32 on CUDA with default settings: cuDNN convolutions in TF32, matmuls in fp32.
    "cuda-fp32": ("tf32-conv",),
    # CUDA with torch.backends.cuda.matmul.allow_tf32 = True (or matmul precision "high").
    "cuda-tf32": ("tf32-conv", "tf32-matmul"),
    "hf32-conv": ("hf32-conv",),
    "hf32-matmul": ("hf32-matmul",),
    "tf32-conv": ("tf32-conv",),
    "tf32-matmul": ("tf32-matmul",),
    "tf32": ("tf32-conv", "tf32-matmul"),
    "fp16-accumulate": ("fp16-accumulate",),
}

# fp16-accumulate: products summed in fp32 per block of this many, then rounded to fp16.
FP16_ACCUMULATE_BLOCK = 32


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round a float32 tensor to TF32/HF32 values (1 sign, 8 exponent, 10 mantissa bits).

    Round to nearest, ties to even, on the fp32 bit pattern: the 13 dropped mantissa bits
    are rounded into the kept ones, and a carry out of the mantissa bumps the exponent
    (so the largest fp32 values round to inf, as IEEE rounding does). Signed zeros,
    subnormals (kept, not flushed), inf and NaN are handled; the exponent range is fp32's,
    which is why this is not a float16 cast. Returns a new float32 tensor; not
    differentiable.
    """
    if t.dtype != torch.float32:
        raise TypeError(f"to_tf32 rounds float32 tensors, got {t.dtype}")
    bits = t.view(torch.int32)
    # rounded = (bits + 0x0FFF + lowest kept bit) & ~0x1FFF, in place (it is on every conv
    # input). The bit pattern is sign and magnitude, so adding to the low bits rounds the
    # magnitude for either sign; for finite values it cannot overflow int32 (the largest
    # magnitudes carry into the pattern of inf). Inf and NaN are restored below.
    rounded = bits >> 13
    rounded &= 1
    rounded += 0x0FFF
    rounded += bits
    rounded &= ~0x1FFF
    return torch.where(torch.isfinite(t), rounded.view(torch.float32), t)


def _to_fp16(t: torch.Tensor) -> torch.Tensor:
    """Round float32 values to float16 (nearest even, fp16 range), kept as float32."""
    return t.to(torch.float16).to(torch.float32)


def _is_fp32(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float32


@dataclass(frozen=True)
class _Op:
    """How an emulated aten op multiplies: what to round and what it sums over."""

    family: str  # "conv" or "matmul": which switches cover the op
    operands: tuple[int, ...]  # argument positions of the multiplied tensors
    reduce_dims: tuple[int, int] | None = None  # matmul family: summed dim of each operand
    added_term: bool = False  # computes beta * self + alpha * (product), beta a keyword


_aten = torch.ops.aten
_OPS: dict[Any, _Op] = {
    # convolution(input, weight, bias, stride, padding, dilation, transposed, ...)
    _aten.convolution.default: _Op("conv", (0, 1)),
    # convolution_backward(grad_output, input, weight, bias_sizes, ..., output_mask)
    _aten.convolution_backward.default: _Op("conv", (0, 1, 2)),
    # nn.Linear, matmul and einsum reach dispatch as these (their backward too).
    _aten.mm.default: _Op("matmul", (0, 1), (-1, -2)),
    _aten.addmm.default: _Op("matmul", (1, 2), (-1, -2), added_term=True),
    _aten.bmm.default: _Op("matmul", (0, 1), (-1, -2)),
    _aten.baddbmm.default: _Op("matmul", (1, 2), (-1, -2), added_term=True),
    _aten.mv.default: _Op("matmul", (0, 1), (-1, -1)),
    _aten.addmv.default: _Op("matmul", (1, 2), (-1, -1), added_term=True),
    _aten.dot.default: _Op("matmul", (0, 1), (-1, -1)),
}


def _round_inputs_tf32(func: Any, op: _Op, args: tuple, kwargs: dict) -> Any:
    """HF32/TF32: round the multiplied operands, accumulate in fp32 (as the hardware does).

    Added terms (bias, `beta * self`) stay fp32. In convolution backward the bias gradient
    is a plain sum of grad_output, not a product, so it is computed from the unrounded one.
    """
    rounded = tuple(to_tf32(a) if i in op.operands else a for i, a in enumerate(args))
    if func is not _aten.convolution_backward.default or not args[10][2]:
        return func(*rounded, **kwargs)
    grad_input, grad_weight, _ = func(*rounded[:10], [*args[10][:2], False], **kwargs)
    grad_bias = func(*args[:10], [False, False, True], **kwargs)[2]
    return grad_input, grad_weight, grad_bias


def _matmul_blocks(func: Any, op: _Op, args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """Partial products over consecutive blocks of the summed dim; the first adds `self`."""
    (ia, ib), (da, db) = op.operands, op.reduce_dims
    a, b = args[ia], args[ib]
    k = a.shape[da]
    for start in range(0, max(k, 1), FP16_ACCUMULATE_BLOCK):  # one empty block if k == 0
        n = min(FP16_ACCUMULATE_BLOCK, k - start)
        part = list(args)
        part[ia], part[ib] = a.narrow(da, start, n), b.narrow(db, start, n)
        later = op.added_term and start > 0
        yield func(*part, **({**kwargs, "beta": 0} if later else kwargs))


def _conv_blocks(func: Any, args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """Partial convolutions over blocks of input channels (per group); the first adds bias.

    A block holds max(1, FP16_ACCUMULATE_BLOCK // kernel window) channels, so each partial
    sum covers about FP16_ACCUMULATE_BLOCK products (one channel's window if larger).
    """
    x, w, bias, transposed, groups = args[0], args[1], args[2], args[6], args[8]
    per_group = x.shape[1] // groups
    step = max(1, FP16_ACCUMULATE_BLOCK // math.prod(w.shape[2:]))
    for start in range(0, max(per_group, 1), step):  # one empty block if no channels
        local = torch.arange(start, min(start + step, per_group))
        channels = (torch.arange(groups)[:, None] * per_group + local).flatten()
        # weight is (out, in/groups, *k) for a convolution, (in, out/groups, *k) transposed
        w_part = w.index_select(0, channels) if transposed else w[:, start : start + len(local)]
        first_bias = bias if start == 0 else None
        yield func(x.index_select(1, channels), w_part, first_bias, *args[3:], **kwargs)


def _fp16_accumulate(func: Any, op: _Op, args: tuple, kwargs: dict) -> Any:
    """fp16: every fp32 input rounded to fp16, blockwise sums rounded to fp16 (see describe)."""
    args = tuple(_to_fp16(a) if _is_fp32(a) else a for a in args)
    if func is _aten.convolution_backward.default:
        out = func(*args, **kwargs)
        return pytree.tree_map(lambda t: _to_fp16(t) if _is_fp32(t) else t, out)
    if func is _aten.convolution.default:
        blocks = _conv_blocks(func, args, kwargs)
    else:
        blocks = _matmul_blocks(func, op, args, kwargs)
    total = _to_fp16(next(blocks))
    for part in blocks:
        total = _to_fp16(total + _to_fp16(part))
    return total


class _EmulationMode(TorchDispatchMode):
    """The dispatch mode behind `Emulation.mode()`."""

    def __init__(self, switches: tuple[str, ...]) -> None:
        super().__init__()
        self._fp16 = "fp16-accumulate" in switches
        if self._fp16:
            families = {"conv", "matmul"}
        else:  # "hf32-conv" -> "conv"
            families = {s.split("-")[1] for s in switches}
        self._ops = {func: op for func, op in _OPS.items() if op.family in families}

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        op = self._ops.get(func)
        if op is not None and all(_is_fp32(args[i]) for i in op.operands):
            if self._fp16:
                return _fp16_accumulate(func, op, args, kwargs)
            return _round_inputs_tf32(func, op, args, kwargs)
        # Under inference_mode autograd does not decompose composite ops (linear, conv2d,
        # matmul) before they reach us; decompose them here so their mm/convolution do.
        if torch.is_inference_mode_enabled() and autograd_would_have_decomposed(
            func, pytree.arg_tree_leaves(*args, **kwargs)
        ):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Emulation:
    """A set of emulated device numerics switches, applied on the CPU by `mode()`."""

    name: str
    switches: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = [s for s in self.switches if s not in _SWITCHES]
        if unknown or not self.switches:
            raise AlignError(
                f"unknown emulation switches {unknown or '(none given)'}; "
                f"known switches: {', '.join(_SWITCHES)}"
            )
        others = [s for s in self.switches if s != "fp16-accumulate"]
        if "fp16-accumulate" in self.switches and others:
            raise AlignError(
                "fp16-accumulate already covers convolutions and matmuls: "
                f"do not combine it with {', '.join(others)}"
            )

    def mode(self) -> TorchDispatchMode:
        """A fresh context manager that emulates the switches while it is active."""
        return _EmulationMode(self.switches)

    def describe(self) -> str:
        """One paragraph: what is emulated and what is not."""
        parts = [
            f"Emulation '{self.name}' is an emulation on the CPU, not the device: it "
            f"models the device's number formats, not its kernels."
        ]
        conv = [s.split("-")[0].upper() for s in self.switches if s.endswith("-conv")]
        matmul = [s.split("-")[0].upper() for s in self.switches if s.endswith("-matmul")]
        if conv:
            parts.append(
                f"Convolutions (aten.convolution, and in backward aten.convolution_backward "
                f"for the input and weight gradients) round input, weight and grad_output "
                f"from fp32 to {'/'.join(conv)} (1 sign, 8 exponent, 10 mantissa bits, round "
                f"to nearest even) and accumulate in fp32; the bias and its gradient stay fp32."
            )
        if matmul:
            parts.append(
                f"Matrix products (aten mm, addmm, bmm, baddbmm, mv, addmv, dot: what "
                f"nn.Linear, matmul and einsum reach, forward and backward) round both "
                f"factors to {'/'.join(matmul)} likewise and accumulate in fp32; the added "
                f"term (bias) stays fp32."
            )
        if "fp16-accumulate" in self.switches:
            parts.append(
                f"Convolutions and matrix products round every fp32 input (bias included) "
                f"to fp16 and accumulate in fp16: the summed dimension is cut into blocks of "
                f"{FP16_ACCUMULATE_BLOCK} products (for a convolution, whole input channels: "
                f"max(1, {FP16_ACCUMULATE_BLOCK} // kernel window) per block), each block is "
                f"summed in fp32 and rounded to fp16, and the running sum is rounded to fp16 "
                f"after each block, the bias seeding it. Hardware accumulating in fp16 rounds "
                f"after every few products (one MMA instruction), in an order set by the "
                f"kernel's tiling: this models the size of that error, not its bits; "
                f"convolution backward only rounds its inputs and "
                f"results to fp16 (its accumulation stays fp32)."
            )
        parts.append(
            "Only float32 tensors are rounded (float64, bf16 and fp16 pass through "
            "unchanged) and every other op (elementwise, normalization, pooling, "
            "reductions) runs in plain fp32. Not emulated: the device kernels' summation "
            "order and tiling, algorithm choice (Winograd, FFT, split-K), conversions that "
            "round ties away from zero or truncate instead of rounding to nearest even, "
            "subnormal flushing, fused attention (F.scaled_dot_product_attention runs a "
            "fused CPU kernel, left in fp32), and anything the mode does not see: backward "
            "must run inside the mode too."
        )
        return " ".join(parts)

    def record(self) -> dict[str, object]:
        """The entry for the environment record of a run."""
        return {"name": self.name, "switches": list(self.switches), "note": "emulated on cpu"}


def parse_emulation(spec: str) -> Emulation:
    """Parse a profile name or a comma list of switches (profiles may appear in the list).

    Args:
        spec: e.g. "npu-fp32", "cuda-tf32", "hf32-conv,tf32-matmul".

    Returns:
        The `Emulation`, named after the normalized spec, with its switches in a fixed order.

    Raises:
        AlignError: an unknown name (the message lists the known ones), an empty spec, or
            fp16-accumulate combined with another switch.
    """
    names = [part.strip().lower() for part in spec.split(",") if part.strip()]
    unknown = [n for n in names if n not in PROFILES]
    if unknown or not names:
        raise AlignError(
            f"unknown emulation {', '.join(unknown) or repr(spec)}; "
            f"known profiles and switches: {', '.join(PROFILES)}"
        )
    chosen = {switch for n in names for switch in PROFILES[n]}
    return Emulation(",".join(names), tuple(s for s in _SWITCHES if s in chosen))
