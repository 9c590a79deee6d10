"""A classification network as an mmengine model: the loss in training, top-k in validation."""

from __future__ import annotations

import torch
from mmengine.model import BaseDataPreprocessor, BaseModel
from torch import nn

TOPK = 5


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
