"""Datasets for full runs: ImageNet-style folders, CIFAR-100, COCO and scikit-learn's digits.

Nothing downloads: a missing or malformed dataset is a DatasetError naming the path and
the layout expected. Random augmentation runs under a torch seed fixed by (seed, epoch,
index), so a run resumed from a checkpoint sees exactly the images an uninterrupted run
would, whatever the number of data-loader processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from align.errors import AlignError, require_extra

__all__ = [
    "DatasetError",
    "Splits",
    "Augmented",
    "check",
    "load",
    "load_coco",
    "load_detection",
    "collate_lists",
    "KINDS",
]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# mmcls configs/_base_/datasets/cifar100_bs16.py (there in 0-255 units)
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
DIGITS_SPLIT_SEED = 0  # the val set is the same for every run seed: figures stay comparable
DIGITS_VAL_FRACTION = 0.2

_LAYOUTS = {
    "imagenet": "PATH/train/<class>/<image> and PATH/val/<class>/<image>, the same class "
    "folders in both (the ImageNet-2012 layout of the seed documents)",
    "cifar100": "PATH/cifar-100-python/{train,test,meta}: the official CIFAR-100 python "
    "version, as extracted from cifar-100-python.tar.gz",
    "coco": "PATH/annotations/instances_{train,val}2017.json and PATH/{train,val}2017/<image>",
    "digits": "nothing: scikit-learn ships the images",
}
KINDS = tuple(_LAYOUTS)


class DatasetError(AlignError):
    """A dataset that is missing or not laid out as expected."""


@dataclass(frozen=True)
class Splits:
    """The train and val sets of one dataset, with what the training needs to know."""

    train: Dataset
    val: Dataset
    num_classes: int
    loader_workers: int  # data-loader processes worth running per rank (0: in memory)
    annotations: Path | None = None  # COCO ground truth of `val` (detection: for box AP)


class Augmented(Dataset):
    """`dataset` with `transform` applied under a torch seed fixed by (seed, epoch, index).

    `joint`: the transform takes and returns (image, target), as detection's must, since
    a flip or a crop moves the boxes with the image; else it takes the image alone.
    """

    def __init__(
        self, dataset: Dataset, transform: Callable[..., Any], seed: int, *, joint: bool = False
    ) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0
        self.joint = joint

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentation draws come next."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, label = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**63)
            return self.transform(image, label) if self.joint else (self.transform(image), label)


def _error(kind: str, path: Path | None, problem: str) -> DatasetError:
    where = f" at {path}" if path is not None else ""
    return DatasetError(
        f"{kind} dataset{where}: {problem}. Expected layout: {_LAYOUTS[kind]}. "
        "align.run downloads nothing: pass --data PATH to a local copy."
    )


def check(kind: str, root: str | os.PathLike[str] | None) -> None:
    """Raise DatasetError unless `root` holds a `kind` dataset (layout only: cheap)."""
    if kind not in _LAYOUTS:
        raise AlignError(f"unknown dataset kind {kind!r}; known: {', '.join(KINDS)}")
    if kind == "digits":
        return
    if root is None:
        raise _error(kind, None, "no path given (--data PATH)")
    path = Path(root)
    if not path.is_dir():
        raise _error(kind, path, "no such directory")
    {"imagenet": _check_folders, "cifar100": _cifar_root, "coco": _check_coco}[kind](path)


def load(kind: str, root: str | os.PathLike[str] | None, image_size: int, seed: int) -> Splits:
    """The train/val splits of a classification dataset, transformed for `image_size`."""
    check(kind, root)
    if kind == "digits":
        return _digits(image_size)
    if kind == "coco":
        raise AlignError("COCO is a detection dataset: use load_detection() for its splits")
    return {"imagenet": _image_folders, "cifar100": _cifar100}[kind](Path(root), image_size, seed)


# ----------------------------------------------------------------------------- image folders
def _class_dirs(kind: str, split: Path) -> list[str]:
    if not split.is_dir():
        raise _error(kind, split.parent, f"no {split.name}/ folder")
    classes = sorted(d.name for d in split.iterdir() if d.is_dir())
    if not classes:
        raise _error(kind, split, "no class folders")
    return classes


def _check_folders(root: Path) -> None:
    train, val = _class_dirs("imagenet", root / "train"), _class_dirs("imagenet", root / "val")
    if train != val:
        only = sorted(set(train) ^ set(val))[:5]
        raise _error("imagenet", root, f"train/ and val/ have different classes (e.g. {only})")


def _image_folders(root: Path, image_size: int, seed: int) -> Splits:
    from torchvision import datasets
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *normalize])
    # The usual 0.875 centre crop: resize the short side to size / 0.875, crop size.
    val_tf = T.Compose([T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), *normalize])
    try:
        train = datasets.ImageFolder(str(root / "train"))
        val = datasets.ImageFolder(str(root / "val"), transform=val_tf)
    except (FileNotFoundError, OSError) as e:
        raise _error("imagenet", root, str(e)) from None
    return Splits(Augmented(train, train_tf, seed), val, len(train.classes), _loader_workers())


def _loader_workers() -> int:
    return min(8, max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


# ----------------------------------------------------------------------------------- CIFAR
def _cifar_root(path: Path) -> Path:
    """The torchvision root for CIFAR-100 at `path` (its parent or the folder itself)."""
    root = path.parent if path.name == "cifar-100-python" else path
    folder = root / "cifar-100-python"
    missing = [f for f in ("train", "test", "meta") if not (folder / f).is_file()]
    if missing:
        raise _error("cifar100", path, f"missing {', '.join(str(folder / f) for f in missing)}")
    return root


def _cifar100(path: Path, image_size: int, seed: int) -> Splits:
    from torchvision import datasets
    from torchvision import transforms as T

    root = _cifar_root(path)
    resize = [T.Resize(image_size)] if image_size != 32 else []
    normalize = [*resize, T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalize])
    try:
        # torchvision checks the files' md5 against the official archive before it
        # unpickles them, so only the genuine CIFAR-100 pickles are ever loaded.
        train = datasets.CIFAR100(str(root), train=True, download=False)
        val = datasets.CIFAR100(
            str(root), train=False, download=False, transform=T.Compose(normalize)
        )
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise _error(
            "cifar100", root / "cifar-100-python", f"not the official files ({e})"
        ) from None
    return Splits(Augmented(train, train_tf, seed), val, 100, _loader_workers())


# ---------------------------------------------------------------------------------- digits
def _digits(image_size: int) -> Splits:
    """scikit-learn's 8x8 digits (1797 real scans), upsampled to RGB `image_size` pixels."""
    import torch.nn.functional as F

    require_extra("sklearn", "run", "the digits dataset (scikit-learn's)")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(
        range(len(labels)),
        test_size=DIGITS_VAL_FRACTION,
        stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    train_idx, val_idx = torch.tensor(train_idx), torch.tensor(val_idx)
    return Splits(
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[val_idx], labels[val_idx]),
        num_classes=10,
        loader_workers=0,
    )


# ------------------------------------------------------------------------------------ COCO
def _coco_paths(root: Path, split: str) -> tuple[Path, Path]:
    return root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"


def _check_coco(root: Path) -> None:
    for split in ("train", "val"):
        images, annotations = _coco_paths(root, split)
        if not images.is_dir():
            raise _error("coco", root, f"no {images.name}/ image folder")
        if not annotations.is_file():
            raise _error("coco", root, f"no {annotations.relative_to(root)}")


def load_coco(
    root: str | os.PathLike[str],
    split: str = "val",
    *,
    target_keys: tuple[str, ...] = ("boxes", "labels", "image_id"),
) -> Dataset:
    """A COCO split as (image tensor, {"boxes" xyxy, "labels", "image_id"}) pairs."""
    from torchvision import datasets
    from torchvision.transforms import v2 as T

    check("coco", root)
    images, annotations = _coco_paths(Path(root), split)
    try:
        data = json.loads(annotations.read_text())
        if not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
            raise ValueError("needs lists 'images', 'annotations' and 'categories'")
    except (ValueError, OSError) as e:
        raise _error("coco", annotations, f"not a COCO instances file ({e})") from None
    transform = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)])
    coco = datasets.CocoDetection(str(images), str(annotations), transforms=transform)
    return datasets.wrap_dataset_for_transforms_v2(coco, target_keys=target_keys)


DETECTION_AUGMENTS = ("flip", "ssd")


def load_detection(
    root: str | os.PathLike[str] | None,
    seed: int,
    *,
    augment: str = "flip",
    fill: tuple[float, ...] = (0.0, 0.0, 0.0),
    repeat: int = 1,
) -> Splits:
    """COCO train2017 / val2017 for a torchvision detector: images in [0, 1], xyxy boxes,
    COCO category ids as labels. The detector resizes and normalizes them itself.

    Training follows mmdet's pipelines: crowd boxes and the images left without a box
    are dropped (filter_empty_gt); "flip" is RandomFlip 0.5 (the FPN detectors' configs);
    "ssd" puts PhotoMetricDistortion, Expand (filled with `fill`, the model's mean) and
    MinIoURandomCrop before the flip, as the SSD configs do; `repeat` is RepeatDataset.
    """
    from torch.utils.data import ConcatDataset, Subset

    if augment not in DETECTION_AUGMENTS:
        raise AlignError(
            f"unknown augmentation {augment!r}; known: {', '.join(DETECTION_AUGMENTS)}"
        )
    check("coco", root)
    train = load_coco(root, "train", target_keys=("boxes", "labels", "image_id", "iscrowd"))
    usable = [i for i, image_id in enumerate(train.ids) if _has_box(train.coco, image_id)]
    if not usable:
        raise _error("coco", _coco_paths(Path(root), "train")[1], "no image has a non-crowd box")
    train_set: Dataset = Subset(train, usable)
    if repeat > 1:
        train_set = ConcatDataset([train_set] * repeat)
    return Splits(
        Augmented(train_set, _detection_transform(augment, fill), seed, joint=True),
        load_coco(root, "val"),
        num_classes=1 + max(train.coco.getCatIds(), default=0),
        loader_workers=_loader_workers(),
        annotations=_coco_paths(Path(root), "val")[1],
    )


def _has_box(coco: Any, image_id: int) -> bool:
    """Whether the image has a non-crowd box of at least a pixel on each side."""
    return any(
        not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1
        for a in coco.imgToAnns[image_id]
    )


def _detection_transform(augment: str, fill: tuple[float, ...]) -> Callable[..., Any]:
    from torchvision import tv_tensors
    from torchvision.transforms import v2 as T

    steps: list[Callable[..., Any]] = [_drop_crowd]
    if augment == "ssd":
        steps += [
            T.RandomPhotometricDistort(p=0.5),
            T.RandomZoomOut(fill={tv_tensors.Image: tuple(fill), "others": 0}, side_range=(1, 4)),
            T.RandomIoUCrop(),  # mmdet's min_ious (0.1 .. 0.9) and min_crop_size 0.3
        ]
    steps += [T.RandomHorizontalFlip(0.5), T.SanitizeBoundingBoxes(min_size=1.0), _plain]
    return T.Compose(steps)


def _drop_crowd(image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Leave out crowd boxes: mmdet ignores them in training, torchvision's detectors
    would learn them as objects."""
    from torchvision import tv_tensors

    keep = ~torch.tensor(target.pop("iscrowd"), dtype=torch.bool)
    boxes = tv_tensors.wrap(target["boxes"][keep], like=target["boxes"])
    return image, {**target, "boxes": boxes, "labels": target["labels"][keep]}


def _plain(image: Any, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Plain tensors for the detector (tv_tensors only matter to the transforms)."""
    plain = {k: v.as_subclass(torch.Tensor) if torch.is_tensor(v) else v for k, v in target.items()}
    return image.as_subclass(torch.Tensor), plain


def collate_lists(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """(images, targets) as two lists: torchvision detectors take images of any size."""
    images, targets = zip(*batch)
    return list(images), list(targets)
