"""Sharded top-k search: 8 simulated devices equal one device equal a NumPy stable argsort, ties
included. Integer-valued embeddings make every inner product exact in float32 (and bf16), so
equal scores are truly equal on every backend and tie-breaking is tested, not hoped for."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mslora_jax.errors import ConfigError
from mslora_jax.parallel.mesh import make_mesh
from mslora_jax.retrieval import search as search_lib
from mslora_jax.retrieval.search import put_database, search


def _integer_data(rows: int, queries: int, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    db = rng.integers(-2, 3, size=(rows, dim)).astype(np.float32)
    q = rng.integers(-2, 3, size=(queries, dim)).astype(np.float32)
    return db, q


def _reference(db, q, k):
    """Stable argsort of the negated exact scores: equal scores keep the lower row first."""
    scores = q.astype(np.float64) @ db.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    pad = k - order.shape[1]
    if pad > 0:
        order = np.concatenate([order, -np.ones((len(q), pad), int)], axis=1)
        top = np.concatenate([top, np.full((len(q), pad), -np.inf)], axis=1)
    return top, order


@pytest.fixture(scope="module")
def meshes():
    assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
    return {
        "1 device": make_mesh(1),
        "8 devices": make_mesh(8),
        "2x4 devices": make_mesh(8, (2, 4, 1)),  # rows split over two mesh axes
    }


@pytest.mark.parametrize("mesh_name", ["1 device", "8 devices", "2x4 devices"])
def test_sharded_search_equals_numpy_with_ties(meshes, mesh_name):
    db, q = _integer_data(rows=203, queries=37)  # 203 rows: uneven shards, padded blocks
    want_scores, want_rows = _reference(db, q, k=10)
    assert (np.diff(want_scores, axis=1) == 0).any(), "the data must hold ties"
    database = put_database(db, meshes[mesh_name], block_rows=8)  # several blocks per shard
    got = search(database, q, k=10, query_chunk=16)  # 3 chunks, the last one padded
    np.testing.assert_array_equal(got.rows, want_rows)
    np.testing.assert_array_equal(got.scores, want_scores.astype(np.float32))


def test_k_beyond_the_database(meshes):
    db, q = _integer_data(rows=5, queries=3)
    got = search(put_database(db, meshes["8 devices"]), q, k=8)
    want_scores, want_rows = _reference(db, q, k=8)
    np.testing.assert_array_equal(got.rows, want_rows)
    assert (got.rows[:, 5:] == -1).all() and np.isneginf(got.scores[:, 5:]).all()
    np.testing.assert_array_equal(got.scores[:, :5], want_scores[:, :5])


def test_bf16_storage_gives_the_same_top_k(meshes):
    db, q = _integer_data(rows=150, queries=9)  # small integers are exact in bf16
    f32 = put_database(db, meshes["8 devices"])
    bf16 = put_database(db, meshes["8 devices"], dtype=np.dtype("bfloat16"))
    assert bf16.rows.nbytes * 2 == f32.rows.nbytes
    a, b = search(f32, q, k=10), search(bf16, q, k=10)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_approximate_search_recall_is_measured(meshes):
    rng = np.random.default_rng(1)
    db = rng.normal(size=(1000, 16)).astype(np.float32)
    q = rng.normal(size=(20, 16)).astype(np.float32)
    database = put_database(db, meshes["8 devices"], block_rows=64)
    exact = search(database, q, k=10)
    approx = search(database, q, k=10, approximate=True, recall_target=0.9)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.rows, exact.rows)])
    # On CPU approx_max_k falls back to an exact top-k; on TPU recall is near the target.
    assert recall >= 0.9
    assert ((approx.rows >= 0) & (approx.rows < 1000)).all()


def test_query_counts_share_compilations(meshes):
    db, _ = _integer_data(rows=64, queries=1)
    database = put_database(db, meshes["8 devices"])
    search(database, _integer_data(64, 5, seed=1)[1], k=3, query_chunk=4)
    before = search_lib._search_chunk._cache_size()
    for count in (3, 7, 9, 13):  # all in chunks of 4, the last one padded
        search(database, _integer_data(64, count, seed=count)[1], k=3, query_chunk=4)
    assert search_lib._search_chunk._cache_size() == before


def test_bad_queries_are_refused(meshes):
    database = put_database(np.eye(4, dtype=np.float32), meshes["1 device"])
    with pytest.raises(ConfigError, match=r"queries must be \(count, 4\)"):
        search(database, np.ones((2, 3)), k=1)
    with pytest.raises(ConfigError, match="k must be at least 1"):
        search(database, np.ones((2, 4)), k=0)
    with pytest.raises(ConfigError, match="recall_target"):
        search(database, np.ones((2, 4)), k=1, approximate=True, recall_target=0.0)
    with pytest.raises(ConfigError, match="must be \\(rows, dim\\)"):
        put_database(np.ones(4), meshes["1 device"])


def test_merged_parts_equal_one_search_of_the_whole_database(meshes):
    # Two parts of one database (rows interleaved), searched apart and merged: the answer of a
    # search of the whole, ties to the lower row included.
    db, q = _integer_data(40, 6)
    parts = [np.arange(0, 40, 3), np.setdiff1d(np.arange(40), np.arange(0, 40, 3))]
    mesh = meshes["1 device"]
    found = [search(put_database(db[rows], mesh), q, k=7) for rows in parts]
    merged = search_lib.merge_results(found, parts, k=7)
    top, order = _reference(db, q, 7)
    np.testing.assert_array_equal(merged.rows, order)
    np.testing.assert_allclose(merged.scores, top)
    # k beyond every part: padded as search pads.
    wide = search_lib.merge_results(found, parts, k=45)
    assert (wide.rows[:, 40:] == -1).all() and np.isneginf(wide.scores[:, 40:]).all()
