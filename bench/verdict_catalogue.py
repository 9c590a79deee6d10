"""The verdict on models nobody calibrated: false alarms, detections and exact culprits.

    python bench/verdict_catalogue.py                      # the default catalogue (~30 min)
    python bench/verdict_catalogue.py --models resnet26d --precisions fp32 --json out.json
    python bench/verdict_catalogue.py --models mixnet_s --honest threads summation_order \
        --faults unbiased_var channel_gain      # any timm model, other honest kinds / faults
    python bench/verdict_catalogue.py --models unet lstm gru encoder audio \
        --phases forward,backward,train         # models as users write them, short training

Every model is a timm model outside the zoo, in train mode (BatchNorm on batch
statistics over small maps), with dropout and drop-path on, checked with align's defaults
(no golden file). Honest targets (`align.testing.perturb`: every accumulating kernel
rounds half an ulp or one ulp otherwise; the same model in channels_last) must pass.
`--honest` adds other honest kinds (HONEST_KINDS: 2-ulp transcendentals, another thread
count, a blocked summation order, norms from primitives, one-pass BatchNorms, the emulated
NPU target of the main job). Faulty targets
(`align.testing.FAULTS`, each injected into a module chosen by type, the middle one of its
kind) must fail with the faulty module as the first culprit; a fault that changes nothing
at its site in float64 (`exact_effect`) is printed but not counted. Prints one line per
check and the totals.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from torch import nn

import align
from align.errors import AlignError
from align.record.capture import capture, lay_out_weights
from align.testing import (
    CLOSE_ACTIVATION,
    FAULTS,
    decomposed_norms,
    math_attention,
    one_pass_norms,
    perturb,
    split_summation,
    transcendental_ulps,
    with_threads,
)
from align.testing.models import USER_MODELS

MODELS = {
    "resnet26d": {},
    "ghostnet_050": {},
    "efficientnet_b0": {},
    "mobilenetv3_large_100": {},
    "regnetx_002": {},
    "convnext_atto": {},
    "rexnet_100": {},
    "vit_tiny_patch16_224": {"img_size": 64},
}
DROPS = {"drop_rate": 0.2, "drop_path_rate": 0.1}
HONEST = ("half_ulp", "one_ulp", "channels_last")
# More honest targets, selected with --honest (align.testing says why each is honest):
# transcendental activations 2 ulp accurate, another intra-op thread count, convolutions and
# linear layers summing in two blocks (and the batch in two halves), norms from primitives,
# attention from separate matmuls and softmax instead of a fused kernel, BatchNorms forming
# their statistics in one pass on a vector unit (Ascend's: sum and sum of squares).
HONEST_KINDS = HONEST + (
    "two_ulp_transcendental",
    "threads",
    "summation_order",
    "decomposed_norm",
    "math_attention",
    "one_pass_norm",
    "emulated",
)
# `emulated`: the main job's target where no accelerator is present, the CPU with oneDNN off
# (ATen's own kernels: its LSTM cell by cell, its convolutions) and convolutions rounded to
# HF32 (`--emulate npu-fp32`); the reference then runs at the same emulated precision
EMULATION = "npu-fp32"
# a fault whose largest change at its site, run in float64, is below this many times
# float64's own noise there changes nothing (exact_effect)
NO_EFFECT = 100.0
# faults that are a rounding: a float64 run keeps its float64 through them (KeepFloat64)
ROUNDING_FAULTS = {"fp16_kernel"}
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
# Faults that are none under bf16 autocast (tests/judge/test_faults.py says why): fp16 rounding
# is finer than bf16's, and tanh-GELU is 8x closer to GELU than bf16's own rounding.
NOT_A_FAULT_UNDER_BF16 = {"weight_via_fp16", "fp16_kernel", "gelu_tanh"}
NOT_A_FAULT_UNDER_BF16_AT = {nn.GELU: "activation"}
# under fp16 autocast the kernel already computes in fp16, from weights cast to fp16; the
# tanh GELU is at most 4.7e-4 from GELU (at 2.7, measured): a quarter of the fp16 ulp there
NOT_A_FAULT_UNDER_FP16 = {"weight_via_fp16", "fp16_kernel", "gelu_tanh"}
NOT_A_FAULT_UNDER_FP16_AT = NOT_A_FAULT_UNDER_BF16_AT


def called_modules(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the modules a forward of `x` calls (torch's MultiheadAttention uses its
    out_proj's weights without calling it: a fault in its forward would change nothing)."""
    private, names = copy.deepcopy(model), set()
    for name, m in private.named_modules():
        m.register_forward_pre_hook(lambda m, args, name=name: names.add(name))
    with torch.no_grad():
        private(x)
    return names


def fault_sites(model: nn.Module, x: torch.Tensor | None = None) -> dict[str, str]:
    """fault kind -> the module it goes into, chosen by type (the middle one of its kind;
    of those a forward of `x` calls, when `x` is given)."""
    called = None if x is None else called_modules(model, x)

    def _middle_where(model: nn.Module, keep) -> str | None:
        names = [
            n for n, m in model.named_modules() if n and keep(m) and (called is None or n in called)
        ]
        return names[len(names) // 2] if names else None

    def _middle(model: nn.Module, kinds: tuple[type, ...], exact: bool = False) -> str | None:
        return _middle_where(model, lambda m: type(m) in kinds if exact else isinstance(m, kinds))

    conv, norm = _middle(model, (nn.Conv2d, nn.Linear)), _middle(model, NORMS)
    plain = _middle(model, (nn.Conv2d, nn.Linear), exact=True)  # no forward of its own
    # faults of a norm's batch statistics: in eval mode not a BatchNorm (it normalizes by
    # its running statistics: no fault there)
    stats_kinds = NORMS if model.training else (nn.LayerNorm, nn.GroupNorm)
    live_norm = _middle_where(
        model,
        lambda m: (
            isinstance(m, stats_kinds)
            and (getattr(m, "weight", None) is None or bool(m.weight.detach().abs().max() > 0))
        ),
    )
    running = _middle_where(
        model,
        lambda m: (
            model.training
            and isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats
            and m.momentum is not None
        ),
    )
    sites = {
        "kernel_gain": conv,
        "weight_via_fp16": _middle(model, (nn.Conv2d,)) or conv,
        "norm_gain": norm,
        "norm_eps": norm,
        "activation": _middle(model, tuple(CLOSE_ACTIVATION), exact=True),
        "fp16_kernel": _middle(model, (nn.Linear,)),
        "backward_gain": conv,
        # a dropout that drops (mobilevit's blocks hold p = 0 ones: no scale to get wrong)
        "dropout_scale": _middle_where(model, lambda m: isinstance(m, nn.Dropout) and m.p > 0),
        "output_offset": conv,
        "moved_breakpoint": _middle(model, (nn.ReLU,), exact=True),
        # align.testing.faults.PORT_FAULTS
        "avgpool_include_pad": _middle_where(
            model, lambda m: type(m) is nn.AvgPool2d and m.padding not in (0, (0, 0))
        ),
        "align_corners": _middle_where(
            model,
            lambda m: (
                isinstance(m, nn.Upsample)
                and m.mode in ("linear", "bilinear", "bicubic", "trilinear")
            ),
        ),
        # a norm whose weight is not all zero (levit's and resnets' zero-initialized last
        # norms pass no gradient back: a backward fault there changes nothing)
        "unbiased_var": live_norm,
        "norm_grad_no_mean": live_norm,
        "norm_grad_no_var": live_norm,
        "attn_scale": _middle_where(
            model,
            lambda m: (
                "Attention" in type(m).__name__ and isinstance(getattr(m, "scale", None), float)
            ),
        ),
        # nn.GELU is `activation`'s; this is timm's own GELU class
        "gelu_tanh": _middle_where(
            model, lambda m: type(m).__name__ == "GELU" and type(m) is not nn.GELU
        ),
        "weight_grad_gain": plain,
        "bias_grad_dropped": _middle_where(
            model, lambda m: type(m) in (nn.Conv2d, nn.Linear) and m.bias is not None
        ),
        "channel_gain": _middle(model, (nn.Conv2d,), exact=True),
        "pad_value": _middle_where(
            model,
            lambda m: (
                type(m) is nn.Conv2d
                and m.padding_mode == "zeros"
                and not isinstance(m.padding, str)
                and any(m.padding)
            ),
        ),
        # running statistics: written in train mode only
        "norm_momentum": running,
        "running_var_biased": running,
    }
    return {kind: site for kind, site in sites.items() if site is not None}


def not_a_fault(
    precision: str, model: nn.Module, kind: str, site: str | None, x: torch.Tensor | None = None
) -> bool:
    """Whether fault `kind` at `site` changes nothing that `precision` does not already, or
    no more than an honest kernel may (`x`: the inputs, to see what dtype a site runs in)."""
    if precision in ("amp-fp16", "o2-fp16"):
        kinds, kinds_at = NOT_A_FAULT_UNDER_FP16, NOT_A_FAULT_UNDER_FP16_AT
    elif precision == "amp-bf16":
        kinds, kinds_at = NOT_A_FAULT_UNDER_BF16, NOT_A_FAULT_UNDER_BF16_AT
    else:
        return False
    if kind in kinds:
        return True
    if site is None:
        return False
    at = dict(model.named_modules())[site]
    if kinds_at.get(type(at)) == kind:
        return True
    if precision != "amp-bf16":
        return False
    # a SiLU 2% steeper is at most 0.56% off: under 2 bf16 ulp (0.78%), what a transcendental
    # kernel may honestly differ by, where the SiLU computes in bf16 (after a bf16 kernel)
    return (
        kind == "activation" and type(at) is nn.SiLU and runs_in(model, x, site) == torch.bfloat16
    )


def runs_in(model: nn.Module, x: torch.Tensor | None, site: str) -> torch.dtype | None:
    """The dtype module `site` gets its input in, under bf16 autocast (None without `x`)."""
    if x is None:
        return None
    seen = []
    private = copy.deepcopy(model)
    dict(private.named_modules())[site].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].dtype)
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        private(x)
    return seen[0] if seen else None


def build(name: str, size: int, train: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """A model as users write them (align.testing.USER_MODELS, its own inputs), or the timm
    model `name` (any: a name outside MODELS is tried with img_size=size, for models with
    a fixed input size, then with timm's defaults), dropout and drop-path on where the
    family has them."""
    if name in USER_MODELS:
        model, x = USER_MODELS[name]()
        return model.train(train), x
    import timm

    attempts = [MODELS[name]] if name in MODELS else [{"img_size": size}, {}]
    drops = (DROPS, {"drop_rate": DROPS["drop_rate"]}, {})  # ghostnet: no drop-path
    model, error = None, None
    for extra in attempts:
        for drop in drops:
            torch.manual_seed(0)
            try:
                model = timm.create_model(name, pretrained=False, num_classes=10, **drop, **extra)
                break
            except TypeError as e:
                error = e
        if model is not None:
            break
    if model is None:
        raise error
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model.train(train), x


def target_for(model: nn.Module, kind: str, site: str | None) -> nn.Module:
    if kind == "half_ulp":
        return perturb(model, 0.5)
    if kind == "one_ulp":
        return perturb(model, 1.0)
    if kind == "channels_last":
        target = copy.deepcopy(model)
        lay_out_weights(target, torch.channels_last)  # (a Conv3d's weight has no channels_last)
        return target
    if kind == "two_ulp_transcendental":
        return transcendental_ulps(model, 2.0)
    if kind == "threads":
        return with_threads(model, 2)
    if kind == "summation_order":
        return split_summation(model)
    if kind == "decomposed_norm":
        return decomposed_norms(model)
    if kind == "math_attention":
        return math_attention(model)
    if kind == "one_pass_norm":
        return one_pass_norms(model)
    if kind == "emulated":
        return copy.deepcopy(model)
    target = copy.deepcopy(model)
    FAULTS[kind](target, site)
    return target


def run(
    models: list[str],
    precisions: list[str],
    size: int,
    train: bool,
    honest: tuple[str, ...] = HONEST,
    faults: tuple[str, ...] | None = None,
    phases: str = "forward,backward",
) -> list[dict]:
    results = []
    for name in models:
        model, x = build(name, size, train)
        try:
            sites = fault_sites(model, x)
        except (RuntimeError, AssertionError, ValueError) as exc:  # the model itself cannot
            # run on these inputs (halonet26t asserts its feature map divides its blocks)
            why = (str(exc) or repr(exc)).splitlines()[0]
            print(f"{name:24s} not checkable at size {size}: {why}")
            continue
        checks = [(kind, None) for kind in honest] + [
            (kind, site) for kind, site in sites.items() if faults is None or kind in faults
        ]
        for precision in precisions:
            for kind, site in checks:
                if not_a_fault(precision, model, kind, site, x):
                    continue
                started = time.perf_counter()
                try:
                    report = align.check(
                        model,
                        x,
                        target_model=target_for(model, kind, site),
                        target="cpu",
                        precision=precision,
                        phases=phases,
                        emulate=EMULATION if kind == "emulated" else None,
                    )
                except AlignError as exc:  # no check possible: said, not counted
                    print(f"{name:24s} {precision:9s} {kind:22s} not checkable: {exc}")
                    continue
                # a fault that changes nothing (a conv before a zero-initialized norm), or
                # nothing in exact arithmetic (a norm's backward without the mean's gradient
                # where the gradient arriving has a zero mean per channel: a 1x1 conv into a
                # BatchNorm in train mode sends such gradients back)
                effective = site is None or (
                    not any("bit for bit" in n for n in report.notes)
                    and (
                        kind in ROUNDING_FAULTS
                        or exact_effect(model, x, target_for(model, kind, site), site) > NO_EFFECT
                    )
                )
                results.append(outcome(name, precision, kind, site, report, started, effective))
    return results


def exact_effect(model: nn.Module, x: torch.Tensor, target: nn.Module, site: str) -> float:
    """How far `target` moves module `site`'s tensors from `model`'s, both run in float64
    with the same decisions, in units of float64's own noise there (the same model with
    its weights a few float64 ulps off): over the site's outputs, input gradients, buffers and
    parameter gradients. A tensor that is zero in exact arithmetic (a bias gradient before
    a train-mode BatchNorm) is noise alone, faulty or not."""
    clean = capture(model, x, precision="fp64")
    noisy, faulty = (
        capture(m, x, precision="fp64", decisions_of=clean) for m in (_nudged(model), target)
    )

    def site_keys(trace: align.Trace) -> dict[tuple[str, int], list[str | None]]:
        return {
            c.key: c.outputs + c.grad_inputs + c.buffers for c in trace.calls if c.module == site
        }

    at = [site_keys(t) for t in (clean, noisy, faulty)]
    pairs = [
        (a, n, f)
        for call, keys in at[0].items()
        for a, n, f in zip(keys, at[1].get(call, []), at[2].get(call, []))
    ]
    pairs += [
        (key, noisy.param_grads.get(name), faulty.param_grads.get(name))
        for name, key in clean.param_grads.items()
        if name.startswith(f"{site}.")
    ]
    largest = 0.0
    for a, n, f in pairs:
        if a is None or n is None or f is None:
            continue
        ta, tn, tf = (t.tensors[k].double() for t, k in ((clean, a), (noisy, n), (faulty, f)))
        if ta.shape != tf.shape:
            return float("inf")
        noise = float((ta - tn).abs().max()) if ta.shape == tn.shape else 0.0
        largest = max(largest, float((ta - tf).abs().max()) / max(noise, 1e-300))
    return largest


def _nudged(model: nn.Module) -> nn.Module:
    """A copy of `model` with every floating weight a few float64 ulps off, at random."""
    nudged = copy.deepcopy(model).double()
    gen, ulps = torch.Generator().manual_seed(2), 4 * torch.finfo(torch.float64).eps
    with torch.no_grad():
        for p in nudged.parameters():
            p.mul_(1 + ulps * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return nudged


def outcome(
    name: str,
    precision: str,
    kind: str,
    site: str | None,
    report: align.Report,
    started: float,
    effective: bool = True,
) -> dict:
    """One check's outcome (printed as a line): honest when `site` is None, else a fault
    at `site`, caught exactly when the first culprit is it (or its parametrization)."""
    culprit = report.culprits[0].module if report.culprits else None
    first = report.culprits[0] if report.culprits else report.first_divergence
    entry = {
        "model": name,
        "precision": precision,
        "target": kind,
        "site": site,
        "honest": site is None,
        "effective": effective,
        "passed": report.passed,
        "culprit": culprit,
        # (a parametrized weight is stored in the site's parametrization: named there)
        "exact": site is not None
        and culprit is not None
        and (culprit == site or culprit.startswith(f"{site}.parametrizations.")),
        "first": None if first is None else str(first),
        "seconds": round(time.perf_counter() - started, 1),
    }
    verdict = "pass" if report.passed else "FAIL"
    print(
        f"{name:24s} {precision:9s} {kind:22s} {verdict}  culprit={culprit} "
        f"site={site} ({entry['seconds']} s)"
        + ("" if effective else "  no effect: not counted")
        + ("" if report.passed else f"\n    {first}"),
        flush=True,
    )
    return entry


def totals(results: list[dict]) -> str:
    honest = [r for r in results if r["honest"]]
    faults = [r for r in results if not r["honest"] and r["effective"]]
    alarms = [r for r in honest if not r["passed"]]
    caught = [r for r in faults if not r["passed"]]
    exact = [r for r in faults if r["exact"]]
    lines = [
        f"false alarms: {len(alarms)} of {len(honest)} honest targets",
        f"detections:   {len(caught)} of {len(faults)} faults",
        f"exact culprit: {len(exact)} of {len(faults)} faults",
    ]
    lines += [
        f"  missed: {r['model']} {r['precision']} {r['target']} at {r['site']}"
        for r in faults
        if r["passed"]
    ]
    lines += [
        f"  alarm:  {r['model']} {r['precision']} {r['target']}: {r['first']}" for r in alarms
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        help=f"timm model names or {', '.join(USER_MODELS)} (default: MODELS)",
    )
    p.add_argument("--honest", nargs="*", default=list(HONEST), choices=HONEST_KINDS)
    p.add_argument("--faults", nargs="*", default=None, choices=list(FAULTS), help="default: all")
    p.add_argument("--precisions", nargs="+", default=["fp32", "amp-bf16"])
    p.add_argument("--size", type=int, default=64, help="image size (default 64)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval", action="store_true", help="eval mode (BatchNorm on running stats)")
    p.add_argument("--phases", default="forward,backward", help="add ,train for a short training")
    p.add_argument("--json", default=None, help="write every check's outcome here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(
        args.models,
        args.precisions,
        args.size,
        not args.eval,
        tuple(args.honest),
        None if args.faults is None else tuple(args.faults),
        args.phases,
    )
    print(totals(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
