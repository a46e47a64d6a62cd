"""Neighbour batches: nearest neighbours by the sharded search against NumPy, the released
anchor shares, and the batch layout."""

import numpy as np
import pytest

from mslora_jax.errors import ConfigError
from mslora_jax.parallel.mesh import make_mesh
from mslora_jax.retrieval.neighbours import (
    anchor_counts,
    distillation_rows,
    kmeans_centres,
    mixed_scale_rows,
    nearest_neighbours,
    neighbour_batch,
)


def test_nearest_neighbours_match_numpy_and_start_with_the_object_itself():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = nearest_neighbours(x, 5, make_mesh(8))
    want = np.argsort(-(x @ x.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(got, want)
    assert (got[:, 0] == np.arange(50)).all()
    with pytest.raises(ConfigError, match="fewer than k=5"):
        nearest_neighbours(x[:3], 5, make_mesh(1))


def test_anchor_counts_follow_the_released_rule():
    # Shares 100*1, 100*2, 100*3, 10*100 of the mean areas: 1000 dominates, small ones get 10%.
    counts = anchor_counts([100, 100, 100, 10], [1.0, 2.0, 3.0, 100.0], 24)
    share = np.array([100, 200, 300, 1000]) / 106
    expected = [int(max(0.1, s / share.sum()) * 24) for s in share]
    expected[3] = 24 - sum(expected[:3])
    assert counts == expected and sum(counts) == 24 and min(counts) >= 2


def test_a_batch_is_anchors_followed_by_their_neighbours():
    rng = np.random.default_rng(1)
    group_rows = [np.arange(0, 10), np.arange(10, 30)]
    neighbours = [np.stack([np.arange(10), (np.arange(10) + 1) % 10], 1),
                  np.stack([np.arange(20), (np.arange(20) + 3) % 20], 1)]  # fmt: skip
    batch = neighbour_batch(rng, neighbours, group_rows, [2, 3])
    assert len(batch) == (2 + 3) * 2
    pairs = batch.reshape(-1, 2)
    assert (pairs[:2] < 10).all() and (pairs[2:] >= 10).all()
    assert ((pairs[:2, 1] - pairs[:2, 0]) % 10 == 1).all()
    assert (((pairs[2:, 1] - 10) - (pairs[2:, 0] - 10)) % 20 == 3).all()
    with pytest.raises(ConfigError, match="4 anchors from a group of 3"):
        neighbour_batch(rng, [neighbours[0][:3]], [np.arange(3)], [4])


def test_a_group_sees_a_tenth_of_each_smaller_group_as_released():
    positions = [np.arange(0, 40), np.arange(40, 60), np.arange(60, 100)]
    rows = mixed_scale_rows(positions, 2)
    # Own 40, then group 1 (20 rows: 3 from the start, 3 from the middle), then group 0 (40: 5+5).
    expected = np.concatenate([np.arange(60, 100), [40, 41, 42, 50, 51, 52],
                               [0, 1, 2, 3, 4, 20, 21, 22, 23, 24]])  # fmt: skip
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_array_equal(mixed_scale_rows(positions, 0), np.arange(40))
    np.testing.assert_array_equal(distillation_rows(positions, 1), [40, 41, 42])


def test_kmeans_centres_find_well_separated_clusters():
    rng = np.random.default_rng(0)
    truth = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    points = truth[rng.integers(0, 3, 300)] + 0.1 * rng.normal(size=(300, 2))
    centres = kmeans_centres(points, 3, seed=1)
    nearest = np.sort(np.linalg.norm(centres[:, None] - truth[None], axis=-1).min(axis=0))
    assert nearest.max() < 0.1
    with pytest.raises(ConfigError, match="fewer than 5 centres"):
        kmeans_centres(points[:4], 5)
