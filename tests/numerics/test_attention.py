"""align.numerics.attention: attention that drops runs the math backend while entered,
and torch is left as it was after."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from align.numerics.attention import math_when_dropping


def test_the_swap_is_undone_after_the_last_of_nested_blocks_even_on_error():
    original = F.scaled_dot_product_attention
    with pytest.raises(RuntimeError, match="inner"):
        with math_when_dropping():
            with math_when_dropping():
                pass
            assert F.scaled_dot_product_attention is not original  # the outer still holds
            raise RuntimeError("inner")
    assert F.scaled_dot_product_attention is original


def test_attention_that_drops_runs_where_only_a_fused_backend_is_allowed():
    # the CPU's flash kernel cannot drop: allowed alone, dropping attention has no kernel
    q = torch.randn(2, 2, 5, 8)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        with pytest.raises(RuntimeError, match="No available kernel"):
            F.scaled_dot_product_attention(q, q, q, dropout_p=0.3)
        with math_when_dropping():
            out = F.scaled_dot_product_attention(q, q, q, None, 0.3)
            exact = F.scaled_dot_product_attention(q, q, q)  # no dropout: the fused kernel
    assert out.shape == q.shape
    assert torch.equal(exact, F.scaled_dot_product_attention(q, q, q))
