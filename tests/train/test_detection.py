"""Detection full runs: COCO splits for training, the detector under mmengine, and a real
short run of ssdlite_mobilenetv2 on a synthetic COCO through align.run's worker path."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from align.commands.run import main
from align.errors import AlignError
from align.train import datasets, full_run
from align.train.model import Detector, detector_at
from align.zoo import get_case
from align.zoo.golden import golden_dir, load_golden

CASE = "ssdlite_mobilenetv2"  # fp32 recipe, 4.4 M parameters: the fastest detector to train
COLORS = {1: (220, 40, 40), 2: (40, 40, 220)}  # one colour per category


def synthetic_coco(root: Path, n_train: int = 6, n_val: int = 2, size: int = 64) -> Path:
    """A COCO root with grey images holding one or two filled rectangles each.

    Train image 1 has a crowd box and train image 2 a crowd box only, so training must
    drop the crowd boxes and leave image 2 out.
    """
    gen = torch.Generator().manual_seed(0)
    (root / "annotations").mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / f"{split}2017").mkdir()
        images, annotations = [], []
        for image_id in range(1, n + 1):
            image = Image.new("RGB", (size, size), (128, 128, 128))
            draw = ImageDraw.Draw(image)
            for k in range(1 + image_id % 2):
                category = 1 + (image_id + k) % 2
                w, h = torch.randint(size // 4, size // 2, (2,), generator=gen).tolist()
                x, y = torch.randint(0, size - max(w, h), (2,), generator=gen).tolist()
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLORS[category])
                crowd = split == "train" and image_id in (1, 2) and k == 0
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category,
                        "bbox": [x, y, w, h],
                        "area": w * h,
                        "iscrowd": int(crowd),
                    }
                )
            name = f"{image_id:012d}.jpg"
            image.save(root / f"{split}2017" / name)
            images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        instances = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}],
        }
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(instances))
    return root


@pytest.fixture
def coco(tmp_path):
    return synthetic_coco(tmp_path / "coco")


@pytest.fixture
def recorded_spread(tmp_path, monkeypatch):
    """The golden files, with a box-AP run-to-run spread recorded for CASE."""
    golden = tmp_path / "golden"
    shutil.copytree(golden_dir(), golden)
    with (golden / f"{CASE}.toml").open("a") as f:
        f.write('\n[full_run]\nmetric = "box_ap"\nrun_std = 1.0\nsource = "test"\n')
    monkeypatch.setenv("ALIGN_GOLDEN_DIR", str(golden))  # the workers inherit it


def test_training_split_drops_crowd_boxes_and_empty_images(coco):
    splits = datasets.load_detection(coco, seed=0, repeat=3)
    assert len(splits.train) == 3 * 5  # image 2 had a crowd box only
    assert len(splits.val) == 2 and splits.num_classes == 3
    assert splits.annotations == coco / "annotations" / "instances_val2017.json"
    image, target = splits.train[0]  # image 1: its crowd box is gone, one box is left
    assert type(image) is torch.Tensor and image.shape == (3, 64, 64)
    assert target["image_id"] == 1 and target["labels"].tolist() == [1]
    assert type(target["boxes"]) is torch.Tensor and target["boxes"].shape == (1, 4)
    val_image, val_target = splits.val[1]
    assert val_target["image_id"] == 2 and len(val_target["boxes"]) == 1


def test_augmentation_moves_boxes_with_the_image_and_is_seeded(coco):
    flip = datasets.load_detection(coco, seed=0)
    plain = datasets.load_coco(coco, "train")
    index = 3  # train image 5 (images 1..6 without image 2): two boxes
    image, target = plain[index + 1]
    flips = set()
    for epoch in range(8):
        flip.train.set_epoch(epoch)
        aug_image, aug_target = flip.train[index]
        assert torch.equal(aug_target["boxes"], flip.train[index][1]["boxes"])  # seeded
        flipped = not torch.equal(aug_image, image.as_subclass(torch.Tensor))
        if flipped:
            assert torch.equal(aug_image, image.flip(-1))
            x1, y1, x2, y2 = target["boxes"].unbind(1)
            expected = torch.stack([64 - x2, y1, 64 - x1, y2], dim=1)
            assert torch.equal(aug_target["boxes"], expected)
        else:
            assert torch.equal(aug_target["boxes"], target["boxes"].as_subclass(torch.Tensor))
        flips.add(flipped)
    assert flips == {True, False}

    ssd = datasets.load_detection(coco, seed=0, augment="ssd", fill=(0.5, 0.5, 0.5))
    sizes = set()
    for index in range(len(ssd.train)):
        image, target = ssd.train[index]
        sizes.add(image.shape)
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"]) >= 1
        assert (boxes[:, 2:] - boxes[:, :2] >= 1).all()  # no degenerate box after a crop
        assert (boxes[:, 2] <= image.shape[2]).all() and (boxes[:, 3] <= image.shape[1]).all()
    assert len(sizes) > 1  # expand and crop change the canvas (the model resizes it)
    with pytest.raises(AlignError, match="unknown augmentation"):
        datasets.load_detection(coco, seed=0, augment="mosaic")


def test_detector_losses_detections_and_input_size():
    torch.manual_seed(0)
    net = detector_at(get_case("fcos_r50").build(), 32)
    assert (net.transform.min_size, net.transform.max_size) == ((32,), 53)
    model = Detector(net)
    images = [torch.rand(3, 32, 40), torch.rand(3, 24, 32)]
    targets = [
        {
            "boxes": torch.tensor([[2.0, 3.0, 20.0, 18.0]]),
            "labels": torch.tensor([1]),
            "image_id": 7,
        },
        {
            "boxes": torch.tensor([[1.0, 1.0, 9.0, 12.0]]),
            "labels": torch.tensor([2]),
            "image_id": 9,
        },
    ]
    losses = model(images, targets, mode="loss")
    assert set(losses) == {"loss_classification", "loss_bbox_regression", "loss_bbox_ctrness"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        detections = model(images, targets, mode="predict")
    assert [d["image_id"] for d in detections] == [7, 9]
    assert all(
        d["boxes"].shape[1:] == (4,) and len(d["scores"]) == len(d["labels"]) for d in detections
    )

    with pytest.raises(AlignError, match="320 px images only"):
        detector_at(get_case(CASE).build(), 256)


def test_missing_or_malformed_coco_is_a_usage_error(coco, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main([CASE, "--device", "cpu", "--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Expected layout" in err and "instances_" in err
    shutil.rmtree(coco / "val2017")
    assert main([CASE, "--device", "cpu", "--data", str(coco)]) == 2
    err = capsys.readouterr().err
    assert str(coco) in err and "no val2017/ image folder" in err


def test_box_ap_without_recorded_spread_needs_several_runs(coco, tmp_path, monkeypatch):
    get_case(CASE)  # the registry is loaded: from here on golden files are read for spreads
    assert load_golden(CASE).full_run is None  # the case's own file records no spread
    shutil.copytree(golden_dir(), tmp_path / "golden")
    monkeypatch.setenv("ALIGN_GOLDEN_DIR", str(tmp_path / "golden"))
    with pytest.raises(AlignError, match="records no run-to-run spread for box_ap"):
        full_run.prepare(CASE, device="cpu", data=coco, work_dir=tmp_path / "w")
    opts = full_run.prepare(CASE, device="cpu", data=coco, work_dir=tmp_path / "w", runs=2)
    assert opts.recipe.dataset == "coco" and opts.recipe.precision == "fp32"
    with pytest.raises(AlignError, match="trains classification and detection cases"):
        full_run.prepare("solov2_r50", device="cpu", data=coco)


@pytest.mark.timeout(300)
def test_a_detection_case_trains_and_is_judged_end_to_end(coco, tmp_path, recorded_spread):
    work = tmp_path / "work"
    opts = full_run.prepare(
        CASE, epochs=2, cards=1, device="cpu", data=coco, batch_size=2, lr=0.01, work_dir=work
    )
    # Few iterations: no 500-iteration warmup, one pass over the 5 images per epoch.
    short = dataclasses.replace(opts.recipe, warmup_iters=0, repeat_dataset=1)
    out = full_run.run(dataclasses.replace(opts, recipe=short))

    result = json.loads((work / full_run.RESULT).read_text())
    assert result == json.loads(json.dumps(out))
    assert (result["case"], result["device"], result["world_size"]) == (CASE, "cpu", 1)
    assert set(result["final"]) == {"box_ap", "box_ap50"} and result["n_val"] == 2
    box_ap = result["final"]["box_ap"]
    assert 0.0 <= box_ap <= result["final"]["box_ap50"] <= 100.0
    epochs = result["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[-1]["box_ap"] == box_ap
    losses = [e["loss"] for e in epochs]
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0]
    assert result["images_per_s"] > 0 and result["deviations"]  # 2 epochs, not 120
    verdict = result["verdict"]
    assert (verdict["metric"], verdict["documented"]) == ("box_ap", 20.2)
    assert verdict["measured"] == box_ap and verdict["run_std"] == 1.0
    assert not verdict["passed"] and "not confirmed" in verdict["reason"]  # 2 epochs, 5 images
    assert (work / "rank0.log").is_file() and (work / "epoch_2.pth").is_file()
