"""Training recipes: the hyper-parameters of a documented run, mirroring the seed configs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """How a documented figure was trained: what `python -m align.run` reproduces.

    `batch_per_card` times `cards` is the global batch; `lr` is for that global batch.
    `source` names the config the values come from.
    """

    dataset: str  # "imagenet", "cifar100", "coco", "digits"
    epochs: int
    cards: int
    batch_per_card: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"  # "sgd", "rmsprop", "adamw"
    schedule: str = "step"  # "step", "cosine", "multistep", "poly"
    milestones: tuple[int, ...] = ()  # epochs, for "step"/"multistep"
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    step_size: int = 0  # epochs between decays for "step" without milestones (StepLR)
    warmup: str = "linear"  # "linear" or "constant" (mmcv lr_config warmup kinds)
    warmup_iters: int = 0  # iterations of warmup (mmdet configs count iterations)
    warmup_ratio: float = 0.001  # lr factor at the start of warmup
    optimizer_args: tuple[tuple[str, float], ...] = ()  # e.g. RMSprop (("alpha", 0.9),)
    norm_decay_mult: float = 1.0  # weight-decay factor on norm layers (0 = no decay)
    bias_decay_mult: float = 1.0
    bias_lr_mult: float = 1.0
    grad_clip: float | None = None  # max global L2 norm, None = no clipping
    loss_scale: str | float | None = None  # "dynamic", a static scale, None (no AMP)
    repeat_dataset: int = 1  # mmdet RepeatDataset times: an "epoch" is this many passes
    label_smoothing: float = 0.0
    precision: str = "fp32"
    image_size: int = 224
    source: str = ""
