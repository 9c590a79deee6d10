"""Evaluation metrics as mmengine metrics: top-1/top-5 accuracy and COCO box AP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmengine.evaluator import BaseMetric


class TopKAccuracy(BaseMetric):
    """Top-1 and top-5 accuracy in percent, and the number of images evaluated."""

    default_prefix = "val"

    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        """Keep one (top-1 hit, top-5 hit) pair per image (mmengine gathers them by rank)."""
        for top, label in data_samples:
            self.results.append((bool(top[0] == label), bool((top == label).any())))

    def compute_metrics(self, results: list) -> dict[str, float]:
        """Percentages over every image of the val set."""
        n = len(results)
        return {
            "top1": 100.0 * sum(r[0] for r in results) / n,
            "top5": 100.0 * sum(r[1] for r in results) / n,
            "n": n,
        }


class CocoBoxAP(BaseMetric):
    """COCO box AP@[.5:.95] (percent) through pycocotools, against `ann_file`'s ground truth."""

    default_prefix = "val"

    def __init__(self, ann_file: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ann_file = ann_file

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Keep COCO-format detections: one list per image of {"image_id", "boxes" xyxy,
        "scores", "labels" (category ids)}."""
        for det in data_samples:
            image_id = int(det["image_id"])
            self.results.append(
                [
                    {
                        "image_id": image_id,
                        "category_id": int(label),
                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                        "score": float(score),
                    }
                    for (x1, y1, x2, y2), score, label in zip(
                        det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()
                    )
                ]
            )

    def compute_metrics(self, results: list) -> dict[str, float]:
        """{"box_ap": AP@[.5:.95] in percent, "box_ap50": AP@.5} (0 with no detection)."""
        import contextlib
        import io

        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        detections = [d for image in results for d in image]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
            truth = COCO(self.ann_file)
            if not detections:
                return {"box_ap": 0.0, "box_ap50": 0.0}
            evaluator = COCOeval(truth, truth.loadRes(detections), "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = [float(100.0 * s) for s in evaluator.stats[:2]]  # numpy scalars: not JSON
        return {"box_ap": stats[0], "box_ap50": stats[1]}
