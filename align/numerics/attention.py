"""Attention with dropout, drawn where align.numerics.decisions can record it.

A fused attention kernel (CUDA's flash or memory-efficient attention, an NPU's fusion
attention) draws its dropout mask inside the kernel, where no dispatched op shows it, so
another device's mask could be neither recorded nor replayed. While `math_when_dropping()`
is entered, `F.scaled_dot_product_attention` with `dropout_p > 0` (nn.MultiheadAttention
in training calls it too) runs PyTorch's math backend, which draws the mask with a
dropout op; calls without dropout keep the device's own fused kernel.

The function is swapped in torch.nn.functional for the duration (reference-counted, for
nested and concurrent runs) rather than watched by a TorchFunctionMode: a mode costs a
Python call on every torch function, 10% of a ResNet-18 training step at 64 px (measured).
Code that imported the function by name before does not see the swap.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["math_when_dropping"]

_fused = F.scaled_dot_product_attention
_lock = threading.Lock()
_entered = 0


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs):
    """F.scaled_dot_product_attention, on the math backend when it drops."""
    if dropout_p:
        with sdpa_kernel(SDPBackend.MATH):
            return _fused(query, key, value, attn_mask, dropout_p, *args, **kwargs)
    return _fused(query, key, value, attn_mask, dropout_p, *args, **kwargs)


@contextlib.contextmanager
def math_when_dropping() -> Iterator[None]:
    """Attention that drops runs the math backend inside this block (see the module)."""
    global _entered
    with _lock:
        _entered += 1
        F.scaled_dot_product_attention = _attention
    try:
        yield
    finally:
        with _lock:
            _entered -= 1
            if not _entered:
                F.scaled_dot_product_attention = _fused
