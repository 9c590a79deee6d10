"""Datasets of full runs: layouts accepted, errors that name the path, seeded augmentation."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from PIL import Image

from align.train import datasets
from align.train.datasets import DatasetError
from align.train.metrics import CocoBoxAP, TopKAccuracy


def _image_folders(root, classes=("cat", "dog"), per_class=2, splits=("train", "val")):
    gen = torch.Generator().manual_seed(0)
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (16, 20, 3), generator=gen, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    for kind in ("imagenet", "cifar100", "coco"):
        with pytest.raises(DatasetError, match=str(missing)) as info:
            datasets.check(kind, missing)
        assert "Expected layout" in str(info.value)
    with pytest.raises(DatasetError, match="--data"):
        datasets.check("imagenet", None)


def test_image_folders_without_val_or_with_other_classes(tmp_path):
    with pytest.raises(DatasetError, match="no val/ folder"):
        datasets.check("imagenet", _image_folders(tmp_path / "a", splits=("train",)))
    b = _image_folders(tmp_path / "b")
    (b / "val" / "dog").rename(b / "val" / "bird")
    with pytest.raises(DatasetError, match="different classes"):
        datasets.check("imagenet", b)
    c = tmp_path / "c"
    (c / "train").mkdir(parents=True)
    (c / "val").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        datasets.check("imagenet", c)


def test_image_folders_load_with_seeded_augmentation(tmp_path):
    splits = datasets.load("imagenet", _image_folders(tmp_path), image_size=8, seed=3)
    assert splits.num_classes == 2 and len(splits.train) == 4 and len(splits.val) == 4
    image, label = splits.val[0]
    assert image.shape == (3, 8, 8) and label == 0
    first = splits.train[1][0]
    assert torch.equal(first, splits.train[1][0])  # same (seed, epoch, index): same crop
    splits.train.set_epoch(1)
    assert not torch.equal(first, splits.train[1][0])
    state = torch.get_rng_state()
    splits.train[0]
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


def test_cifar_missing_files_and_foreign_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"")
    with pytest.raises(DatasetError, match="missing .*test"):
        datasets.check("cifar100", tmp_path)
    for name in ("test", "meta"):
        (folder / name).write_bytes(pickle.dumps({"not": "cifar"}))
    datasets.check("cifar100", folder)  # the layout is right (either path form)...
    with pytest.raises(DatasetError, match="not the official files"):
        datasets.load("cifar100", tmp_path, image_size=32, seed=0)  # ...the md5 is not


def test_digits_split_is_fixed_and_real():
    a = datasets.load("digits", None, image_size=32, seed=0)
    b = datasets.load("digits", None, image_size=32, seed=7)
    assert (len(a.train), len(a.val), a.num_classes) == (1437, 360, 10)
    assert torch.equal(a.val.tensors[1], b.val.tensors[1])  # the run seed never moves it
    assert a.train.tensors[0].shape[1:] == (3, 32, 32)
    assert torch.bincount(a.val.tensors[1]).min() >= 35  # stratified


def _coco(root, boxes=((10, 10, 20, 20), (30, 5, 10, 25))):
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir()
        Image.new("RGB", (64, 48), (10, 20, 30)).save(root / f"{split}2017" / "1.jpg")
        ann = {
            "images": [{"id": 1, "file_name": "1.jpg", "width": 64, "height": 48}],
            "annotations": [
                {
                    "id": i + 1,
                    "image_id": 1,
                    "category_id": 1 + i,
                    "bbox": list(b),
                    "area": b[2] * b[3],
                    "iscrowd": 0,
                }
                for i, b in enumerate(boxes)
            ],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        }
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(ann))
    return root


def test_coco_loader_and_box_ap(tmp_path):
    root = _coco(tmp_path)
    val = datasets.load_coco(root, "val")
    image, target = val[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    assert target["boxes"].tolist() == [[10, 10, 30, 30], [30, 5, 40, 30]]
    assert target["labels"].tolist() == [1, 2]

    metric = CocoBoxAP(str(root / "annotations" / "instances_val2017.json"))
    perfect = {
        "image_id": 1,
        "boxes": target["boxes"].float(),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": target["labels"],
    }
    metric.process({}, [perfect])
    assert metric.compute_metrics(metric.results)["box_ap"] == pytest.approx(100.0)
    assert metric.compute_metrics([])["box_ap"] == 0.0


def test_coco_errors_name_the_file(tmp_path):
    root = _coco(tmp_path)
    (root / "annotations" / "instances_val2017.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match="instances_val2017.json"):
        datasets.load_coco(root, "val")
    (root / "annotations" / "instances_train2017.json").unlink()
    with pytest.raises(DatasetError, match="instances_train2017.json"):
        datasets.check("coco", root)


def test_topk_accuracy():
    metric = TopKAccuracy()
    top = torch.tensor([[1, 2, 3, 4, 5], [0, 9, 8, 7, 6], [3, 1, 2, 0, 4]])
    metric.process({}, list(zip(top, torch.tensor([1, 6, 9]))))
    assert metric.compute_metrics(metric.results) == {
        "top1": pytest.approx(100 / 3),
        "top5": pytest.approx(200 / 3),
        "n": 3,
    }
