"""Retrieval metrics over ranked lists: Recall@K, MRR, AP, mAP@R and Precision@K.

A search returns, for each query, database rows in ranked order. What counts as relevant is a
*key*: a database row is relevant to a query when their keys are equal. The key is the class
label for label-level retrieval (same class) and the item id for instance-level retrieval (a
caption and its own image). ``relevance_by_key`` turns a ranking into a boolean matrix; the
metrics read only that matrix and each query's total number of relevant rows, so a ranking may
be truncated (a top-k) and still be scored against everything relevant in the database.

Definitions follow the common ones (each tested against a per-query loop in
``tests/test_retrieval_metrics.py``):

- ``recall@k``: the fraction of queries with at least one relevant row in their top ``k`` (the
  hit rate that cross-modal retrieval papers report as R@K);
- ``mrr``: the mean of 1 / (rank of the first relevant row), 0 when none is ranked;
- ``map``: mean average precision over the ranking: for each query the mean, over *all* its
  relevant rows, of the precision at the rank of each (a relevant row not ranked adds 0);
- ``map@r``: Musgrave et al.'s MAP@R ("A Metric Learning Reality Check", 2020): as AP, but only
  the first R ranks count, R = the query's number of relevant rows;
- ``precision@k``: relevant rows in the top ``k``, divided by ``k`` (trec_eval's P@k; a database
  smaller than ``k`` cannot reach 1).

Every average is over the queries that have at least one relevant row in the database; the
others (a class absent from the gallery) are counted apart, never as zeros or ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_RECALL_KS = (1, 5, 10)
DEFAULT_PRECISION_K = 10


def relevance_by_key(
    ranking: np.ndarray, query_keys: np.ndarray, database_keys: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(relevance, num_relevant)`` of a ranking.

    ``ranking``: ``(queries, m)`` database row indices, best first; ``-1`` marks an empty slot
    (a database smaller than the ``k`` asked for). ``relevance[q, i]``: row ``ranking[q, i]``
    has the key of query ``q``. ``num_relevant[q]``: rows of the whole database with that key.
    """
    ranking = np.asarray(ranking)
    query_keys, database_keys = np.asarray(query_keys), np.asarray(database_keys)
    if ranking.ndim != 2 or len(ranking) != len(query_keys):
        raise ValueError(
            f"ranking has shape {ranking.shape}; expected (queries={len(query_keys)}, k)"
        )
    filled = ranking >= 0
    if len(database_keys) == 0:
        return np.zeros(ranking.shape, bool), np.zeros(len(query_keys), np.int64)
    ranked_keys = database_keys[np.where(filled, ranking, 0)]
    relevance = filled & (ranked_keys == query_keys[:, None])
    keys, counts = np.unique(database_keys, return_counts=True)
    where = np.minimum(np.searchsorted(keys, query_keys), len(keys) - 1)
    num_relevant = np.where(keys[where] == query_keys, counts[where], 0)
    return relevance, num_relevant.astype(np.int64)


def retrieval_metrics(
    relevance: np.ndarray,
    num_relevant: np.ndarray,
    recall_ks: Sequence[int] = DEFAULT_RECALL_KS,
    precision_k: int = DEFAULT_PRECISION_K,
) -> dict[str, float | int]:
    """Every metric of the module docstring, plus ``queries`` (those scored) and
    ``queries_without_relevant``. ``relevance``: ``(queries, m)`` booleans in ranked order;
    ``num_relevant``: ``(queries,)`` relevant rows in the whole database (at least the ranked
    ones). Metrics are fractions in [0, 1]; NaN when no query has a relevant row."""
    relevance = np.asarray(relevance, dtype=bool)
    num_relevant = np.asarray(num_relevant, dtype=np.int64)
    if relevance.ndim != 2 or num_relevant.shape != (len(relevance),):
        raise ValueError(
            f"relevance {relevance.shape} and num_relevant {num_relevant.shape} do not match"
        )
    ranked = relevance.sum(axis=1)
    if np.any(ranked > num_relevant):
        raise ValueError("a ranking holds more relevant rows than num_relevant says exist")
    scored = num_relevant > 0
    rel, total = relevance[scored], num_relevant[scored]
    m = rel.shape[1]
    out: dict[str, float | int] = {
        "queries": int(scored.sum()),
        "queries_without_relevant": int((~scored).sum()),
    }
    if not scored.any():
        nan = float("nan")
        out |= {f"recall@{k}": nan for k in recall_ks}
        return out | {"mrr": nan, "map": nan, "map@r": nan, f"precision@{precision_k}": nan}

    ranks = np.arange(1, m + 1)
    hits_so_far = np.cumsum(rel, axis=1)
    precision_at = hits_so_far / ranks  # precision at every rank
    for k in recall_ks:
        out[f"recall@{k}"] = float(np.mean(rel[:, :k].any(axis=1)))
    first = np.where(rel.any(axis=1), np.argmax(rel, axis=1) + 1, 0)
    out["mrr"] = float(np.mean(np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)))
    out["map"] = float(np.mean((precision_at * rel).sum(axis=1) / total))
    within_r = ranks[None, :] <= total[:, None]
    out["map@r"] = float(np.mean((precision_at * rel * within_r).sum(axis=1) / total))
    out[f"precision@{precision_k}"] = float(np.mean(rel[:, :precision_k].sum(axis=1) / precision_k))
    return out


def ranking_metrics(
    ranking: np.ndarray,
    query_keys: np.ndarray,
    database_keys: np.ndarray,
    recall_ks: Sequence[int] = DEFAULT_RECALL_KS,
    precision_k: int = DEFAULT_PRECISION_K,
) -> dict[str, float | int]:
    """``retrieval_metrics`` of a ranking (database rows, best first) under key relevance."""
    relevance, num_relevant = relevance_by_key(ranking, query_keys, database_keys)
    return retrieval_metrics(relevance, num_relevant, recall_ks, precision_k)
