"""Top-k inner-product search over a database sharded across a device mesh.

The database's rows are split over every device of the mesh (row-major over its axes). Each
device scores the queries against its rows block by block, keeping a running top-k, inside
``shard_map``: ``lax.top_k`` and ``lax.approx_max_k`` cannot reduce over a sharded axis, so each
shard returns its own k best with their global row numbers and a final top-k merges the
``shards x k`` candidates (the pattern of JAX's ``approx_max_k`` documentation). Memory stays
bounded: a device holds one ``(query_chunk, block_rows)`` score block at a time, and queries go
through in chunks of a power-of-two size (a few compilations for any number of queries).

Ties: equal scores rank the lower database row first, on one device or many (``lax.top_k``
puts the lower index first; candidates are merged in row order), as a stable NumPy argsort of
the negated scores does. Rows past the database's size (padding) never appear; a database with
fewer than ``k`` rows fills the rest of each ranking with row ``-1`` and score ``-inf``.

Multi-host: every process passes the same database to ``put_database`` (each places only its
own devices' shards) and the same queries to ``search``, and every process gets the same global
answer. A process can embed only its share of the items and all-gather the shares first
(``jax.experimental.multihost_utils.process_allgather``; ``tests/test_multihost_search.py``).

``approximate=True`` uses ``lax.approx_max_k`` with ``recall_target`` and the global database size
as ``reduction_input_size_override``: the TPU-optimised partial reduction on TPU, an exact top-k on
CPU and GPU. Its recall against exact search is measured, never assumed
(``experiments/bench_search.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mslora_jax.errors import ConfigError

DEFAULT_QUERY_CHUNK = 256
DEFAULT_BLOCK_ROWS = 65536


@dataclasses.dataclass(frozen=True)
class ShardedDatabase:
    """Database embeddings on a mesh: ``rows`` (padded to whole blocks on every device, split
    over all mesh axes) of which the first ``size`` are real."""

    rows: jax.Array
    size: int
    block_rows: int
    mesh: Mesh

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """``rows[q, i]``: the database row ranked ``i``-th for query ``q`` (``-1``: none), with its
    inner product ``scores[q, i]`` (``-inf`` for none)."""

    scores: np.ndarray
    rows: np.ndarray


def _shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape.values())


def put_database(
    embeddings: np.ndarray | jax.Array,
    mesh: Mesh,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    dtype=None,
) -> ShardedDatabase:
    """Place ``(n, d)`` embeddings on ``mesh``, rows split over every device (``dtype``, e.g.
    ``jnp.bfloat16``, halves the memory of float32). Each device's share is padded to a whole
    number of equal blocks of at most ``block_rows`` rows."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ConfigError(f"database embeddings must be (rows, dim), got shape {embeddings.shape}")
    n, dim = embeddings.shape
    shards = _shards(mesh)
    per_shard = max(1, -(-n // shards))
    # Equal blocks of at most block_rows: padding stays under one row per block (a fixed block
    # size would pad 100,000 rows to 131,072 and score the padding too).
    num_blocks = -(-per_shard // max(1, block_rows))
    block = -(-per_shard // num_blocks)
    per_shard = num_blocks * block
    padded = np.zeros((per_shard * shards, dim), np.dtype(dtype or embeddings.dtype))
    padded[:n] = embeddings  # on the host: device memory holds only each device's share
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    return ShardedDatabase(jax.device_put(padded, sharding), int(n), block, mesh)


def _local_top_k(scores, k, approximate, recall_target, total):
    if approximate:
        return jax.lax.approx_max_k(
            scores, k, recall_target=recall_target, reduction_input_size_override=total
        )
    return jax.lax.top_k(scores, k)


@functools.partial(
    jax.jit, static_argnames=("mesh", "k", "size", "block", "approximate", "recall_target")
)
def _search_chunk(queries, rows, *, mesh, k, size, block, approximate, recall_target):
    axes = tuple(mesh.axis_names)

    def local(q, shard_rows):
        shard_size = shard_rows.shape[0]
        first_row = jax.lax.axis_index(axes) * shard_size
        kb = min(k, block)

        def one_block(block_index, best):
            # A slice of the shard in place: a reshape into [blocks, block, dim] scanned over
            # made the TPU compiler copy the whole shard (twice its size in temporaries, as
            # experiments/aot_search_memory.py measured).
            block_rows = jax.lax.dynamic_slice_in_dim(shard_rows, block_index * block, block)
            scores = jnp.dot(
                q.astype(block_rows.dtype), block_rows.T, preferred_element_type=jnp.float32
            )
            row = first_row + block_index * block + jnp.arange(block)
            scores = jnp.where(row < size, scores, -jnp.inf)
            values, where = _local_top_k(scores, kb, approximate, recall_target, size)
            # The running best come first: on equal scores the lower rows (earlier blocks) win.
            values = jnp.concatenate([best[0], values], axis=1)
            found = jnp.concatenate([best[1], row[where]], axis=1)
            values, pick = jax.lax.top_k(values, k)
            return values, jnp.take_along_axis(found, pick, axis=1)

        init = (
            jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
            jnp.full((q.shape[0], k), -1, jnp.int32),
        )
        init = jax.lax.pcast(init, axes, to="varying")  # each shard's own running best
        return jax.lax.fori_loop(0, shard_size // block, one_block, init)

    values, found = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(axes)), out_specs=(P(None, axes), P(None, axes))
    )(queries, rows)
    # The merge, on every device (the candidates are small): shard candidates sit in shard
    # order, so ties again go to the lower rows; the answer is replicated, so every process
    # reads the same global top-k.
    everywhere = NamedSharding(mesh, P())
    values = jax.lax.with_sharding_constraint(values, everywhere)
    found = jax.lax.with_sharding_constraint(found, everywhere)
    values, pick = jax.lax.top_k(values, k)
    found = jnp.take_along_axis(found, pick, axis=1)
    return values, jnp.where(jnp.isfinite(values), found, -1)


def search(
    database: ShardedDatabase,
    queries: np.ndarray,
    k: int,
    *,
    approximate: bool = False,
    recall_target: float = 0.95,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> SearchResult:
    """The ``k`` database rows of largest inner product with each of ``queries`` (``(q, d)``),
    best first; on every process the same global answer."""
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != database.dim:
        raise ConfigError(
            f"queries must be (count, {database.dim}) to search this database, got {queries.shape}"
        )
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if not 0.0 < recall_target <= 1.0:
        raise ConfigError(f"recall_target must be in (0, 1], got {recall_target}")
    count = len(queries)
    # Chunks of a power-of-two size up to query_chunk: a handful of compilations serve every
    # number of queries, and one query does not pay for query_chunk of them.
    chunk = min(max(1, query_chunk), 1 << max(0, count - 1).bit_length())
    replicated = NamedSharding(database.mesh, P())
    scores, rows = [], []
    for start in range(0, count, chunk):
        part = queries[start : start + chunk]
        padded = np.zeros((chunk, queries.shape[1]), np.float32)
        padded[: len(part)] = part
        values, found = _search_chunk(
            jax.device_put(padded, replicated),
            database.rows,
            mesh=database.mesh,
            k=k,
            size=database.size,
            block=database.block_rows,
            approximate=approximate,
            recall_target=float(recall_target),
        )
        values, found = jax.device_get((values, found))
        scores.append(values[: len(part)])
        rows.append(found[: len(part)])
    if not scores:
        return SearchResult(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
    return SearchResult(np.concatenate(scores), np.concatenate(rows).astype(np.int64))


def merge_results(parts: list[SearchResult], row_maps: list[np.ndarray], k: int) -> SearchResult:
    """The global top-``k`` of several searches, each over its own rows of one database:
    ``row_maps[i][r]`` is the database row of row ``r`` of part ``i``. Scores compare across
    parts (a versioned index: each part searched with the query its own encoder embedded);
    ties go to the lower database row, as in ``search``."""
    if not parts:
        raise ConfigError("merge_results needs at least one search result")
    scores = np.concatenate([p.scores for p in parts], axis=1)
    rows = np.concatenate(
        [
            np.where(p.rows >= 0, m[np.maximum(p.rows, 0)], -1)
            for p, m in zip(parts, row_maps, strict=True)
        ],
        axis=1,
    )
    # Sort by score, then row: lexsort's last key is the primary one.
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
    scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    if scores.shape[1] < k:  # fewer candidates than k: fill as search does
        fill = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, fill)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, fill)), constant_values=-1)
    return SearchResult(scores.astype(np.float32), rows.astype(np.int64))
