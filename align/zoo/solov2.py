"""SOLOv2 R50-FPN from mmdet 3.3 (mask AP), in the form align runs every detection case.

mmdet is not a dependency of align: it needs mmcv with its compiled ops (`import
mmdet.models` loads mmcv.ops), and PyPI ships mmcv 2.1 only as source.
`tools/install_mmdet.sh` builds it (see there for what it costs); without it the case
skips with that reason. The model comes from mmdet's own config file, as installed with
mmdet, with the ImageNet checkpoint left out (no download; random init as every case).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align.errors import AlignError

CONFIG = "solov2/solov2_r50_fpn_1x_coco.py"
NUM_CLASSES = 80  # mmdet's COCO classes


def missing() -> str | None:
    """Why SOLOv2 cannot run here, or None when mmdet and mmcv's compiled ops are there.
    Looks for the files only: importing mmdet takes seconds, and the registry asks at load."""
    build = "run tools/install_mmdet.sh (it builds mmcv 2.1's CPU ops from source)"
    mmcv = importlib.util.find_spec("mmcv")
    if importlib.util.find_spec("mmdet") is None or mmcv is None:
        return (
            f"needs mmdet 3.3 and mmcv 2.1 with its compiled ops, which are not installed "
            f"(PyPI has mmcv 2.1 as source only): {build}"
        )
    package = Path(mmcv.origin).parent
    if not any(package.glob("_ext*.so")) and not any(package.glob("_ext*.pyd")):
        return f"mmcv is installed without its compiled ops, which mmdet.models imports: {build}"
    return None


def build() -> nn.Module:
    """The case's model; a clear error where mmdet or mmcv's ops are missing."""
    reason = missing()
    if reason:
        raise AlignError(f"solov2_r50 cannot run here: {reason}")
    return SOLOv2Losses()


class SOLOv2Losses(nn.Module):
    """mmdet's SOLOv2 taking `(images, targets)` as the torchvision detectors do and
    returning its loss dict; each target holds `boxes`, `labels` (0..79) and `masks`."""

    def __init__(self) -> None:
        super().__init__()
        import mmdet
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        from mmengine.config import Config
        from mmengine.logging import MMLogger

        register_all_modules()
        config = Path(mmdet.__file__).parent / ".mim" / "configs" / CONFIG
        cfg = Config.fromfile(str(config)).model
        # its normalization, done here (images in [0, 1] as for every detection case); the
        # BGR-to-RGB swap is moot on random images
        pre = cfg.pop("data_preprocessor")
        self.register_buffer("mean", torch.tensor(pre.mean).view(3, 1, 1) / 255.0, False)
        self.register_buffer("std", torch.tensor(pre.std).view(3, 1, 1) / 255.0, False)
        cfg.backbone.init_cfg = None  # the ImageNet checkpoint would be downloaded
        self.detector = MODELS.build(cfg)
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)  # init_weights logs every parameter at INFO
        try:
            self.detector.init_weights()
        finally:
            logger.setLevel(level)

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> Any:
        from mmdet.structures import DetDataSample
        from mmdet.structures.mask import BitmapMasks
        from mmengine.structures import InstanceData

        batch = (torch.stack(images) - self.mean) / self.std
        height, width = batch.shape[-2:]
        meta = {"img_shape": (height, width), "pad_shape": (height, width)}
        samples = []
        for target in targets:
            sample = DetDataSample(metainfo={**meta, "batch_input_shape": (height, width)})
            sample.gt_instances = InstanceData(
                bboxes=target["boxes"],
                labels=target["labels"],
                masks=BitmapMasks(target["masks"].cpu().numpy(), height, width),
            )
            samples.append(sample)
        return self.detector.loss(batch, samples)
