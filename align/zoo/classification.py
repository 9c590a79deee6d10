"""Image classification cases: the ImageNet models of the MMClassification NPU page
(open-mmlab/mmpretrain, docs/en/device/npu.md) and of the Ascend ModelZoo-PyTorch pages
(gitee.com/ascend/ModelZoo-PyTorch), built from timm or torchvision.

Every model is built with random init (pretrained=False: no download), with its recipe's
dropout and drop-path rates (their masks are drawn on the reference and replayed on the
other runs: align.numerics.decisions), in train mode (BatchNorm on batch statistics, as in
training). Inputs are images ~ N(0, 1) from a seeded
torch.Generator; the loss is cross-entropy against labels derived from those images.

Test sizes (`input_size`, `test_batch`) are capped like timm's own tests: the CPU check
runs forward + backward in fp32, amp-bf16 and a float64 golden run for every case.
Figures come from `align/zoo/golden_files/<case>.toml` (one source of truth); recipes
mirror the mmcls configs named there.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from align.zoo.golden import load_golden
from align.zoo.recipe import Recipe
from align.zoo.registry import Case, register_case

__all__ = ["image_inputs", "pseudo_labels", "classification_loss"]

_MMCLS = "mmcls 1.x (mmpretrain) configs/"
_LABEL_BITS = 16  # sign bits per image that make its label: 65536 codes >> num_classes

# The mmcls ImageNet schedules the configs below inherit (configs/_base_/schedules/).
_BS256 = dict(epochs=100, lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="multistep")
_BS256_STEPS = (30, 60, 90)  # imagenet_bs256.py: MultiStepLR milestones, gamma 0.1


def image_inputs(input_size: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    """A float32 batch of images ~ N(0, 1) drawn from a torch.Generator seeded by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *input_size), generator=gen, dtype=torch.float32)


def pseudo_labels(images: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class labels read from the signs of each image's first pixels (int64, on the CPU).

    The images come from a seeded generator, so the labels are fixed by the same seed;
    a sign survives moving to any device and casting to any float dtype, so every device
    and precision (float64 golden included) trains against the same labels.
    """
    flat = images.detach().reshape(images.shape[0], -1)[:, :_LABEL_BITS]
    bits = (flat > 0).to(device="cpu", dtype=torch.int64)
    weights = 2 ** torch.arange(bits.shape[1], dtype=torch.int64)
    return (bits * weights).sum(dim=1) % num_classes


def classification_loss(
    num_classes: int, output: torch.Tensor, inputs: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of `output` logits against `pseudo_labels(inputs)`, on output's device.

    Half-precision logits are upcast to float32 (as AMP computes the loss); float64
    (golden) stays float64.
    """
    logits = output if output.dtype in (torch.float32, torch.float64) else output.float()
    labels = pseudo_labels(inputs, num_classes).to(logits.device)
    return F.cross_entropy(logits, labels)


def _timm(name: str, drop_rate: float = 0.0, **kwargs: object) -> nn.Module:
    import timm  # heavy: imported when a model is built, not when the registry loads

    return timm.create_model(name, pretrained=False, drop_rate=drop_rate, **kwargs).train()


def _torchvision(name: str, **kwargs: object) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, **kwargs).train()


def _resnet50_cifar(num_classes: int = 100) -> nn.Module:
    """mmcls ResNet_CIFAR depth 50: timm's resnet50 with the stem swapped for CIFAR.

    Built from timm's ResNet (like the ImageNet cases): conv1 becomes a 3x3 stride-1
    conv and the max-pool goes, so 32x32 inputs keep 32x32 in layer1, as in mmcls
    `ResNet_CIFAR` (configs/_base_/models/resnet50_cifar.py).
    """
    model = _timm("resnet50", num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model.train()


def _classifier(
    name: str,
    source_model: str,
    build: partial[nn.Module],
    recipe: Recipe,
    input_size: tuple[int, int, int] = (3, 64, 64),
    num_classes: int = 1000,
    tags: tuple[str, ...] = (),
) -> Case:
    return Case(
        name=name,
        family="classification",
        source_model=source_model,
        task="classification",
        build=build,
        make_inputs=partial(image_inputs, input_size),
        loss_fn=partial(classification_loss, num_classes),
        figures=load_golden(name).figures,
        recipe=recipe,
        input_size=input_size,
        test_batch=2,
        tags=tags,
    )


def _timm_classifier(
    name: str, timm_name: str, recipe: Recipe, drops: dict[str, float] | None = None, **kw: object
) -> Case:
    """A timm model; `drops` are the recipe's drop_rate / drop_path_rate."""
    build = partial(_timm, timm_name, **(drops or {}))
    return _classifier(name, f"timm:{timm_name}", build, recipe, **kw)


def _imagenet(
    config: str, cards: int, batch_per_card: int, image_size: int = 224, **kw: object
) -> Recipe:
    """An ImageNet recipe whose `source` names the mmcls config file."""
    return Recipe(
        dataset="imagenet",
        cards=cards,
        batch_per_card=batch_per_card,
        image_size=image_size,
        source=_MMCLS + config,
        **kw,  # type: ignore[arg-type]
    )


@register_case
def resnet50() -> Case:
    """ResNet-50 (mmcls resnet50_8xb32_in1k) as timm's resnet50: the same torchvision-style net."""
    recipe = _imagenet(
        "resnet/resnet50_8xb32_in1k.py (schedules/imagenet_bs256.py)",
        8,
        32,
        milestones=_BS256_STEPS,
        **_BS256,
    )
    return _timm_classifier("resnet50", "resnet50", recipe, tags=("timm",))


@register_case
def resnext50_32x4d() -> Case:
    """ResNeXt-50 32x4d (mmcls resnext50-32x4d_8xb32_in1k; also the Ascend ModelZoo
    Resnext50_32x4d for PyTorch page's run)."""
    recipe = _imagenet(
        "resnext/resnext50-32x4d_8xb32_in1k.py (schedules/imagenet_bs256.py)",
        8,
        32,
        milestones=_BS256_STEPS,
        **_BS256,
    )
    return _timm_classifier("resnext50_32x4d", "resnext50_32x4d", recipe, tags=("timm",))


@register_case
def hrnet_w18() -> Case:
    """HRNet-W18 (mmcls hrnet-w18_4xb32_in1k)."""
    recipe = _imagenet(
        "hrnet/hrnet-w18_4xb32_in1k.py (schedules/imagenet_bs256_coslr.py, "
        "auto_scale_lr base_batch_size=128)",
        4,
        32,
        epochs=100,
        lr=0.1,
        schedule="cosine",
    )
    # 64 px: HRNet's four branches run at 1/4..1/32 and fuse by upsampling, so the
    # input must be a multiple of 32; 64 keeps the 1/32 branch at 2x2 for BatchNorm.
    return _timm_classifier("hrnet_w18", "hrnet_w18", recipe, tags=("timm",))


@register_case
def resnetv1d152() -> Case:
    """ResNetV1D-152 (mmcls resnetv1d152_8xb32_in1k) as timm's resnet152d (the ResNet-D)."""
    recipe = _imagenet(
        "resnet/resnetv1d152_8xb32_in1k.py (schedules/imagenet_bs256.py)",
        8,
        32,
        milestones=_BS256_STEPS,
        **_BS256,
    )
    return _timm_classifier("resnetv1d152", "resnet152d", recipe, tags=("timm",))


@register_case
def seresnet50() -> Case:
    """SE-ResNet-50 (mmcls seresnet50_8xb32_in1k)."""
    recipe = _imagenet(
        "seresnet/seresnet50_8xb32_in1k.py (schedules/imagenet_bs256_140e.py)",
        8,
        32,
        epochs=140,
        lr=0.1,
        schedule="multistep",
        milestones=(40, 80, 120),
    )
    return _timm_classifier("seresnet50", "seresnet50", recipe, tags=("timm",))


@register_case
def shufflenetv2_1x() -> Case:
    """ShuffleNetV2 1.0x (mmcls shufflenet-v2-1x_16xb64_in1k) as torchvision's shufflenet_v2_x1_0.

    timm has no ShuffleNet; torchvision's matches mmcls' ShuffleNetV2 widen_factor 1.0.
    """
    recipe = _imagenet(
        "shufflenet_v2/shufflenet-v2-1x_16xb64_in1k.py "
        "(schedules/imagenet_bs1024_linearlr_bn_nowd.py: constant warmup 5000 iters at "
        "0.1x, then poly to 0, no weight decay on norm layers)",
        16,
        64,
        epochs=300,
        lr=0.5,
        weight_decay=4e-5,
        schedule="poly",
        warmup="constant",
        warmup_iters=5000,
        warmup_ratio=0.1,
        norm_decay_mult=0.0,
    )
    return _classifier(
        "shufflenetv2_1x",
        "torchvision:shufflenet_v2_x1_0",
        partial(_torchvision, "shufflenet_v2_x1_0"),
        recipe,
        tags=("torchvision",),
    )


@register_case
def mobilenetv2() -> Case:
    """MobileNetV2 1.0x (mmcls mobilenet-v2_8xb32_in1k) as timm's mobilenetv2_100."""
    recipe = _imagenet(
        "mobilenet_v2/mobilenet-v2_8xb32_in1k.py (schedules/imagenet_bs256_epochstep.py)",
        8,
        32,
        epochs=300,
        lr=0.045,
        weight_decay=4e-5,
        schedule="step",
        step_size=1,
        gamma=0.98,
    )
    return _timm_classifier("mobilenetv2", "mobilenetv2_100", recipe, tags=("timm",))


@register_case
def mobilenetv3_small() -> Case:
    """MobileNetV3-Small (mmcls mobilenet-v3-small_8xb128_in1k) as timm's mobilenetv3_small_100."""
    recipe = _imagenet(
        "mobilenet_v3/mobilenet-v3-small_8xb128_in1k.py (RMSprop, StepLR every 2 epochs)",
        8,
        128,
        epochs=600,
        lr=0.064,
        momentum=0.9,
        weight_decay=1e-5,
        optimizer="rmsprop",
        optimizer_args=(("alpha", 0.9), ("eps", 0.0316)),
        schedule="step",
        step_size=2,
        gamma=0.973,
    )
    # the config's head: StackedLinearClsHead(dropout_rate=0.2)
    drops = {"drop_rate": 0.2}
    return _timm_classifier(
        "mobilenetv3_small", "mobilenetv3_small_100", recipe, drops, tags=("timm",)
    )


@register_case
def cspresnext50() -> Case:
    """CSPResNeXt-50 (mmcls cspresnext50_8xb32_in1k; the mmcls model follows timm's)."""
    recipe = _imagenet(
        "cspnet/cspresnext50_8xb32_in1k.py (schedules/imagenet_bs256.py)",
        8,
        32,
        milestones=_BS256_STEPS,
        **_BS256,
    )
    return _timm_classifier("cspresnext50", "cspresnext50", recipe, tags=("timm",))


@register_case
def efficientnet_b4() -> Case:
    """EfficientNet-B4 (mmcls efficientnet-b4_8xb32_in1k, 380 px) as timm's efficientnet_b4."""
    recipe = _imagenet(
        "efficientnet/efficientnet-b4_8xb32_in1k.py (schedules/imagenet_bs256.py)",
        8,
        32,
        image_size=380,
        milestones=_BS256_STEPS,
        **_BS256,
    )
    # 64 px instead of 380: the net is resolution-agnostic (global pool), the stride-32
    # map stays 2x2, and its 32 MBConv blocks keep the float64 golden run affordable.
    # the config's backbone drop_path_rate=0.2 and head dropout 0.4 (timm's b4 recipe too)
    drops = {"drop_rate": 0.4, "drop_path_rate": 0.2}
    return _timm_classifier("efficientnet_b4", "efficientnet_b4", recipe, drops, tags=("timm",))


@register_case
def densenet121() -> Case:
    """DenseNet-121 (mmcls densenet121_4xb256_in1k)."""
    recipe = _imagenet(
        "densenet/densenet121_4xb256_in1k.py (schedules/imagenet_bs256.py, max_epochs=90)",
        4,
        256,
        epochs=90,
        lr=0.1,
        schedule="multistep",
        milestones=_BS256_STEPS,
    )
    return _timm_classifier("densenet121", "densenet121", recipe, tags=("timm",))


@register_case
def spnasnet_100() -> Case:
    """SPNASNet-100 (the Ascend ModelZoo SPNASNet_100 for PyTorch page: a port of timm's
    spnasnet_100)."""
    recipe = Recipe(
        dataset="imagenet",
        epochs=100,
        cards=8,
        # The seed does not give the batch size; 128 per card is timm train.py's default.
        batch_per_card=128,
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-4,
        # Nor the schedule; cosine is timm train.py's default (--sched cosine).
        schedule="cosine",
        source="Ascend ModelZoo-PyTorch (gitee.com/ascend/ModelZoo-PyTorch) SPNASNet_100 "
        "(timm-based) training-script "
        "defaults: lr 0.01, momentum 0.9, weight decay 1e-4, 100 epochs, 8 cards; "
        "batch per card (128) and schedule (cosine) not documented: timm train.py defaults",
    )
    return _timm_classifier("spnasnet_100", "spnasnet_100", recipe, tags=("timm",))


@register_case
def resnet50_cifar100() -> Case:
    """CIFAR-100 ResNet-50 (the Ascend ModelZoo Resnet50-cifar page, mmcls
    resnet50_8xb16_cifar100): 3x3 stem, no max-pool."""
    recipe = Recipe(
        dataset="cifar100",
        epochs=200,
        cards=8,
        batch_per_card=16,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="multistep",
        milestones=(60, 120, 160),
        gamma=0.2,
        precision="o2-fp16",  # the Ascend ModelZoo Resnet50-cifar page trained with AMP_Type O2
        image_size=32,
        source=_MMCLS + "resnet/resnet50_8xb16_cifar100.py (schedules/cifar10_bs128.py, "
        "200 epochs); the Ascend ModelZoo Resnet50-cifar page ran it on 8 NPUs at global "
        "batch 256 and 4096 with apex O2",
    )
    return _classifier(
        "resnet50_cifar100",
        "timm:resnet50 + CIFAR stem (mmcls ResNet_CIFAR)",
        partial(_resnet50_cifar, 100),
        recipe,
        input_size=(3, 32, 32),
        num_classes=100,
        tags=("timm", "cifar"),
    )
