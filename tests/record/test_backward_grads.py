"""align.record.backward_grads: which recorded parameter gradients are one backward's own,
unchanged, so that a module's call alone reproduces them (align.judge.step_isolation)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import align
from align.record.backward_grads import BackwardGrads
from align.record.loop_dump import LoopDump


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _watched(model: nn.Module, between, backwards: int = 1, empty: bool = True):
    """One step: `backwards` backward passes, then `between(model)`; what the watcher says
    of the first layer's weight."""
    if not empty:  # a gradient already there
        model(torch.randn(8, 4, generator=torch.Generator().manual_seed(3))).sum().backward()
        assert model[0].weight.grad.any()
    grads = BackwardGrads(model, None)
    with contextlib.ExitStack() as stack:
        grads.install(stack)
        for _ in range(backwards):
            model(torch.randn(5, 4)).square().sum().backward()
        between(model)
    return grads.own("0.weight"), grads.unchanged("0.weight")


def test_one_backward_into_empty_grads_is_its_own_and_unchanged():
    assert _watched(_net(), lambda m: None) == (True, True)


@pytest.mark.parametrize(
    "between",
    [
        lambda m: nn.utils.clip_grad_norm_(m.parameters(), 1e-3),  # clipping
        lambda m: [p.grad.div_(8.0) for p in m.parameters()],  # a loss scaler's unscaling
        lambda m: [p.grad.copy_(p.grad * 0.5) for p in m.parameters()],  # an all-reduce
        lambda m: [setattr(p, "grad", p.grad.clone()) for p in m.parameters()],  # replaced
    ],
)
def test_a_gradient_changed_after_backward_is_not_unchanged(between):
    assert _watched(_net(), between) == (True, False)


def test_accumulated_gradients_are_not_one_backwards():
    assert _watched(_net(), lambda m: None, backwards=2)[0] is False
    assert _watched(_net(), lambda m: None, empty=False)[0] is False


def test_a_gradient_into_zeros_left_in_place_is_one_backwards():
    # a script's `zero_grad(set_to_none=False)`: zeros plus backward's gradient is it
    model = _net()
    model(torch.ones(1, 4)).sum().backward()
    model.zero_grad(set_to_none=False)
    grads = BackwardGrads(model, None)
    with contextlib.ExitStack() as stack:
        grads.install(stack)
        model(torch.randn(5, 4)).square().sum().backward()
    assert grads.own("0.weight") and grads.empty_before("0.weight")


def _record(tmp_path, clip: bool, micro_batches: int = 1):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = tmp_path / f"clip{clip}-{micro_batches}"
    with align.Recorder(model, out, steps=[0], optimizer=opt) as rec:
        with rec.step(0):
            for i in range(micro_batches):
                model(torch.randn(5, 4)).square().sum().backward()
                if i == 0:
                    first = {n: p.grad.clone() for n, p in model.named_parameters()}
            backward = {n: p.grad.clone() for n, p in model.named_parameters()}
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            opt.step()
            opt.zero_grad()
    return LoopDump(out).load(0, 0).trace, backward, first


def test_the_recorder_keeps_the_gradients_one_backward_wrote_as_it_wrote_them(tmp_path):
    names = ["0.bias", "0.weight", "2.bias", "2.weight"]
    for clip in (False, True):
        trace, backward, _ = _record(tmp_path, clip)
        own = trace.meta["backward_grads"]
        assert sorted(own) == names
        for n in names:  # before the clipping; the optimizer's are after it
            assert torch.equal(trace.tensor(own[n]), backward[n])
            assert (own[n] == trace.param_grads[n]) == (not clip)  # one copy where the same
    trace, accumulated, first = _record(tmp_path, False, micro_batches=2)
    # accumulated, no one call's: each module's first call's, written before its second
    own = trace.meta["backward_grads"]
    assert sorted(own) == names and trace.meta["first_call_grads"] == names
    for n in names:
        assert torch.equal(trace.tensor(own[n]), first[n])
        assert not torch.equal(first[n], accumulated[n])


def test_a_call_two_backwards_went_through_keeps_no_first_call_gradient(tmp_path):
    # a shared encoder, two heads, each micro-batch's two losses backward one after the
    # other: the encoder's recorded output gradient is the last backward's, so its first
    # gradient is no one call's (the heads' are theirs)
    torch.manual_seed(0)
    enc, h1, h2 = nn.Linear(4, 4), nn.Linear(4, 1), nn.Linear(4, 1)
    model = nn.ModuleDict({"enc": enc, "h1": h1, "h2": h2})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with align.Recorder(model, tmp_path / "d", steps=[0], optimizer=opt) as rec:
        with rec.step(0):
            for _ in range(2):
                z = enc(torch.randn(5, 4))
                h1(z).sum().backward(retain_graph=True)
                h2(z).sum().backward()
            opt.step()
    first = LoopDump(tmp_path / "d").load(0, 0).trace.meta["first_call_grads"]
    assert first == ["h1.bias", "h1.weight", "h2.bias", "h2.weight"]


def test_a_sparse_gradient_zeroed_in_place_is_watched_without_error():
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    emb.zero_grad(set_to_none=False)  # a sparse gradient's zero_ keeps it sparse
    grads = BackwardGrads(emb, None)
    with contextlib.ExitStack() as stack:
        grads.install(stack)
        emb(torch.tensor([3, 4])).sum().backward()  # the zero check raised on SparseCPU
    assert grads.task("weight") is not None


def test_a_gradient_summed_only_where_every_call_took_it_in_that_backward():
    # a critic's gradient from its two calls in its own backward, while a third call, in
    # the generator's backward with the critic frozen, wrote none (pix2pix)
    from align.record.capture import Recorder as ModuleHooks
    from align.record.loop import _summed

    torch.manual_seed(0)
    gen, critic = nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    model = nn.ModuleDict({"G": gen, "D": critic})
    z, real = torch.randn(6, 4), torch.randn(6, 4)
    for frozen in (False, True):
        grads, hooks = BackwardGrads(model, None), ModuleHooks(model, backward=True)
        with contextlib.ExitStack() as stack:
            grads.install(stack)
            fake = gen(z)
            (critic(fake.detach()).mean() - critic(real).mean()).backward()
            if frozen:
                critic.requires_grad_(False)
                (-critic(fake).mean()).backward()
                critic.requires_grad_(True)
        hooks.remove()
        summed = _summed(hooks, grads, ["D.0.weight"])
        assert summed == ([] if frozen else ["D.0.weight"])
