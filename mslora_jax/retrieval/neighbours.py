"""Positives without labels (MS-UGCML's batches): each round, every object's nearest neighbours
within its scale group, found by the sharded search, and batches of anchors with their
neighbours, the anchors shared among groups by the released rule.

- ``nearest_neighbours``: the ``k`` nearest rows of each row (itself first, as the released HNSW
  search over the group's own objects returns it), by inner product of unit embeddings (the same
  order as Euclidean distance);
- ``anchor_counts``: anchors per group, ``max(0.1, s_g / sum s)`` of them for group g, where
  ``s_g`` = the group's object count times its share of the mean box area, the largest count
  taking what rounding leaves;
- ``neighbour_batch``: a batch of ``sum(counts) * k`` object rows, each anchor followed by its
  ``k`` neighbours, group by group;
- ``mixed_scale_rows`` / ``distillation_rows``: which of a batch's rows each group's loss and the
  cross-group distillation read; ``kmeans_centres``: the distillation's fixed centres.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from mslora_jax.errors import ConfigError
from mslora_jax.retrieval.search import put_database, search


def nearest_neighbours(embeddings: np.ndarray, k: int, mesh: Mesh) -> np.ndarray:
    """``[N, k]`` row numbers of each row's ``k`` nearest rows of ``embeddings`` (unit rows),
    itself among them (first, unless it has an exact twin of lower row)."""
    if len(embeddings) < k:
        raise ConfigError(f"nearest_neighbours: {len(embeddings)} objects, fewer than k={k}")
    return search(put_database(embeddings, mesh), embeddings, k).rows


def anchor_counts(group_sizes: Sequence[int], mean_areas: Sequence[float], anchors: int) -> list:
    """Anchors per group of one batch (see the module docstring)."""
    sizes, areas = np.asarray(group_sizes, float), np.asarray(mean_areas, float)
    share = sizes * areas / areas.sum()
    counts = [int(max(0.1, s / share.sum()) * anchors) for s in share]
    largest = int(np.argmax(counts))
    counts[largest] = anchors - sum(counts) + counts[largest]
    if min(counts) < 0:
        raise ConfigError(f"anchor_counts: {anchors} anchors cannot give every group a tenth")
    return counts


def neighbour_batch(
    rng: np.random.Generator,
    neighbours: Sequence[np.ndarray],
    group_rows: Sequence[np.ndarray],
    counts: Sequence[int],
) -> np.ndarray:
    """Object rows of one batch: for each group g, ``counts[g]`` anchors drawn without
    replacement among its objects, each followed by its neighbours (``neighbours[g]``: rows of
    the group's own list ``group_rows[g]``), mapped to object rows."""
    parts = []
    for nn, rows, count in zip(neighbours, group_rows, counts, strict=True):
        if count > len(rows):
            raise ConfigError(f"neighbour_batch: {count} anchors from a group of {len(rows)}")
        anchors = rng.choice(len(rows), size=count, replace=False)
        parts.append(rows[nn[anchors]].reshape(-1))
    return np.concatenate(parts)


def mixed_scale_rows(group_positions: Sequence[np.ndarray], group: int) -> np.ndarray:
    """The batch positions group ``group``'s loss sees (MS-UGCML's mixed-scale groups): its own,
    then from each smaller group j (``group - 1`` down to 0) the first ``m_j`` of its positions
    and ``m_j`` more from the middle of them, ``m_j = min(len_j // 10 + 1, len_j // 2)``, as
    released. ``group_positions[g]``: where group g's rows sit in the batch, anchors first."""
    parts = [np.asarray(group_positions[group])]
    for j in range(group - 1, -1, -1):
        rows = np.asarray(group_positions[j])
        half = len(rows) // 2
        count = min(len(rows) // 10 + 1, half)
        parts += [rows[:count], rows[half : half + count]]
    return np.concatenate(parts).astype(np.int64)


def distillation_rows(group_positions: Sequence[np.ndarray], group: int) -> np.ndarray:
    """The positions of an earlier group whose two heads' centre distances the cross-group
    distillation compares: its first ``len // 10 + 1``, as released."""
    rows = np.asarray(group_positions[group])
    return rows[: len(rows) // 10 + 1].astype(np.int64)


def kmeans_centres(features: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` k-means centres of ``features`` (SciPy's ``kmeans2``, k-means++ seeding), the
    fixed centres of the cross-group distillation."""
    from scipy.cluster.vq import kmeans2

    features = np.asarray(features, np.float64)
    if len(features) < count:
        raise ConfigError(f"kmeans_centres: {len(features)} features, fewer than {count} centres")
    centres, _ = kmeans2(features, count, minit="++", seed=seed)
    return centres.astype(np.float32)
