"""align.numerics.versions: list ops written in place under align's modes bump versions,
as they do without a mode (torch skips it under one)."""

from __future__ import annotations

import torch

from align.numerics.decisions import Decisions


def test_foreach_ops_in_place_bump_versions_under_decisions():
    grads = [torch.randn(3), torch.randn(2)]
    with Decisions():
        torch._foreach_mul_(grads, 0.5)  # clip_grad_norm_, foreach optimizers
        assert [g._version for g in grads] == [1, 1]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, torch.zeros(1), torch.ones(1))
        assert [g._version for g in grads] == [2, 2]  # GradScaler.unscale_
        torch._foreach_add(grads, 1.0)  # out of place: nothing written
        assert [g._version for g in grads] == [2, 2]
