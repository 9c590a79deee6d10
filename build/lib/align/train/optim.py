"""A Recipe as mmengine configs: the optimizer wrapper (with its precision) and the lr schedule."""

from __future__ import annotations

import importlib.util
from typing import Any

from align.errors import AlignError
from align.zoo.recipe import Recipe

_OPTIMIZERS = {"sgd": "SGD", "rmsprop": "RMSprop", "adamw": "AdamW"}
_AMP_DTYPES = {"amp-fp16": "float16", "amp-bf16": "bfloat16"}


def optim_wrapper(recipe: Recipe, precision: str, device: str) -> dict[str, Any]:
    """mmengine's optim_wrapper config for `recipe` at `precision` on `device`.

    fp32: OptimWrapper. amp-fp16 / amp-bf16: AmpOptimWrapper (autocast, dynamic loss
    scaling). o2-fp16: ApexOptimWrapper at opt_level O2, the apex mode the seeds' "AMP_Type
    O2" runs used; it needs apex (NVIDIA's, or Ascend's fork on NPUs).
    """
    if recipe.optimizer not in _OPTIMIZERS:
        raise AlignError(f"unknown optimizer {recipe.optimizer!r}; known: {', '.join(_OPTIMIZERS)}")
    optimizer: dict[str, Any] = {
        "type": _OPTIMIZERS[recipe.optimizer],
        "lr": recipe.lr,
        "weight_decay": recipe.weight_decay,
        **dict(recipe.optimizer_args),
    }
    if recipe.optimizer != "adamw":
        optimizer["momentum"] = recipe.momentum
    cfg: dict[str, Any] = {"optimizer": optimizer, **_precision_wrapper(recipe, precision, device)}
    multipliers = {
        "norm_decay_mult": recipe.norm_decay_mult,
        "bias_decay_mult": recipe.bias_decay_mult,
        "bias_lr_mult": recipe.bias_lr_mult,
    }
    if any(v != 1.0 for v in multipliers.values()):
        cfg["paramwise_cfg"] = multipliers
    if recipe.grad_clip is not None:
        cfg["clip_grad"] = {"max_norm": recipe.grad_clip}
    return cfg


def _precision_wrapper(recipe: Recipe, precision: str, device: str) -> dict[str, Any]:
    if precision == "fp32":
        return {"type": "OptimWrapper"}
    if device == "cpu":
        raise AlignError(
            f"--precision {precision} needs an accelerator: mmengine's mixed-precision "
            "optimizer wrappers run on cuda or npu only. Use --precision fp32 on the cpu."
        )
    loss_scale = recipe.loss_scale if recipe.loss_scale is not None else "dynamic"
    if precision in _AMP_DTYPES:
        return {
            "type": "AmpOptimWrapper",
            "dtype": _AMP_DTYPES[precision],
            "loss_scale": loss_scale,
        }
    if precision == "o2-fp16":
        if importlib.util.find_spec("apex") is None:
            raise AlignError(
                "--precision o2-fp16 (apex O2) needs apex: install NVIDIA apex on cuda or "
                "Ascend's apex on npu, or use --precision amp-fp16 (torch autocast)."
            )
        return {"type": "ApexOptimWrapper", "opt_level": "O2", "loss_scale": loss_scale}
    raise AlignError(f"unknown precision {precision!r}")


def param_schedulers(recipe: Recipe, epochs: int, iters_per_epoch: int) -> list[dict[str, Any]]:
    """mmengine param_scheduler configs: optional warmup, then the recipe's schedule.

    The main schedule spans all epochs (by epoch, stepped per iteration where smooth) and
    the warmup multiplies it over its first iterations, as mmcls configs compose them.
    """
    schedulers = _warmup(recipe, iters_per_epoch)
    kind = recipe.schedule
    by_epoch = {"by_epoch": True, "begin": 0, "end": epochs}
    if kind == "cosine":
        schedulers.append(
            {
                "type": "CosineAnnealingLR",
                "T_max": epochs,
                "eta_min": 0.0,
                "convert_to_iter_based": True,
                **by_epoch,
            }
        )
    elif kind == "poly":
        schedulers.append(
            {
                "type": "PolyLR",
                "power": 1.0,
                "eta_min": 0.0,
                "convert_to_iter_based": True,
                **by_epoch,
            }
        )
    elif kind in ("step", "multistep") and recipe.milestones:
        schedulers.append(
            {
                "type": "MultiStepLR",
                "milestones": list(recipe.milestones),
                "gamma": recipe.gamma,
                **by_epoch,
            }
        )
    elif kind == "step" and recipe.step_size:
        schedulers.append(
            {"type": "StepLR", "step_size": recipe.step_size, "gamma": recipe.gamma, **by_epoch}
        )
    elif kind not in ("step", "multistep"):
        raise AlignError(f"unknown lr schedule {kind!r}: use step, multistep, cosine or poly")
    # "step" with neither milestones nor step_size: the documented lr stays constant.
    return schedulers


def _warmup(recipe: Recipe, iters_per_epoch: int) -> list[dict[str, Any]]:
    iters = recipe.warmup_iters or round(recipe.warmup_epochs * iters_per_epoch)
    if iters <= 0:
        return []
    span = {"by_epoch": False, "begin": 0, "end": iters}
    if recipe.warmup == "constant":
        return [{"type": "ConstantLR", "factor": recipe.warmup_ratio, **span}]
    if recipe.warmup == "linear":
        return [{"type": "LinearLR", "start_factor": recipe.warmup_ratio, **span}]
    raise AlignError(f"unknown warmup {recipe.warmup!r}: use linear or constant")
