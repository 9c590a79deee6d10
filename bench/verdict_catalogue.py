"""The verdict on models nobody calibrated: false alarms, detections and exact culprits.

    python bench/verdict_catalogue.py                      # the default catalogue (~30 min)
    python bench/verdict_catalogue.py --models resnet26d --precisions fp32 --json out.json

Every model is a timm model outside the zoo, in train mode (BatchNorm on batch
statistics over small maps), with dropout and drop-path on, checked with align's defaults
(no golden file). Honest targets (`align.testing.perturb`: every accumulating kernel
rounds half an ulp or one ulp otherwise; the same model in channels_last) must pass.
Faulty targets (`align.testing.FAULTS`, each injected into a module chosen by type, the
middle one of its kind) must fail with the faulty module as the first culprit. Prints one
line per check and the totals.
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
from align.testing import CLOSE_ACTIVATION, FAULTS, perturb

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
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
# Faults that are none under bf16 autocast (tests/judge/test_faults.py says why): fp16 rounding
# is finer than bf16's, and tanh-GELU is 8x closer to GELU than bf16's own rounding.
NOT_A_FAULT_UNDER_BF16 = {"weight_via_fp16", "fp16_kernel"}
NOT_A_FAULT_UNDER_BF16_AT = {nn.GELU: "activation"}


def _middle(model: nn.Module, kinds: tuple[type, ...], exact: bool = False) -> str | None:
    names = [
        n
        for n, m in model.named_modules()
        if n and (type(m) in kinds if exact else isinstance(m, kinds))
    ]
    return names[len(names) // 2] if names else None


def fault_sites(model: nn.Module) -> dict[str, str]:
    """fault kind -> the module it goes into, chosen by type (the middle one of its kind)."""
    conv, norm = _middle(model, (nn.Conv2d, nn.Linear)), _middle(model, NORMS)
    sites = {
        "kernel_gain": conv,
        "weight_via_fp16": _middle(model, (nn.Conv2d,)) or conv,
        "norm_gain": norm,
        "norm_eps": norm,
        "activation": _middle(model, tuple(CLOSE_ACTIVATION), exact=True),
        "fp16_kernel": _middle(model, (nn.Linear,)),
        "backward_gain": conv,
        "dropout_scale": _middle(model, (nn.Dropout,)),
        "output_offset": conv,
        "moved_breakpoint": _middle(model, (nn.ReLU,), exact=True),
    }
    return {kind: site for kind, site in sites.items() if site is not None}


def _bf16_exempt(model: nn.Module, kind: str, site: str | None) -> bool:
    if site is None:
        return False
    return NOT_A_FAULT_UNDER_BF16_AT.get(type(dict(model.named_modules())[site])) == kind


def build(name: str, size: int, train: bool = True) -> tuple[nn.Module, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    kwargs = dict(pretrained=False, num_classes=10, **MODELS[name])
    try:
        model = timm.create_model(name, **DROPS, **kwargs)
    except TypeError:  # a family without drop-path (ghostnet)
        model = timm.create_model(name, drop_rate=DROPS["drop_rate"], **kwargs)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model.train(train), x


def target_for(model: nn.Module, kind: str, site: str | None) -> nn.Module:
    if kind == "half_ulp":
        return perturb(model, 0.5)
    if kind == "one_ulp":
        return perturb(model, 1.0)
    if kind == "channels_last":
        return copy.deepcopy(model).to(memory_format=torch.channels_last)
    target = copy.deepcopy(model)
    FAULTS[kind](target, site)
    return target


def run(models: list[str], precisions: list[str], size: int, train: bool) -> list[dict]:
    results = []
    for name in models:
        model, x = build(name, size, train)
        checks = [(kind, None) for kind in HONEST] + list(fault_sites(model).items())
        for precision in precisions:
            for kind, site in checks:
                if precision == "amp-bf16" and (
                    kind in NOT_A_FAULT_UNDER_BF16 or _bf16_exempt(model, kind, site)
                ):
                    continue
                started = time.perf_counter()
                report = align.check(
                    model,
                    x,
                    target_model=target_for(model, kind, site),
                    target="cpu",
                    precision=precision,
                )
                culprit = report.culprits[0].module if report.culprits else None
                first = report.culprits[0] if report.culprits else report.first_divergence
                entry = {
                    "model": name,
                    "precision": precision,
                    "target": kind,
                    "site": site,
                    "honest": site is None,
                    # a fault that changes nothing (a conv before a zero-initialized norm)
                    "effective": site is None or not any("bit for bit" in n for n in report.notes),
                    "passed": report.passed,
                    "culprit": culprit,
                    "exact": site is not None and culprit == site,
                    "first": None if first is None else str(first),
                    "seconds": round(time.perf_counter() - started, 1),
                }
                results.append(entry)
                verdict = "pass" if report.passed else "FAIL"
                print(
                    f"{name:24s} {precision:9s} {kind:15s} {verdict}  culprit={culprit} "
                    f"site={site} ({entry['seconds']} s)"
                    + ("" if report.passed else f"\n    {first}"),
                    flush=True,
                )
    return results


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
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "amp-bf16"])
    p.add_argument("--size", type=int, default=64, help="image size (default 64)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval", action="store_true", help="eval mode (BatchNorm on running stats)")
    p.add_argument("--json", default=None, help="write every check's outcome here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args.models, args.precisions, args.size, not args.eval)
    print(totals(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
