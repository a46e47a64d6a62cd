"""Object retrieval metrics against a slow per-query loop, and region labelling by hand."""

import numpy as np
import pytest

from mslora_jax.data.coco import Detections
from mslora_jax.retrieval.object_metrics import label_regions, object_retrieval_metrics


def test_regions_take_the_class_of_their_best_overlapping_truth_box():
    truth = Detections(
        "t", ("a", "b"), np.array([[50, 50], [50, 50]]),
        np.array([[0, 0, 10, 10], [20, 20, 10, 10], [0, 0, 10, 10]], np.float32),
        np.array([0, 0, 1]), np.array([2, 1, 0]), ("x", "y", "z"),
    )  # fmt: skip
    regions = np.array([[0, 0, 10, 10], [22, 20, 10, 10], [40, 40, 5, 5], [0, 0, 20, 20],
                        [0, 0, 10, 10]], np.float32)  # fmt: skip
    image = np.array([0, 0, 0, 0, 1])
    labels, owners = label_regions(regions, image, truth, iou=0.3)
    # IoU 1, 0.67, 0, 0.25 (below 0.3): classes 2, 1, background, background; image 1: class 0.
    assert labels.tolist() == [2, 1, -1, -1, 0] and owners.tolist() == [0, 1, -1, -1, 2]
    labels, _ = label_regions(regions, image, truth, iou=0.7)
    assert labels.tolist() == [2, -1, -1, -1, 0]


def _ap(relevant_in_order, total):
    hits, precision_sum = 0, 0.0
    for rank, rel in enumerate(relevant_in_order, 1):
        if rel:
            hits += 1
            precision_sum += hits / rank
    return precision_sum / total


def _reference(scores, qc, qt, qi, rl, rt, ri, image_classes, exclude):
    """The definitions, one query at a time."""
    per_class, hits1, hits5, image_per_class, own1, own5 = {}, [], [], {}, [], []
    for q in range(len(qc)):
        allowed = [p for p in range(len(rl)) if not (exclude and ri[p] == qi[q])]
        order = sorted(allowed, key=lambda p: (-scores[q, p], p))
        rel = [rl[p] == qc[q] for p in order]
        if sum(rel):
            per_class.setdefault(qc[q], []).append(_ap(rel, sum(rel)))
            hits1.append(any(rel[:1]))
            hits5.append(any(rel[:5]))
        images = [i for i in range(len(image_classes)) if not (exclude and i == qi[q])]
        best = {i: max([scores[q, p] for p in allowed if ri[p] == i], default=-np.inf)
                for i in images}  # fmt: skip
        ranked = sorted(images, key=lambda i: (-best[i], i))
        image_rel = [qc[q] in image_classes[i] and np.isfinite(best[i]) for i in ranked]
        total = sum(qc[q] in image_classes[i] for i in images)
        if total:
            image_per_class.setdefault(qc[q], []).append(_ap(image_rel, total))
        own = [rt[p] == qt[q] for p in order]
        if sum(own):
            own1.append(any(own[:1]))
            own5.append(any(own[:5]))
    return {
        "object_map": np.mean([np.mean(v) for v in per_class.values()]),
        "recall@1": np.mean(hits1),
        "recall@5": np.mean(hits5),
        "image_map": np.mean([np.mean(v) for v in image_per_class.values()]),
        "own_object@1": np.mean(own1) if own1 else None,
        "own_object@5": np.mean(own5) if own5 else None,
    }


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_the_slow_loop(seed, exclude):
    rng = np.random.default_rng(seed)
    images, regions, queries = 5, 40, 12
    ri = rng.integers(0, images, regions)
    rl = rng.integers(-1, 3, regions)  # -1: background
    rt = np.where(rl >= 0, rng.integers(0, 15, regions), -1)
    qc, qi = rng.integers(0, 3, queries), rng.integers(0, images, queries)
    qt = rng.integers(0, 15, queries)
    image_classes = [set(rl[ri == i][rl[ri == i] >= 0].tolist()) for i in range(images)]
    scores = np.round(rng.normal(size=(queries, regions)), 1)  # rounded: real ties
    got = object_retrieval_metrics(scores, qc, qt, qi, rl, rt, ri, image_classes, exclude)
    want = _reference(scores, qc, qt, qi, rl, rt, ri, image_classes, exclude)
    for key in ("object_map", "recall@1", "recall@5", "image_map"):
        assert got[key] == pytest.approx(want[key]), key
    if not exclude:
        assert got["own_object@1"] == pytest.approx(want["own_object@1"])
        assert got["own_object@5"] == pytest.approx(want["own_object@5"])
    else:
        assert "own_object@1" not in got
