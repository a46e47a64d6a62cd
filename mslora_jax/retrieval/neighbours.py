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
  ``k`` neighbours, group by group.
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
