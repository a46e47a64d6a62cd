"""Object retrieval metrics: a query is a ground-truth object crop; the gallery is the region
proposals of the test images, each labelled by the ground-truth box it overlaps best.

- ``label_regions``: a region takes the class (and the index) of its best-overlapping ground-truth
  box of its own image when that IoU is at least ``iou`` (0.3 or 0.5), else it is background (-1).
- ``object_retrieval_metrics`` ranks every gallery region for every query by score (ties to the
  lower region) and reports:
  - ``object_map``: AP over the full ranking, every relevant region counted (a region of the
    query's class), averaged over the queries of each class, then over classes (macro); also
    ``object_map_per_class`` and the micro mean over queries, ``object_map_micro``;
  - ``recall@1``, ``recall@5``: queries with a relevant region in their top 1 or 5;
  - ``image_map``: gallery images ranked by their best region's score, an image relevant when it
    holds a ground-truth object of the query's class; AP as above, macro over classes;
  - ``own_object@1``, ``own_object@5`` (only with the query's own image in the gallery): queries
    whose own object (a region labelled with the query's own box) is in the top 1 or 5, over the
    queries whose object some region covers (``own_object_missing`` counts the others).
  With ``exclude_own_image`` the query's image leaves the gallery: its regions are neither ranked
  nor counted as relevant.

Every AP follows ``retrieval.metrics`` (tested against per-query loops there); the wiring here is
tested against a slow loop in ``tests/test_object_metrics.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mslora_jax.data.coco import Detections
from mslora_jax.data.proposals import box_iou
from mslora_jax.retrieval.metrics import retrieval_metrics


def label_regions(
    boxes: np.ndarray, box_image: np.ndarray, truth: Detections, iou: float
) -> tuple[np.ndarray, np.ndarray]:
    """(class [P], ground-truth box index [P]) of each region; -1 for background."""
    labels = np.full(len(boxes), -1, np.int64)
    owners = np.full(len(boxes), -1, np.int64)
    for index in range(truth.num_images):
        mine, gts = np.flatnonzero(box_image == index), truth.boxes_of(index)
        if not len(mine) or not len(gts):
            continue
        overlaps = box_iou(boxes[mine], truth.boxes[gts])
        best = overlaps.argmax(axis=1)
        hit = overlaps[np.arange(len(mine)), best] >= iou
        owners[mine[hit]] = gts[best[hit]]
        labels[mine[hit]] = truth.box_class[gts[best[hit]]]
    return labels, owners


def _ranked(scores: np.ndarray, relevant: np.ndarray, allowed: np.ndarray):
    """(relevance in ranked order, relevant count) of every query over the allowed columns."""
    scores = np.where(allowed, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(relevant & allowed, order, axis=1)
    ranked &= np.isfinite(np.take_along_axis(scores, order, axis=1))
    return ranked, (relevant & allowed).sum(axis=1)


def _macro(ranked, counts, query_class, ks=(1, 5)) -> tuple[dict, dict]:
    """(metrics over all queries, AP per class)."""
    overall = retrieval_metrics(ranked, counts, recall_ks=ks)
    per_class = {}
    for c in np.unique(query_class):
        mine = query_class == c
        per_class[int(c)] = retrieval_metrics(ranked[mine], counts[mine], recall_ks=ks)["map"]
    return overall, per_class


def object_retrieval_metrics(
    scores: np.ndarray,
    query_class: np.ndarray,
    query_truth: np.ndarray,
    query_image: np.ndarray,
    region_labels: np.ndarray,
    region_truth: np.ndarray,
    region_image: np.ndarray,
    image_classes: Sequence[set[int]],
    exclude_own_image: bool = False,
) -> dict:
    """The metrics of the module docstring. ``scores`` ``[Q, P]``: query-region similarity;
    ``query_truth``: each query's ground-truth box index; ``image_classes[i]``: the classes of
    image i's ground-truth objects."""
    num_images = len(image_classes)
    allowed = np.ones(scores.shape, bool)
    if exclude_own_image:
        allowed = region_image[None, :] != query_image[:, None]
    relevant = region_labels[None, :] == query_class[:, None]
    ranked, counts = _ranked(scores, relevant, allowed)
    regions, per_class = _macro(ranked, counts, query_class)
    out = {
        "queries": int(len(query_class)),
        "object_map": float(np.nanmean(list(per_class.values()))),
        "object_map_per_class": per_class,
        "object_map_micro": regions["map"],
        "recall@1": regions["recall@1"],
        "recall@5": regions["recall@5"],
        "queries_without_relevant": regions["queries_without_relevant"],
    }
    # Images ranked by their best allowed region.
    image_scores = np.full((len(query_class), num_images), -np.inf)
    for index in range(num_images):
        columns = region_image == index
        if columns.any():
            best = np.where(allowed[:, columns], scores[:, columns], -np.inf).max(axis=1)
            image_scores[:, index] = best
    holds = np.array([[c in classes for classes in image_classes] for c in query_class])
    image_allowed = np.ones(holds.shape, bool)
    if exclude_own_image:
        image_allowed[np.arange(len(query_class)), query_image] = False
    ranked_images, image_counts = _ranked(image_scores, holds, image_allowed)
    _, image_per_class = _macro(ranked_images, image_counts, query_class)
    out["image_map"] = float(np.nanmean(list(image_per_class.values())))
    if not exclude_own_image:
        own = region_truth[None, :] == query_truth[:, None]
        ranked_own, own_counts = _ranked(scores, own, allowed)
        found = retrieval_metrics(ranked_own, own_counts, recall_ks=(1, 5))
        out["own_object@1"], out["own_object@5"] = found["recall@1"], found["recall@5"]
        out["own_object_missing"] = found["queries_without_relevant"]  # no region covers it
    return out
