"""Networks as mmengine models: a classifier (loss, top-k) and a torchvision detector
(its own losses, COCO detections)."""

from __future__ import annotations

from typing import Any

import torch
from mmengine.model import BaseDataPreprocessor, BaseModel
from torch import nn

from align.errors import AlignError

TOPK = 5
# mmdet's img_scale (1333, 800) for the FPN detectors, torchvision's min_size / max_size
# defaults: the long side is capped at 1333/800 of the short side's size.
MAX_SIZE_RATIO = 1333 / 800


class Classifier(BaseModel):
    """`net` under mmengine: cross-entropy in "loss" mode, per-sample top-5 in "predict"."""

    def __init__(self, net: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__(data_preprocessor=BaseDataPreprocessor(non_blocking=True))
        self.net = net
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, mode: str = "tensor"):
        """mmengine's three modes: {"loss": ...}, [(top-5 classes, label)...] or logits."""
        logits = self.net(inputs)
        if mode == "loss":
            return {"loss": self.criterion(logits.float(), labels)}
        if mode == "predict":
            top = logits.topk(min(TOPK, logits.shape[1]), dim=1).indices.cpu()
            return list(zip(top, labels.cpu()))
        return logits


class Detector(BaseModel):
    """A torchvision detector under mmengine, on lists of images and of target dicts.

    "loss" (train mode): the detector's own loss dict, each key prefixed "loss_" so that
    mmengine sums them all into the loss it optimizes and logs each one. "predict" (eval
    mode): per image {"image_id", "boxes" xyxy in the image's pixels, "scores", "labels"}
    on the CPU, what align.train.metrics.CocoBoxAP takes.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__(data_preprocessor=BaseDataPreprocessor(non_blocking=True))
        self.net = net

    def forward(self, images: list[torch.Tensor], targets: list[dict], mode: str = "tensor"):
        """mmengine's three modes: {"loss_<name>": ...}, [detections...] or the raw output."""
        if mode == "loss":
            return {f"loss_{name}": value for name, value in self.net(images, targets).items()}
        output = self.net(images)
        if mode == "predict":
            return [
                {"image_id": target["image_id"], **{k: v.cpu() for k, v in det.items()}}
                for det, target in zip(output, targets)
            ]
        return output


def detector_at(net: nn.Module, size: int) -> nn.Module:
    """`net` (torchvision detector) resizing its images to `size` as its recipe does.

    SSDs have one input size, the one their anchors and feature pyramid are laid out
    for: `size` must be it. The FPN detectors resize the short side to `size` with the
    long side at most MAX_SIZE_RATIO times that (mmdet's 1333 x 800 at size 800).
    """
    transform: Any = net.transform
    if transform.fixed_size is not None:
        if tuple(transform.fixed_size) != (size, size):
            raise AlignError(
                f"{type(net).__name__} takes {transform.fixed_size[0]} px images only (its "
                f"anchors and feature maps are laid out for them), not {size} px"
            )
        return net
    transform.min_size = (size,)
    transform.max_size = round(size * MAX_SIZE_RATIO)
    return net
