"""mmdet's SOLOv2 as a case (align/zoo/solov2.py); runs where tools/install_mmdet.sh ran."""

import pytest
import torch

from align.zoo import get_case, solov2

pytestmark = pytest.mark.skipif(solov2.missing() is not None, reason=str(solov2.missing()))


def test_solov2_is_mmdets_model_and_returns_its_losses():
    case = get_case("solov2_r50")
    model = case.build()
    assert type(model.detector).__name__ == "SOLOv2"
    assert type(model.detector.mask_head).__name__ == "SOLOV2Head"
    images, targets = case.make_inputs(2, 0)
    assert len(images) == 2 and images[0].shape == case.input_size
    masks = targets[0]["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (2, *case.input_size[1:])
    assert 0 < masks.float().mean() < 0.5  # ellipses inside 20-50% boxes
    losses = model(images, targets)
    assert set(losses) == {"loss_mask", "loss_cls"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
