"""The embedded case: scikit-learn's 8x8 digits (real scans, shipped with the package).

It needs no download and trains in about a minute on two CPU cores, so
`python -m align.run digits --cards 2` shows the whole full-run path (elastic launch,
gloo, mmengine Runner, checkpoints, verdict) on any machine. Its documented figure is
the mean Top-1 align measured itself over several seeds (its golden file,
align/zoo/golden_files/digits.toml, says how).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from align.zoo.golden import load_golden
from align.zoo.recipe import Recipe
from align.zoo.registry import Case, register_case

NUM_CLASSES = 10
IMAGE_SIZE = 32


def _build() -> nn.Module:
    import timm  # heavy: imported when the model is built, not when the registry loads

    return timm.create_model("test_resnet", pretrained=False, num_classes=NUM_CLASSES).train()


def _inputs(batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, IMAGE_SIZE, IMAGE_SIZE), generator=gen)


def _loss(output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    # Labels from the sign pattern of each image: fixed by the inputs, on any device.
    labels = (inputs.reshape(inputs.shape[0], -1)[:, :4] > 0).long().sum(1) % NUM_CLASSES
    return F.cross_entropy(output.float(), labels.to(output.device))


@register_case
def digits() -> Case:
    """timm's test_resnet on 32x32 digits: 8 epochs, 2 cards x 32, SGD + cosine."""
    return Case(
        name="digits",
        family="digits",
        source_model="timm:test_resnet",
        task="classification",
        build=_build,
        make_inputs=_inputs,
        loss_fn=_loss,
        figures=load_golden("digits").figures,
        recipe=Recipe(
            dataset="digits",
            epochs=8,
            cards=2,
            batch_per_card=32,
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-4,
            schedule="cosine",
            warmup_epochs=1.0,
            image_size=IMAGE_SIZE,
            source="align's own recipe for the embedded digits case (golden_files/digits.toml)",
        ),
        input_size=(3, IMAGE_SIZE, IMAGE_SIZE),
        test_batch=2,
        tags=("timm", "embedded"),
    )
