"""The object retrieval protocol for any embedding of crops: queries are the ground-truth boxes
of the test images, the gallery is their proposals, each labelled by the box it overlaps best
(at IoU 0.3 and at 0.5); metrics with the query's own image in the gallery and without it
(``retrieval.object_metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mslora_jax.data.coco import Detections
from mslora_jax.data.crops import RegionCrops, crop_batches
from mslora_jax.retrieval.object_metrics import label_regions, object_retrieval_metrics

# crops uint8 [B, S, S, 3] -> embeddings [B, D] (unit rows)
EmbedFn = Callable[[np.ndarray], np.ndarray]
IOUS = (0.3, 0.5)


def embed_regions(
    embed: EmbedFn, detections: Detections, boxes: np.ndarray, box_image: np.ndarray, size: int,
    batch_size: int = 64,
) -> np.ndarray:  # fmt: skip
    """Unit embeddings ``[P, D]`` of every region's crop, in row order."""
    crops = RegionCrops(detections, boxes, box_image, size)
    out = []
    for batch in crop_batches(crops, batch_size):
        out.append(np.asarray(embed(batch["image"]))[batch["mask"]])
    x = np.concatenate(out).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def evaluate_objects(
    embed: EmbedFn,
    test: Detections,
    proposals: tuple[np.ndarray, np.ndarray],
    size: int,
    ious: Sequence[float] = IOUS,
) -> dict:
    """``{"iou_0.3": {"with_own_image": {...}, "without_own_image": {...}}, ...}``."""
    boxes, box_image = proposals
    queries = embed_regions(embed, test, test.boxes, test.box_image, size)
    gallery = embed_regions(embed, test, boxes, box_image, size)
    scores = queries @ gallery.T
    classes = [set(test.box_class[test.boxes_of(i)].tolist()) for i in range(test.num_images)]
    out = {}
    for iou in ious:
        labels, owners = label_regions(boxes, box_image, test, iou)
        out[f"iou_{iou}"] = {
            name: object_retrieval_metrics(
                scores,
                test.box_class,
                np.arange(len(test.boxes)),
                test.box_image,
                labels,
                owners,
                box_image,
                classes,
                exclude_own_image=exclude,
            )  # fmt: skip
            for name, exclude in (("with_own_image", False), ("without_own_image", True))
        }
    return out
