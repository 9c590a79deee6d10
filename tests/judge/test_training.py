"""Short-train alignment: a clean target passes; optimizer and loss-scaling faults fail and
say which step and quantity diverged."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import align
from align.judge.traces import IDENTICAL
from align.judge.training import TrainOptions, compare_trajectories, optimizer_state


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).train()


X = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
Y = torch.arange(8) % 5


def _loss(out, inputs):
    return F.cross_entropy(out if out.dtype == torch.float64 else out.float(), Y.to(out.device))


def _check(precision="fp32", target=None, steps=6, train=None, **kw):
    return align.check(
        _net(),
        X,
        target="cpu",
        precision=precision,
        phases=("train",),
        steps=steps,
        loss_fn=_loss,
        train_options=train or TrainOptions(lr=0.05),
        target_train_options=target,
        **kw,
    )


@pytest.mark.parametrize("precision", ["fp32", "amp-bf16"])
def test_clean_target_passes(precision):
    report = _check(precision)
    assert report.passed, str(report)
    assert report.train["steps_run"] == 6
    first = report.train["steps"][0]["loss"]
    assert first["golden"] == pytest.approx(first["reference"], rel=1e-2)


def test_clean_emulated_target_passes():
    report = _check(emulate="npu-fp32")
    assert report.passed, str(report)


@pytest.mark.parametrize(
    "fault, quantity",
    [
        (dict(momentum=0.8), "update_norm"),  # another momentum: the second update differs
        (dict(norm_decay=True, weight_decay=0.05), "update_norm"),  # decay on norm params
    ],
)
def test_optimizer_faults_fail_naming_step_and_quantity(fault, quantity):
    report = _check(target=dataclasses.replace(TrainOptions(lr=0.05), **fault))
    assert not report.passed
    first = report.first_divergence
    assert first.phase == "train" and quantity in first.metric
    assert first.tensor.startswith("step ")
    assert "step" in str(report) and quantity in str(report)


def test_loss_scale_not_unscaled_before_clipping_fails():
    good = TrainOptions(lr=0.05, clip_grad=1.0)
    bad = dataclasses.replace(good, unscale_before_clip=False)
    clean = align.check(
        _net(),
        X,
        target="cpu",
        precision="amp-fp16",
        phases=("train",),
        steps=3,
        loss_fn=_loss,
        train_options=good,
    )
    assert clean.passed, str(clean)
    report = align.check(
        _net(),
        X,
        target="cpu",
        precision="amp-fp16",
        phases=("train",),
        steps=3,
        loss_fn=_loss,
        train_options=good,
        target_train_options=bad,
    )
    assert not report.passed
    assert report.first_divergence.tensor == "step 0 update_norm"


# -- the user's training pieces ---------------------------------------------------------------


def _adamw(eps: float = 1e-8):
    return lambda groups: torch.optim.AdamW(groups, lr=1e-2, eps=eps)


def _cosine(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)


def test_the_users_optimizer_and_scheduler_train_and_their_state_is_judged():
    opts = TrainOptions(optimizer=_adamw(), scheduler=_cosine)
    report = align.check(
        _net(), X, target="cpu", phases=("train",), steps=4, loss_fn=_loss, train_options=opts
    )
    assert report.passed, str(report)
    net = _net()
    opt = _adamw()([{"params": list(net.parameters())}])
    net(X).sum().backward()
    opt.step()
    assert any(k.endswith(".exp_avg_sq (group 0)") for k in optimizer_state(opt, net))


@pytest.mark.parametrize(
    "target",
    [
        TrainOptions(optimizer=_adamw(eps=1e-3)),  # a fused optimizer with another epsilon
        TrainOptions(optimizer=lambda g: torch.optim.Adam(g, lr=1e-2)),  # L2, not decoupled
        TrainOptions(optimizer=lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9)),
    ],
    ids=["eps", "adam_l2", "sgd"],
)
def test_a_target_optimizer_that_differs_fails_and_names_the_parameter(target):
    report = align.check(
        _net(),
        X,
        target="cpu",
        phases=("train",),
        steps=3,
        loss_fn=_loss,
        train_options=TrainOptions(optimizer=_adamw()),
        target_train_options=target,
    )
    assert not report.passed
    first = report.train["first_divergence"]
    assert first["tensor"].startswith("step 0") or "optimizer" in str(report.train), first


def test_a_loss_scale_of_the_users_own_trains_aligned():
    opts = TrainOptions(loss_scale=2.0**10)
    report = align.check(
        _net(), X, target="cpu", phases=("train",), steps=3, loss_fn=_loss, train_options=opts
    )
    assert report.passed, str(report)


def test_steps_the_references_scaler_skipped_are_skipped_by_the_golden_and_judged():
    """Under fp16 a loss scale of 2^40 overflows every gradient: the reference's scaler skips
    the steps, the golden and the draws skip them too, and the target passes skipping
    alike; a target whose smaller scale lets it step fails on the first step it took."""
    overflowing = TrainOptions(lr=0.05, loss_scale=2.0**40)
    report = _check("amp-fp16", steps=2, train=overflowing)
    assert report.passed, str(report)
    stepping = _check("amp-fp16", TrainOptions(lr=0.05, loss_scale=16.0), 2, overflowing)
    first = stepping.train["first_divergence"]
    assert (first["metric"], first["tensor"]) == ("skipped", "step 0 skipped"), first


# -- honest draws of the reference's training ------------------------------------------------


def _trajectory(losses: list[float], state: float) -> dict:
    steps = [{"loss": v, "grad_norm": 1.0, "update_norm": 1.0} for v in losses]
    return {"steps": steps, "state": {"param:fc.weight": torch.full((4,), state)}}


GOLD = _trajectory([1.0, 1.0, 1.0], 1.0)
REF = _trajectory([1.0, 1.0 + 1e-4, 1.0], 1.0)
TOL = align.Tolerance(k=2.0, floor=1.0)


def _draws(*trajectories: dict):
    calls = []

    def draws(round_: int) -> list[dict]:
        calls.append(round_)
        return list(trajectories)

    return draws, calls


def test_a_trajectory_within_its_honest_draws_passes_only_with_them():
    target = _trajectory([1.0, 1.0 + 5e-4, 1.0], 1.0)  # 5x the reference's deviation
    alone = compare_trajectories(target, REF, GOLD, TOL, floor=1e-6)
    assert not alone["passed"] and alone["first_divergence"]["tensor"] == "step 1 loss"
    draws, calls = _draws(_trajectory([1.0, 1.0 - 3e-4, 1.0], 1.0))  # an honest draw 3x off
    judged = compare_trajectories(target, REF, GOLD, TOL, floor=1e-6, draws=draws)
    assert judged["passed"], judged["summary"]
    assert calls == [0]


def test_a_trajectory_beyond_its_honest_draws_fails_after_all_of_them():
    target = _trajectory([1.0, 1.0 + 9e-4, 1.0], 1.0)  # within GRAY_ZONE of the limit after round 0
    draws, calls = _draws(_trajectory([1.0, 1.0 - 3e-4, 1.0], 1.0))
    judged = compare_trajectories(target, REF, GOLD, TOL, floor=1e-6, draws=draws)
    assert not judged["passed"] and judged["first_divergence"]["tensor"] == "step 1 loss"
    assert calls == [0, 1]


def test_a_clean_trajectory_makes_no_draws_and_a_nonfinite_draw_counts_for_nothing():
    draws, calls = _draws(_trajectory([1.0, float("nan"), 1.0], 1.0))
    assert compare_trajectories(REF, REF, GOLD, TOL, floor=1e-6, draws=draws)["passed"]
    assert calls == []
    diverged = _trajectory([1.0, float("inf"), 1.0], 1.0)
    assert not compare_trajectories(diverged, REF, GOLD, TOL, floor=1e-6, draws=draws)["passed"]
    assert calls == []  # no draw excuses an Inf
    target = _trajectory([1.0, 1.0 + 5e-4, 1.0], 1.0)
    assert not compare_trajectories(target, REF, GOLD, TOL, floor=1e-6, draws=draws)["passed"]


def test_the_final_state_is_judged_against_the_draws_too():
    target = _trajectory([1.0, 1.0, 1.0], 1.0 + 1e-3)
    assert not compare_trajectories(target, REF, GOLD, TOL, floor=1e-6)["passed"]
    draws, _ = _draws(_trajectory([1.0, 1.0, 1.0], 1.0 - 8e-4))
    assert compare_trajectories(target, REF, GOLD, TOL, floor=1e-6, draws=draws)["passed"]


def test_a_final_state_the_references_training_moved_by_noise_is_reported_not_judged():
    """A tensor whose gradients carry no signal (a BatchNorm over 1x1 maps at batch 2:
    efficientnet_b0 at 32 px, honest targets 8-46x the reference's error in a BatchNorm
    weight) moves by noise: where the reference misses the golden's change of it over the
    training by half or more, it is said and not judged. Where the reference follows the
    golden's change, the same target error fails."""
    start = {"param:fc.weight": torch.full((4,), 1.0, dtype=torch.float64)}
    gold = {**_trajectory([1.0, 1.0, 1.0], 1.0 + 1e-6), "start": start}  # moved by 1e-6
    ref = _trajectory([1.0, 1.0, 1.0], 1.0 + 2e-6)  # misses that change by all of it
    target = _trajectory([1.0, 1.0, 1.0], 1.0 + 1e-4)
    judged = compare_trajectories(target, ref, gold, TOL, floor=1e-6)
    assert judged["passed"], judged["summary"]
    gold_moved = {**_trajectory([1.0, 1.0, 1.0], 1.0 + 1e-3), "start": start}
    ref_follows = _trajectory([1.0, 1.0, 1.0], 1.0 + 1e-3 + 1e-7)
    target = _trajectory([1.0, 1.0, 1.0], 1.0 + 1.1e-3)
    failed = compare_trajectories(target, ref_follows, gold_moved, TOL, floor=1e-6)
    assert not failed["passed"] and failed["first_divergence"]["tensor"] == "final param weight"
    assert "no signal" not in str(failed["state_rows"])


def test_a_parameter_whose_gradient_the_reference_misses_by_half_is_not_judged_after():
    """A parameter whose gradient at some step the reference misses by half or more (an SE
    convolution behind a BatchNorm over two values), its optimizer state and the norms
    that sum it carry no signal from that step; the rest is still judged."""

    def run(grad: float, norm: float, state: float, other: float) -> dict:
        steps = [{"loss": 1.0, "grad_norm": norm, "update_norm": 1.0} for _ in range(2)]
        grads = {"se.weight": torch.full((4,), grad), "fc.weight": torch.ones(4)}
        return {
            "steps": steps,
            "state": {
                "param:se.weight": torch.full((4,), state),
                "optimizer:se.weight.momentum_buffer (group 0)": torch.full((4,), state),
                "param:fc.weight": torch.full((4,), other),
            },
            "step_grads": [grads, grads],
        }

    gold, ref = run(1.0, 1.0, 1.0, 1.0), run(1.6, 1.0 + 1e-6, 1.0 + 1e-6, 1.0)
    target = run(9.0, 3.0, 1.5, 1.0)  # its noisy parameter far off: not judged
    judged = compare_trajectories(target, ref, gold, TOL, floor=1e-6)
    assert judged["passed"], judged["summary"]
    assert "grad_norm from step 0" in judged["summary"]
    wrong = run(9.0, 3.0, 1.5, 1.01)  # the parameter with signal 1% off still fails
    failed = compare_trajectories(wrong, ref, gold, TOL, floor=1e-6)
    assert not failed["passed"] and failed["first_divergence"]["module"] == "fc", failed
    follows = run(1.1, 1.0 + 1e-6, 1.0 + 1e-6, 1.0)  # the reference within half: judged
    assert not compare_trajectories(target, follows, gold, TOL, floor=1e-6)["passed"]


def test_a_step_an_honest_target_skips_where_fp16_gradients_near_overflow_is_no_signal():
    """One loss scaler skips a step the other took, whose scaled fp16 gradients came
    within OVERFLOW_HEADROOM of float16's largest value (honest one-ulp lcnet_050 and
    ghostnet_050 at 32 px under amp-fp16 did, both ways): an honest device may overflow
    there, or just not, and from that step the runs take other steps. Far from overflow
    it fails."""

    def run(skips: list[bool], headroom: float, state: float) -> dict:
        steps = [
            {"loss": 1.0, "grad_norm": float("nan") if skipped else 1.0, "update_norm": 1.0}
            | {"skipped": skipped, "headroom": headroom}
            for skipped in skips
        ]
        return {"steps": steps, "state": {"param:fc.weight": torch.full((4,), state)}}

    gold = run([False] * 3, float("inf"), 1.0)
    target = run([False, True, False], 0.0, 1.1)  # a step skipped, so its state is elsewhere
    near = compare_trajectories(target, run([False] * 3, 8.0, 1.0), gold, TOL, floor=1e-6)
    assert near["passed"], near["summary"]
    assert near["steps"][1]["grad_norm"]["no_signal"] and "from step 1" in near["summary"]
    far = compare_trajectories(target, run([False] * 3, 1e3, 1.0), gold, TOL, floor=1e-6)
    assert not far["passed"] and far["first_divergence"]["tensor"] == "step 1 grad_norm"
    # and the other way: the reference overflowed where the target's gradients just did not
    ref, gold = run([False, True, False], 0.0, 1.0), run([False, True, False], math.inf, 1.0)
    took = compare_trajectories(run([False] * 3, 8.0, 1.1), ref, gold, TOL, floor=1e-6)
    assert took["passed"], took["summary"]
    wrong = compare_trajectories(run([False] * 3, 1e3, 1.1), ref, gold, TOL, floor=1e-6)
    assert not wrong["passed"] and wrong["first_divergence"]["tensor"] == "step 1 skipped"


def test_a_quantity_the_reference_misses_by_half_carries_no_signal_from_then_on():
    """A chaotic training (the spatial transformer's: the golden's loss 140% from the
    reference's at step 3) compares other trajectories from the step where the reference
    misses the golden by half or more: not judged from there, and the summary says so; a
    target off before that step still fails."""
    chaotic = _trajectory([1.0, 1.0 + 1e-4, 1.6, 0.2], 1.0)
    gold = _trajectory([1.0, 1.0, 1.0, 1.0], 1.0)
    target = _trajectory([1.0, 1.0 + 1e-4, 3.0, -5.0], 1.0)
    judged = compare_trajectories(target, chaotic, gold, TOL, floor=1e-6)
    assert judged["passed"], judged["summary"]
    assert "no signal" in judged["summary"] and "loss from step 2" in judged["summary"]
    assert judged["steps"][3]["loss"]["no_signal"] and "no_signal" not in judged["steps"][1]["loss"]
    early = _trajectory([1.0, 1.0 + 9e-3, 3.0, -5.0], 1.0)
    failed = compare_trajectories(early, chaotic, gold, TOL, floor=1e-6)
    assert not failed["passed"] and failed["first_divergence"]["tensor"] == "step 1 loss"
    diverged = _trajectory([1.0, 1.0 + 1e-4, float("inf"), 1.0], 1.0)
    assert not compare_trajectories(diverged, chaotic, gold, TOL, floor=1e-6)["passed"]


def test_sparse_gradients_are_judged_and_an_optimizer_that_refuses_them_is_said():
    from align.errors import ModelRunError
    from align.testing import FAULTS, perturb
    from align.testing.models import SparseBag

    torch.manual_seed(0)
    model, x = (
        SparseBag(),
        torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(1)),
    )
    # Adam refuses a sparse gradient; the recipe's SGD leaves it undecayed, as torch's
    # SGD must (decaying one raised "add(sparse, dense) is not supported")
    adam = TrainOptions(optimizer=torch.optim.Adam)
    with pytest.raises(ModelRunError, match="weight_decay=0 where a gradient is sparse"):
        align.check(
            model,
            x,
            target_model=perturb(model, 1.0),
            target="cpu",
            phases="train",
            train_options=adam,
        )
    kw = dict(target="cpu", phases="forward,backward,train")
    honest = align.check(model, x, target_model=perturb(model, 1.0), **kw)
    assert honest.passed, honest
    faulty = perturb(model, 1.0)
    with torch.no_grad():
        faulty.emb.weight[::2].mul_(1.003)
    report = align.check(model, x, target_model=faulty, **kw)
    assert not report.passed and report.culprits[0].module == "emb", report
    # the sparse gradients of a bit-identical target are read as identical (torch.equal
    # has no sparse kernel: it raised), and a fault in the dense head behind them is named
    same = align.check(model, x, target_model=copy.deepcopy(model), **kw)
    assert same.passed and IDENTICAL in same.notes, same
    head = copy.deepcopy(model)
    FAULTS["weight_grad_gain"](head, "head")
    report = align.check(model, x, target_model=head, target="cpu", phases="forward,backward")
    assert not report.passed and report.culprits[0].module == "head", report


def _critic() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(8 * 8 * 8, 1)
    )


def _gradient_penalty(out: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """A WGAN-GP critic's loss at interpolates: the gradient by its input, differentiated."""
    (g,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return out.mean() + 10 * ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()


def test_a_loss_that_differentiates_by_the_inputs_trains_and_a_fault_is_named():
    # the training's inputs did not require grad, as the backward check's do: the
    # gradient penalty raised "One of the differentiated Tensors does not require grad"
    from align.testing import FAULTS, perturb

    model = _critic()
    x_hat = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(target="cpu", loss_fn=_gradient_penalty, phases="forward,backward,train")
    honest = align.check(model, x_hat, target_model=perturb(model, 1.0), **kw)
    assert honest.passed, honest
    faulty = _critic()
    FAULTS["weight_grad_gain"](faulty, "0")
    report = align.check(model, x_hat, target_model=faulty, **kw)
    assert not report.passed and not report.train["passed"]
    assert report.culprits and report.culprits[0].module == "0", report


@pytest.mark.usefixtures("one_thread")
def test_batchnorm_over_1x1_maps_trains_aligned_on_an_honest_channels_last_target():
    """efficientnet_b0 at 32 px, batch 2: its last stages normalize over two values, their
    gradients carry no signal and move their tensors by noise (the final-state rows say
    so); another memory format trains aligned. Before, a BatchNorm weight failed at 46x
    the reference's error."""
    timm = pytest.importorskip("timm")
    from align.record.capture import lay_out_weights

    torch.manual_seed(0)
    model = timm.create_model(
        "efficientnet_b0", num_classes=10, drop_rate=0.2, drop_path_rate=0.1
    ).train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = copy.deepcopy(model)
    lay_out_weights(target, torch.channels_last)
    phases = "forward,backward,train"
    report = align.check(model, x, target_model=target, target="cpu", phases=phases)
    assert report.passed, str(report)
