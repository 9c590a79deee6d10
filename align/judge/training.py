"""Short-train alignment: N optimizer steps on reference, target and a float64 golden.

Identical initial weights and batches; the case's optimizer (SGD with its recipe's
momentum and weight decay) or the user's (`TrainOptions.optimizer`, a factory of param
groups; the target may take another one, a device's fused optimizer against the stock
one), an optional scheduler, and the precision policy's loss scaling
(torch.amp.GradScaler, the machinery mmengine's AmpOptimWrapper uses in full runs) or
the user's initial scale. Per step we record the loss, the gradient norm (after
unscaling) and the norm of the parameter update; after the last step the parameters,
BatchNorm running statistics and the optimizer's state (momentum buffers, Adam moments),
each named by its parameter and param group. Trajectories of training
diverge, so the target's deviation from golden is judged against the reference's
deviation over the same steps, never against a fixed threshold.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from align.errors import AlignError, ModelRunError
from align.numerics.decisions import Choices, Decisions
from align.numerics.jitter import GRAY_ZONE, Pool
from align.numerics.metrics import judged_form
from align.numerics.precision import Policy, error_floor, get_policy
from align.numerics.trees import map_leaves
from align.numerics.verdict import (
    NO_SIGNAL,
    NOISY_GRADIENT_MESSAGE,
    OVERFLOW_HEADROOM,
    Row,
    Tolerance,
    judge,
    require_finite,
)
from align.record.capture import (
    call_model,
    differentiate,
    draw_layout,
    in_draw_layout,
    inputs_laid_out,
    jitter_seed,
    lay_out_weights,
    loss_errors,
    model_errors,
    numerics,
    prepare,
    projection_loss,
)
from align.record.loop import skipping
from align.zoo import get_case

# A final state tensor that the reference's training moved away from the golden's by half
# the golden's change or more took gradients that carry no signal (a BatchNorm over 1x1
# maps at batch 2: measured, efficientnet_b0 at 32 px, fp32, honest one-ulp and
# channels_last targets 10-46x the reference's error in a BatchNorm weight and the
# classifier's): honest runs' noise there varies by orders
MOVED_BY_NOISE = (
    "no signal at this precision (the reference's training misses the golden's change of "
    "it by half or more: its gradients carried none)"
)

# A parameter whose gradient the reference misses by half its size or more in some step,
# and its optimizer state, moved by noise from then on (verdict.NOISY_GRADIENT_MESSAGE, as
# the Recorder's steps judge it; measured: efficientnet_b0 at 32 px, fp32, an SE
# convolution's momentum 0.44 off on the reference and 12.9 on an honest half-ulp target).
# The reference's and the golden's trajectories keep each step's gradients (float32) of
# their parameters, the smallest first, up to SIGNAL_BUDGET elements over all steps (256 MB:
# a ResNet-50's parameters but its largest over 5 steps); a parameter left out is judged by
# its change (MOVED_BY_NOISE). Measured: rexnet_100 at 32 px, an honest emulated target's
# 1x1 convolution of 193,140 weights, 18x the reference's error after 5 steps, passes
# once its gradients are kept.
SIGNAL_BUDGET = 1 << 26
# A share of the golden's gradient norm that such parameters hold from which the norms
# carry no signal either: even 10x off, a gradient of 0.1% of the norm moves it by 1%
NOISY_NORM_SHARE = 1e-3
# A step one run's loss scaler skipped and the other's took, where the one that took it
# had scaled fp16 gradients within OVERFLOW_HEADROOM of float16's largest value: an honest
# device may overflow there, or just not, as the backward check says
# (verdict.HEADROOM_MESSAGE), and the runs then take other steps (measured: lcnet_050 and
# ghostnet_050 at 32 px, amp-fp16, honest one-ulp, half-ulp and channels_last targets
# skipping a step the reference took, and taking one it skipped)
HONEST_SKIP_MESSAGE = (
    "no signal at this precision (one loss scaler skipped a step the other took, with "
    f"scaled gradients within {OVERFLOW_HEADROOM:g}x of float16's largest value: an honest "
    "device may overflow there, and the runs then take other steps)"
)
QUANTITIES = ("loss", "grad_norm", "update_norm")
# draws cannot excuse these (they skip where the reference skipped)
UNEXCUSED = frozenset({"nonfinite", "missing", "shape", "dtype", "skipped"})


@dataclass(frozen=True)
class TrainOptions:
    """How one side trains. The defaults are the correct recipe; tests flip one to break it."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    norm_decay: bool = False  # weight decay on norm and bias parameters (mmcls: off)
    clip_grad: float | None = 10.0
    unscale_before_clip: bool = True
    # the user's pieces: optimizer(param_groups) -> Optimizer (default: SGD with lr and
    # momentum above), scheduler(optimizer) -> LRScheduler stepped after every step, and
    # the GradScaler's initial scale (default: the precision policy's: fp16 scales 2^12)
    optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    loss_scale: float | None = None


def _param_groups(model: nn.Module, opts: TrainOptions) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        for p in m.parameters(recurse=False)
    }
    # torch's SGD raises on decaying a sparse gradient: a script that trains sparse
    # embeddings leaves them undecayed, and so does the recipe
    sparse = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
    }
    for p in model.parameters():
        if not p.requires_grad:
            continue
        exempt = (id(p) in norm_params or p.dim() == 1) and not opts.norm_decay
        exempt = exempt or id(p) in sparse
        (no_decay if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": opts.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _trajectory(
    model: nn.Module,
    batches: list[Any],
    loss_fn,
    device: torch.device,
    policy: Policy,
    opts: TrainOptions,
    seed: int,
    emulation=None,
    native_kernels: bool = False,
    replay: list[Choices] | None = None,
    jitter: int | None = None,
    memory_format: torch.memory_format | None = None,
    skips: list[bool] | None = None,
    grad_inputs: Callable[[Any], Any] | None = None,
    keep_grads: bool = False,
) -> dict[str, Any]:
    """Train a private copy for len(batches) steps; per-step figures and final state
    (`keep_grads`: and each step's gradients, within SIGNAL_BUDGET).

    Each step's decisions (dropout masks, ReLU branches: align.numerics.decisions) are recorded in
    the result's "decisions", or replayed from `replay`, the reference's. `jitter` and
    `memory_format` make it an honest draw (align.record.capture.honest_draw). `skips`: the
    steps the reference's loss scaler skipped (its gradients overflowed), which a run
    standing for it (the golden, a draw) skips too; each step's "skipped" says whether
    the optimizer stepped. Inputs require grad as in the backward check (`grad_inputs`
    picks which; capture.differentiate): a loss may differentiate by them.
    """
    private = prepare(model, device, policy)
    if memory_format is not None:  # its inputs follow, step by step
        lay_out_weights(private, memory_format)
    master = private
    if policy.name == "o2-fp16":  # fp32 master weights, half model (apex O2)
        master = copy.deepcopy(model).to(device)
    groups = _param_groups(master, opts)
    if opts.optimizer is None:
        optimizer = torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum)
    else:
        optimizer = opts.optimizer(groups)
    scheduler = None if opts.scheduler is None else opts.scheduler(optimizer)
    scaled = opts.loss_scale is not None or policy.check_loss_scale != 1.0
    scaler = torch.amp.GradScaler(
        device.type,
        init_scale=2.0**12 if opts.loss_scale is None else opts.loss_scale,
        enabled=scaled and policy.name != "fp64",  # the golden is exact: nothing to scale
    )
    stepped = [0]  # optimizer steps taken (not where the scaler skipped: a step pre-hook)
    optimizer.register_step_pre_hook(lambda *_: stepped.__setitem__(0, stepped[0] + 1))
    steps, decided, step_grads = [], [], []
    kept = _kept_gradients(master, len(batches)) if keep_grads else set()
    # where the golden's change of each state tensor starts (MOVED_BY_NOISE)
    start = {n: t.clone() for n, t in _state(master, private).items()} if keep_grads else {}
    for step, batch in enumerate(batches):
        x = policy.cast_inputs(batch, device)
        if memory_format is not None:
            x = inputs_laid_out(x, memory_format)
        differentiate(x, grad_inputs)
        torch.manual_seed(seed + step)
        decisions = Decisions(None if replay is None else replay[step])
        decided.append(decisions.log)
        nudged = None if jitter is None else jitter * 1_000_003 + step  # new noise each step
        with decisions, numerics(policy, device, emulation, False, native_kernels, nudged):
            with model_errors(device, policy, jitter), policy.autocast(device):
                out = call_model(private, _aliases(x))
            with loss_errors(device, policy):
                loss = loss_fn(out, x)
            optimizer.zero_grad(set_to_none=True)
            private.zero_grad(set_to_none=True)
            with model_errors(device, policy, jitter):
                scaler.scale(loss).backward()
        if master is not private:
            for p, q in zip(master.parameters(), private.parameters()):
                p.grad = None if q.grad is None else q.grad.to(p.dtype)
        if opts.unscale_before_clip:
            with _optimizer_errors(optimizer):  # (torch unscales no complex gradient)
                scaler.unscale_(optimizer)
        grads = [judged_form(p.grad) for p in master.parameters() if p.grad is not None]
        unscale = scaler.get_scale() if scaler.is_enabled() and not opts.unscale_before_clip else 1
        step_grads.append(
            {
                n: judged_form(p.grad).detach().to("cpu", torch.float32, copy=True) / unscale
                for n, p in master.named_parameters()
                if p.grad is not None and n in kept
            }
        )
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])
        )
        as_scaled = scaler.get_scale() / unscale if scaler.is_enabled() else 1.0
        headroom = _headroom(grads, policy, as_scaled)
        before = [p.detach().clone() for p in master.parameters()]
        taken = stepped[0]
        with _optimizer_errors(optimizer):
            if opts.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(master.parameters(), opts.clip_grad)
            with skipping(optimizer) if skips and skips[step] else contextlib.nullcontext():
                scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
        if master is not private:
            with torch.no_grad():
                for p, q in zip(master.parameters(), private.parameters()):
                    q.copy_(p)
        update = math.sqrt(
            sum(
                float((p.detach().double() - b.double()).pow(2).sum())
                for p, b in zip(master.parameters(), before)
            )
        )
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        if not opts.unscale_before_clip:
            norm = norm / scale  # report the true gradient norm even when clipping saw it scaled
        steps.append(
            {
                "loss": float(loss.detach()),
                "grad_norm": float(norm),
                "update_norm": update,
                "skipped": stepped[0] == taken,
                "headroom": headroom,
            }
        )
    state = _state(master, private)
    state.update(optimizer_state(optimizer, master))
    return {
        "steps": steps,
        "state": state,
        "decisions": decided,
        "start": start,
        "step_grads": step_grads,
    }


def _skipped_honestly(t: dict, r: dict) -> bool:
    """Whether one run's loss scaler skipped a step the other took where the one that took
    it came within OVERFLOW_HEADROOM of float16's largest value (an honest device may
    overflow there, or just not)."""
    if bool(t.get("skipped")) == bool(r.get("skipped")):
        return False
    took = r if t.get("skipped") else t
    return took.get("headroom", math.inf) <= OVERFLOW_HEADROOM


def _headroom(grads: list[torch.Tensor], policy: Policy, scale: float) -> float:
    """How far below float16's largest value a step's gradients, times `scale` (as the
    loss scaler scaled them), stayed (inf where the run is not fp16; 0 where they
    overflowed)."""
    if policy.low_precision != torch.float16 or not grads:
        return math.inf
    largest = max((float(g.abs().max()) for g in grads if g.numel()), default=0.0) * scale
    if not math.isfinite(largest):
        return 0.0
    return torch.finfo(torch.float16).max / largest if largest > 0 else math.inf


def _kept_gradients(model: nn.Module, steps: int) -> set[str]:
    """The parameters whose gradients fit SIGNAL_BUDGET over `steps` steps, smallest first."""
    kept, total = set(), 0
    for name, p in sorted(model.named_parameters(), key=lambda item: item[1].numel()):
        total += p.numel() * steps
        if total > SIGNAL_BUDGET:
            break
        kept.add(name)
    return kept


def _state(master: nn.Module, private: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and floating buffers of a training, by state name."""
    state = {f"param:{n}": p.detach() for n, p in master.named_parameters()}
    state.update(
        {f"buffer:{n}": b.detach() for n, b in private.named_buffers() if b.is_floating_point()}
    )
    return state


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """The optimizer's floating state tensors (momentum buffers, exp_avg, exp_avg_sq...),
    keyed `optimizer:<param>.<state> (group N)`: what a fused optimizer computes otherwise."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim():
                    found[f"optimizer:{names.get(id(p), '?')}.{key} (group {g})"] = value.detach()
    return found


def _deviation(a: float, g: float) -> float:
    return abs(a - g) / max(abs(g), 1e-12)


def compare_trajectories(
    tgt: dict,
    ref: dict,
    gold: dict,
    tol: Tolerance,
    floor: float,
    draws: Callable[[int], list[dict]] = lambda round_: [],
) -> dict[str, Any]:
    """`judge_trajectories` against the reference alone, and where that fails, again with
    its honest draws (`draws(0)`, then `draws(1)` while the first failure is within
    jitter.GRAY_ZONE of its limit), as the verdict on isolated tensors does: a training of
    a few steps compounds each step's rounding, and one reference is one draw of it. A
    NaN/Inf or a missing state is never excused: no draw is made for it."""
    judged, used = judge_trajectories(tgt, ref, gold, tol, floor), 0
    for round_ in (0, 1):
        first = judged["first_divergence"]
        if first is None or not math.isfinite(first["value"]) or first["metric"] in UNEXCUSED:
            return judged  # passed, or failed in a way no honest draw excuses
        if round_ and first["value"] > GRAY_ZONE * first["limit"]:
            return judged
        honest = [d for d in draws(round_) if _finite(d)]
        if len(honest) <= used:
            return judged
        used = len(honest)
        judged = judge_trajectories(tgt, ref, gold, tol, floor, honest)
    return judged


def _finite(trajectory: dict) -> bool:
    """Every figure finite, but a skipped step's gradient norm (it overflowed)."""
    return all(
        math.isfinite(s[q])
        for s in trajectory["steps"]
        for q in QUANTITIES
        if not (q == "grad_norm" and s.get("skipped"))
    )


def judge_trajectories(
    tgt: dict, ref: dict, gold: dict, tol: Tolerance, floor: float, draws: list[dict] = ()
) -> dict[str, Any]:
    """Per step and quantity: target deviation from golden vs k x the worst deviation of
    the reference and its `draws`; the final state tensor by tensor (verdict.judge)."""
    table, first = [], None
    envelope = dict.fromkeys(QUANTITIES, 0.0)  # the honest runs' worst deviation so far
    # A quantity the reference misses by half its size or more carries no signal, from that
    # step on: the runs follow other trajectories, as a tensor the reference misses so is
    # not judged (verdict.NO_SIGNAL; measured: the spatial transformer in
    # align.testing.models, fp32, the golden's loss 140% from the reference's at step 3,
    # and an honest one-ulp target's gradient norm 2.25x off at step 4 failed)
    lost: dict[str, int] = {}  # quantity -> the step from which it carries no signal
    # the norms sum every parameter's gradient and update: one that carries no signal takes
    # theirs with it (measured: rexnet_100 at 32 px, fp32, an honest one-ulp target's
    # gradient norm 10.8x the golden's at step 0, the reference's 0.19x)
    noisy = _noisy_params(ref, gold)
    if (step := _norms_lost(noisy, gold)) is not None:
        lost.update(dict.fromkeys(("grad_norm", "update_norm"), step))
    honest_skip = None  # the step an honest target's loss scaler may have skipped
    for i, (t, r, g) in enumerate(zip(tgt["steps"], ref["steps"], gold["steps"])):
        entry = {"step": i}
        if honest_skip is None and _skipped_honestly(t, r):
            honest_skip = i  # the runs take other steps from here
            for q in QUANTITIES:
                lost.setdefault(q, i)
        if r.get("skipped") and not t.get("skipped") and first is None and honest_skip is None:
            first = {
                "module": "",
                "phase": "train",
                "metric": "skipped",
                "value": 1.0,
                "limit": 0.0,
                "call": 0,
                "tensor": f"step {i} skipped",
                "message": f"step {i}: the reference's loss scaler skipped it (its gradients "
                "overflowed), the target's stepped",
            }
        for q in QUANTITIES:
            if q == "grad_norm" and r.get("skipped") and t.get("skipped"):
                continue  # overflowed on both: the scaler's skip is what is judged
            dt, dr = _deviation(t[q], g[q]), _deviation(r[q], g[q])
            envelope[q] = max(envelope[q], dr, *(_deviation(d["steps"][i][q], g[q]) for d in draws))
            if dr >= NO_SIGNAL and math.isfinite(t[q]):
                lost.setdefault(q, i)
            # One scalar per step is one noisy draw: judge against the honest runs' running
            # worst, plus a floor that compounds with the steps taken.
            limit = tol.k * envelope[q] + floor * (1 + i)
            entry[q] = {
                "target": t[q],
                "reference": r[q],
                "golden": g[q],
                "deviation": dt,
                "limit": limit,
            }
            excused = q == "grad_norm" and honest_skip is not None and t.get("skipped")
            if q in lost and (math.isfinite(t[q]) or excused):
                entry[q]["no_signal"] = True
                continue
            if (dt > limit or not math.isfinite(t[q])) and first is None:
                first = {
                    "module": "",
                    "phase": "train",
                    "metric": f"{q}_deviation",
                    "value": dt,
                    "limit": limit,
                    "call": 0,
                    "tensor": f"step {i} {q}",
                    "reference": dr,
                    "message": f"step {i}: {q} deviates from golden",
                }
        table.append(entry)
    rows: list[Row] = []
    for name, g in gold["state"].items():
        module, _, leaf = name.partition(":")[2].rpartition(".")
        row = Row(module, 0, "train", f"final {name.partition(':')[0]} {leaf}", "", [])
        if honest_skip is not None:  # (a state the target's steps never made, too)
            row.message = HONEST_SKIP_MESSAGE
            rows.append(row)
            continue
        if name not in tgt["state"]:
            row.failed.append("missing")
            row.message = f"the target's training has no {name} (another optimizer?)"
            rows.append(row)
            continue
        require_finite(row, [("reference", ref["state"][name]), ("golden", g)])
        if _param_of(name) in noisy:
            row.message = NOISY_GRADIENT_MESSAGE
            rows.append(row)
            continue
        if _moved_by_noise(ref["state"][name], g, gold.get("start", {}).get(name)):
            row.message = MOVED_BY_NOISE
            rows.append(row)
            continue
        honest = [d["state"][name] for d in draws if name in d["state"]]
        judge(
            tgt["state"][name],
            ref["state"][name],
            g,
            tol,
            strict_dtype=False,
            local=False,
            row=row,
            draws=honest,
        )
        rows.append(row)
    failing = [r for r in rows if r.failed]
    if first is None and failing:
        first = vars(failing[0].divergence())
    summary = "trajectories agree" if first is None else f"first divergence: {first['tensor']}"
    if first is not None and first.get("module"):
        summary += f" in {first['module']}"
    if lost:
        summary += (
            "; no signal (the reference misses the golden by half or more), reported, not "
            "judged: " + ", ".join(f"{q} from step {i}" for q, i in lost.items())
        )
    return {
        "passed": first is None,
        "steps": table,
        "first_divergence": first,
        "state_rows": [r.to_dict() for r in failing],
        "summary": summary,
        "steps_run": len(table),
    }


def _noisy_params(ref: dict, gold: dict) -> dict[str, int]:
    """Parameters whose gradient the reference missed by half its size or more in some
    step, and the first such step (of the parameters whose gradients the trajectories
    keep: SIGNAL_BUDGET)."""
    noisy: dict[str, int] = {}
    steps = zip(ref.get("step_grads", ()), gold.get("step_grads", ()))
    for i, (r_step, g_step) in enumerate(steps):
        for name, g in g_step.items():
            if name in noisy or name not in r_step:
                continue
            g = g.double()
            missed = float((r_step[name].double() - g).norm())
            if missed > 0 and missed >= NO_SIGNAL * float(g.norm()):
                noisy[name] = i
    return noisy


def _norms_lost(noisy: dict[str, int], gold: dict) -> int | None:
    """The first step at which the parameters whose gradients carry no signal hold
    NOISY_NORM_SHARE or more of the golden's gradient norm, or None (a convolution's bias
    before a BatchNorm takes a gradient of zero that rounding alone makes: no share)."""
    for i, (g_step, figures) in enumerate(zip(gold.get("step_grads", ()), gold["steps"])):
        held = [g_step[n].double().norm() ** 2 for n, at in noisy.items() if at <= i]
        if held and math.sqrt(float(sum(held))) >= NOISY_NORM_SHARE * figures["grad_norm"]:
            return i
    return None


def _param_of(name: str) -> str:
    """The parameter a state name belongs to (`param:<p>`, `optimizer:<p>.<state> (group N)`)."""
    kind, _, rest = name.partition(":")
    return rest.rsplit(" (group ", 1)[0].rpartition(".")[0] if kind == "optimizer" else rest


def _moved_by_noise(ref: torch.Tensor, gold: torch.Tensor, start: torch.Tensor | None) -> bool:
    """Whether the reference misses the golden's change of a state tensor over the training
    (from `start`, or from zero for an optimizer's state) by half its size or more: the
    steps moved it by the noise of gradients that carry no signal. A tensor the golden left
    where it was has no change to miss (measured: a BatchNorm bias under amp-bf16 whose
    gradient is zero in exact arithmetic, moved by honest half-ulp targets' rounding)."""
    g = judged_form(gold).double()
    moved = g if start is None else g - judged_form(start).double().to(g.device)
    missed = judged_form(ref).double().to(g.device) - g
    return float(missed.norm()) >= NO_SIGNAL * float(moved.norm())


def require_steps(steps: object) -> None:
    """AlignError unless `steps` is a whole number >= 1: a train phase of no steps judges
    nothing, and nothing judged is no verdict."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AlignError(
            f"steps must be an integer >= 1 for the train phase, got {steps!r}: "
            "pass --steps N (default 5)"
        )


def short_train(
    resolved,
    *,
    target_model,
    reference: torch.device,
    target: torch.device,
    policy: Policy,
    steps: int,
    seed: int,
    tol: Tolerance,
    emulation=None,
    native_kernels: bool = False,
    options: TrainOptions | None = None,
    target_options: TrainOptions | None = None,
    draws: int = 2,
) -> dict[str, Any]:
    """Train reference, target and golden for `steps` steps and judge the target (with up
    to `draws` honest draws of the reference's training where it fails against it alone)."""
    opts = options or _recipe_options(resolved.case)
    batches = _batches(resolved, steps, seed)
    loss_fn = resolved.loss_fn or projection_loss(seed)
    trajectory = partial(_trajectory, grad_inputs=resolved.grad_inputs)
    ref = trajectory(
        resolved.model, batches, loss_fn, reference, policy, opts, seed, emulation, keep_grads=True
    )
    skips = [s["skipped"] for s in ref["steps"]]
    gold = trajectory(
        resolved.model,
        batches,
        loss_fn,
        torch.device("cpu"),
        get_policy("fp64"),
        opts,
        seed,
        replay=ref["decisions"],
        skips=skips,
        keep_grads=True,
    )
    tgt = trajectory(
        target_model if target_model is not None else resolved.model,
        batches,
        loss_fn,
        target,
        policy,
        target_options or opts,
        seed,
        emulation,
        native_kernels,
        replay=ref["decisions"],
    )
    model = resolved.model

    def draw(k: int) -> dict:  # honest draw k of the reference's training (capture.honest_draw)
        return in_draw_layout(
            lambda memory_format: trajectory(
                model,
                batches,
                loss_fn,
                reference,
                policy,
                opts,
                seed,
                emulation,
                replay=ref["decisions"],
                jitter=jitter_seed(seed, k),
                memory_format=memory_format,
                skips=skips,
            ),
            draw_layout(model, k),
        )

    # Emulated HF32/TF32 math rounds to 10 mantissa bits: that, not fp32, sets the floor.
    unit = 2.0**-11 if emulation is not None else error_floor(policy.low_precision)
    floor = 4 * unit
    return compare_trajectories(tgt, ref, gold, tol, floor, Pool(draw, draws))


def _aliases(inputs: Any) -> Any:
    """`inputs` with each tensor that requires grad as a copy (a non-leaf): a model may
    write its input in place, as the backward check's hooks let it (capture's taps)."""
    return map_leaves(
        lambda t: t.clone() if isinstance(t, torch.Tensor) and t.requires_grad else t, inputs
    )


@contextlib.contextmanager
def _optimizer_errors(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """A ModelRunError for what the optimizer's step raises: a user's Adam cannot take an
    nn.Embedding(sparse=True)'s sparse gradient (measured: a raw "Adam does not support
    sparse gradients" out of align.check)."""
    try:
        yield
    except AlignError:
        raise
    except Exception as exc:
        raise ModelRunError(
            f"the short training's optimizer ({type(optimizer).__name__}) raised "
            f"{type(exc).__name__}: {str(exc).strip()[:300]}\nno training verdict: give "
            "align.check train_options=TrainOptions(...) that this model's gradients fit "
            "(weight_decay=0 where a gradient is sparse and nn.Embedding(sparse=True) does "
            "not make it, as F.embedding(..., sparse=True) does not: torch's SGD decays no "
            "sparse gradient; or an optimizer= that takes them), "
            "check at another precision (a loss scaler unscales no complex gradient), or "
            "leave 'train' out of the phases"
        ) from exc


def _recipe_options(case: str | None) -> TrainOptions:
    if case is None:
        return TrainOptions()

    recipe = get_case(case).recipe
    if recipe is None:
        return TrainOptions()
    # The recipe's lr is for its global batch; a check's batch of 2 takes it scaled down.
    scale = 2 / (recipe.batch_per_card * recipe.cards)
    return replace(
        TrainOptions(),
        lr=recipe.lr * scale,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )


def _batches(resolved, steps: int, seed: int) -> list[Any]:
    if resolved.case is not None:
        case = get_case(resolved.case)
        return [case.make_inputs(case.test_batch, seed + 1 + i) for i in range(steps)]
    return [resolved.inputs] * steps
