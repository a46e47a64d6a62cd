"""Retrieval metrics against slow per-query references on hand-made rankings: ties already broken
by the ranking, queries with no relevant row, truncated rankings and k beyond the database."""

from __future__ import annotations

import numpy as np
import pytest

from mslora_jax.retrieval.metrics import ranking_metrics, relevance_by_key, retrieval_metrics


def _reference(ranking, query_keys, database_keys, recall_ks=(1, 5, 10), precision_k=10):
    """Each metric of one query at a time, as the textbook writes it."""
    per_query = {f"recall@{k}": [] for k in recall_ks}
    per_query |= {"mrr": [], "map": [], "map@r": [], f"precision@{precision_k}": []}
    skipped = 0
    for row, key in zip(ranking, query_keys):
        total = sum(1 for d in database_keys if d == key)
        if total == 0:
            skipped += 1
            continue
        rel = [r >= 0 and database_keys[r] == key for r in row]
        for k in recall_ks:
            per_query[f"recall@{k}"].append(1.0 if any(rel[:k]) else 0.0)
        first = next((i + 1 for i, x in enumerate(rel) if x), None)
        per_query["mrr"].append(0.0 if first is None else 1.0 / first)
        precisions = [sum(rel[: i + 1]) / (i + 1) for i in range(len(rel))]
        per_query["map"].append(sum(p for p, x in zip(precisions, rel) if x) / total)
        per_query["map@r"].append(
            sum(p for i, (p, x) in enumerate(zip(precisions, rel)) if x and i < total) / total
        )
        per_query[f"precision@{precision_k}"].append(sum(rel[:precision_k]) / precision_k)
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in per_query.items()}
    return out | {"queries": len(query_keys) - skipped, "queries_without_relevant": skipped}


def _assert_same(got, want):
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, err_msg=key)


def test_hand_made_ranking():
    database = np.array([0, 1, 1, 2, 0, 1])  # labels of six rows
    ranking = np.array(
        [
            [1, 0, 2, 5, 3, 4],  # query label 1: relevant at ranks 1, 3, 4
            [3, 4, 0, 1, 2, 5],  # label 0: relevant at ranks 2, 3
            [0, 1, 2, 4, 5, 3],  # label 2: relevant at rank 6
            [5, 4, 3, 2, 1, 0],  # label 7: nowhere in the database
        ]
    )
    queries = np.array([1, 0, 2, 7])
    got = ranking_metrics(ranking, queries, database, recall_ks=(1, 5), precision_k=3)
    assert got["queries"] == 3 and got["queries_without_relevant"] == 1
    assert got["recall@1"] == pytest.approx(1 / 3)
    assert got["recall@5"] == pytest.approx(2 / 3)
    assert got["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 6) / 3)
    ap = [(1 + 2 / 3 + 3 / 4) / 3, (1 / 2 + 2 / 3) / 2, (1 / 6) / 1]
    assert got["map"] == pytest.approx(np.mean(ap))
    map_r = [(1 + 2 / 3) / 3, (1 / 2) / 2, 0.0]  # R = 3, 2, 1 ranks count
    assert got["map@r"] == pytest.approx(np.mean(map_r))
    assert got["precision@3"] == pytest.approx(np.mean([2 / 3, 2 / 3, 0]))
    _assert_same(got, _reference(ranking, queries, database, (1, 5), 3))


def test_random_rankings_match_the_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, q, m = rng.integers(1, 30), rng.integers(1, 12), rng.integers(1, 15)
        database = rng.integers(0, 4, size=n)
        queries = rng.integers(0, 5, size=q)  # label 4 never in the database
        ranking = np.stack([rng.permutation(n)[: min(m, n)] for _ in range(q)])
        if m > n:  # k beyond the database: empty slots
            ranking = np.concatenate([ranking, -np.ones((q, m - n), int)], axis=1)
        got = ranking_metrics(ranking, queries, database)
        _assert_same(got, _reference(ranking, queries, database))


def test_instance_keys_and_a_truncated_ranking():
    # Image -> text: each image has two captions; a top-2 ranking is scored against both.
    caption_owner = np.array([0, 0, 1, 1, 2, 2])
    ranking = np.array([[1, 2], [3, 5], [0, 1]])
    got = ranking_metrics(ranking, np.array([0, 1, 2]), caption_owner, recall_ks=(1, 2))
    assert got["recall@1"] == pytest.approx(2 / 3)
    assert got["map"] == pytest.approx(np.mean([1 / 2, 1 / 2, 0]))
    _assert_same(got, _reference(ranking, np.array([0, 1, 2]), caption_owner, (1, 2)))


def test_no_query_has_a_relevant_row():
    got = ranking_metrics(np.array([[0, 1]]), np.array([9]), np.array([0, 1]))
    assert got["queries"] == 0 and got["queries_without_relevant"] == 1
    assert np.isnan(got["map"]) and np.isnan(got["recall@1"])


def test_an_empty_database():
    empty = -np.ones((2, 3), int)
    relevance, num_relevant = relevance_by_key(empty, np.array([0, 1]), np.array([]))
    assert not relevance.any() and list(num_relevant) == [0, 0]


def test_inconsistent_inputs_are_refused():
    with pytest.raises(ValueError, match="more relevant rows"):
        retrieval_metrics(np.array([[True, True]]), np.array([1]))
    with pytest.raises(ValueError, match="ranking has shape"):
        relevance_by_key(np.array([0, 1]), np.array([0]), np.array([0, 1]))
