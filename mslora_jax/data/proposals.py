"""Class-agnostic region proposals as data: boxes that may hold an object, read from no label.

The built-in proposer segments an image with scikit-image's graph-based method (Felzenszwalb and
Huttenlocher) at several scales, takes the box of every segment, drops boxes too small or nearly
the whole image, and keeps the best by non-maximum suppression, scored by how much of its box a
segment fills (a compact segment is more object-like than a sprawling one). It reads pixels only:
never a label or a ground-truth box. Boxes produced elsewhere, in particular by SAM's automatic
mask generator saved as COCO-style results (``[{"image_id", "bbox", "score"}, ...]``), are read
with ``read_proposals`` and used unchanged.

Boxes are ``[x, y, w, h]`` float32 pixels, as in COCO.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.measure import regionprops
from skimage.segmentation import felzenszwalb
from skimage.transform import rescale

from mslora_jax.data.coco import Detections
from mslora_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class ProposerConfig:
    """The built-in proposer's settings (scales: Felzenszwalb's ``scale``, larger = coarser)."""

    scales: tuple[float, ...] = (30.0, 100.0, 300.0)
    sigma: float = 0.8
    min_side: int = 4  # pixels; smaller boxes are dropped
    max_area_fraction: float = 0.8  # boxes covering more of the image are background
    nms_iou: float = 0.7
    max_per_image: int = 200
    # Segment a copy at most this many pixels on its long side (0: as is); boxes are mapped back.
    # Faster on large images, and it merges fewer touching objects at the same scale.
    max_side: int = 0


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[N, M]`` of ``[x, y, w, h]`` boxes ``a`` ``[N, 4]`` and ``b`` ``[M, 4]``."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
    y2 = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, limit: int) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first (ties: lower index)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    overlaps = box_iou(boxes, boxes)
    kept: list[int] = []
    suppressed = np.zeros(len(boxes), bool)
    for i in order:
        if suppressed[i]:
            continue
        kept.append(int(i))
        if len(kept) == limit:
            break
        suppressed |= overlaps[i] > iou
    return np.asarray(kept, np.int64)


def propose(image: np.ndarray, config: ProposerConfig = ProposerConfig()) -> np.ndarray:
    """Proposal boxes ``[P, 4]`` of one uint8 ``[H, W, 3]`` image, best first."""
    factor = 1.0
    if config.max_side and max(image.shape[:2]) > config.max_side:
        factor = config.max_side / max(image.shape[:2])
        small = rescale(image, factor, channel_axis=-1, anti_aliasing=True, preserve_range=True)
        image = np.clip(np.round(small), 0, 255).astype(np.uint8)
    height, width = image.shape[:2]
    min_side = config.min_side * factor  # in the segmented copy's pixels
    boxes, scores = [], []
    for scale in config.scales:
        segments = felzenszwalb(image, scale=scale, sigma=config.sigma,
                                min_size=max(int(min_side) ** 2, 4))  # fmt: skip
        for region in regionprops(segments + 1):
            y0, x0, y1, x1 = region.bbox
            w, h = x1 - x0, y1 - y0
            if min(w, h) < min_side or w * h > config.max_area_fraction * width * height:
                continue
            boxes.append((x0 / factor, y0 / factor, w / factor, h / factor))
            scores.append(region.area / (w * h))  # how much of its box the segment fills
    if not boxes:
        return np.zeros((0, 4), np.float32)
    boxes = np.asarray(boxes, np.float32)
    kept = nms(boxes, np.asarray(scores), config.nms_iou, config.max_per_image)
    return boxes[kept]


def propose_all(detections: Detections, config: ProposerConfig = ProposerConfig()):
    """Proposals of every image: ``(boxes [P, 4], image index [P])``."""
    boxes, images = [], []
    for index in range(detections.num_images):
        found = propose(detections.image(index), config)
        boxes.append(found)
        images.append(np.full(len(found), index, np.int64))
    return np.concatenate(boxes), np.concatenate(images)


def read_proposals(path: str | os.PathLike, detections: Detections):
    """Proposals saved as COCO-style results (a JSON list of ``{"image_id", "bbox"[, "score"]}``;
    what SAM's automatic mask generator gives, saved per mask): ``(boxes, image index)`` in the
    file's order within each image, best score first. Boxes are clipped to their image."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a JSON file ({e})") from e
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of {{image_id, bbox, score}} records")
    boxes, images, scores = [], [], []
    for i, record in enumerate(records):
        where = f"{path}: [{i}]"
        if not isinstance(record, dict) or "image_id" not in record or "bbox" not in record:
            raise DataError(f"{where}: expected an object with 'image_id' and 'bbox'")
        box = record["bbox"]
        if not (isinstance(box, list) and len(box) == 4):
            raise DataError(f"{where}: bbox must be [x, y, width, height], got {box!r}")
        index = detections.index_of(record["image_id"])
        height, width = detections.sizes[index]
        x, y, w, h = (float(v) for v in box)
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(width), x + w), min(float(height), y + h)
        if x1 <= x0 or y1 <= y0:
            raise DataError(f"{where}: bbox {box} has no area inside its {width}x{height} image")
        boxes.append((x0, y0, x1 - x0, y1 - y0))
        images.append(index)
        scores.append(float(record.get("score", 0.0)))
    if not boxes:
        raise DataError(f"{path}: holds no proposals")
    images, scores = np.asarray(images, np.int64), np.asarray(scores)
    order = np.lexsort((-scores, images))  # by image, then best score first
    return np.asarray(boxes, np.float32)[order], images[order]


def proposal_recall(
    boxes: np.ndarray, box_image: np.ndarray, detections: Detections, ious: Sequence[float]
) -> dict[str, float]:
    """The fraction of ground-truth boxes that some proposal of their image overlaps with IoU
    at least each of ``ious``: ``{"recall@0.5": ..., ...}``."""
    best = np.zeros(len(detections.boxes))
    for index in range(detections.num_images):
        truth = detections.boxes_of(index)
        mine = boxes[box_image == index]
        if len(truth) and len(mine):
            best[truth] = box_iou(detections.boxes[truth], mine).max(axis=1)
    return {f"recall@{t}": float(np.mean(best >= t)) if len(best) else float("nan") for t in ious}
