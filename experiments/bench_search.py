"""Benchmark: exact top-k search (``mslora_jax.retrieval.search``) against FAISS ``IndexFlatIP``
and against the bare jitted matmul + top-k, on the same data in the same run.

    python experiments/bench_search.py [--sizes 10000,100000,1000000] [--devices 1,8] \
        [--dim 512] [--queries 256] [--k 10] [--repeats 3] [--json]

For each database size and device count: queries per second of ``search`` (float32 storage),
of FAISS ``IndexFlatIP`` (faiss-cpu, the ``bench`` extra; skipped if absent) and of
``jax.jit(lambda q, db: lax.top_k(q @ db.T, k))`` on one device (the limit: search is that
matmul plus a top-k), the top-k's overhead over that limit, whether search and FAISS return the
same top-k, bf16 storage's memory and its top-k overlap with float32, and approximate search's
recall against exact. Each timing is the best of ``--repeats`` runs after a warm-up (which
compiles). Asserts nothing; ``--json`` prints one JSON object per size and device count.
Simulated devices share the host's cores: 8 of them show that sharding and the merge work and
what they cost, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--devices", default="1,8")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block_rows", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


ARGS = _args()
DEVICE_COUNTS = [int(x) for x in ARGS.devices.split(",")]
# Simulated CPU devices must be requested before JAX is imported.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={max(DEVICE_COUNTS)}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mslora_jax.parallel.mesh import make_mesh  # noqa: E402
from mslora_jax.retrieval.search import DEFAULT_BLOCK_ROWS, put_database, search  # noqa: E402

try:
    import faiss
except ImportError:  # the bench extra is optional
    faiss = None


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def unit_rows(rng, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def main() -> None:
    rng = np.random.default_rng(0)
    queries = unit_rows(rng, ARGS.queries, ARGS.dim)
    block = ARGS.block_rows or DEFAULT_BLOCK_ROWS
    bare = jax.jit(lambda q, db: jax.lax.top_k(q @ db.T, ARGS.k))
    for size in (int(s) for s in ARGS.sizes.split(",")):
        db = unit_rows(rng, size, ARGS.dim)
        db_on_device, q_on_device = jax.device_put(db), jax.device_put(queries)
        matmul_s = best_seconds(
            lambda d=db_on_device, q=q_on_device: jax.block_until_ready(bare(q, d)), ARGS.repeats
        )
        del db_on_device
        faiss_s, faiss_rows = None, None
        if faiss is not None:
            index = faiss.IndexFlatIP(ARGS.dim)
            index.add(db)
            faiss_s = best_seconds(lambda i=index: i.search(queries, ARGS.k), ARGS.repeats)
            faiss_rows = index.search(queries, ARGS.k)[1]
            del index
        for devices in DEVICE_COUNTS:
            mesh = make_mesh(devices)
            database = put_database(db, mesh, block_rows=block)
            search_s = best_seconds(
                lambda d=database: search(d, queries, ARGS.k, query_chunk=ARGS.queries),
                ARGS.repeats,
            )
            exact = search(database, queries, ARGS.k, query_chunk=ARGS.queries)
            approx = search(database, queries, ARGS.k, approximate=True, recall_target=0.95)
            bf16 = put_database(db, mesh, block_rows=block, dtype=jnp.bfloat16)
            bf16_rows = search(bf16, queries, ARGS.k, query_chunk=ARGS.queries).rows
            row = {
                "items": size,
                "dim": ARGS.dim,
                "devices": devices,
                "queries": ARGS.queries,
                "k": ARGS.k,
                "qps": ARGS.queries / search_s,
                "faiss_qps": None if faiss_s is None else ARGS.queries / faiss_s,
                "matmul_qps": ARGS.queries / matmul_s,
                "vs_faiss": None if faiss_s is None else faiss_s / search_s,
                "overhead_vs_matmul": search_s / matmul_s - 1.0,
                "same_top_k_as_faiss": None
                if faiss_rows is None
                else overlap(exact.rows, faiss_rows),
                "bytes_f32": int(database.rows.nbytes),
                "bytes_bf16": int(bf16.rows.nbytes),
                "bf16_top_k_overlap": overlap(exact.rows, bf16_rows),
                "approx_recall": overlap(exact.rows, approx.rows),
                "platform": jax.devices()[0].platform,
            }
            del database, bf16
            if ARGS.json:
                print(json.dumps(row), flush=True)
            else:
                faiss_text = "-" if faiss_s is None else f"{row['faiss_qps']:.1f}"
                print(
                    f"{size:>9} items x {ARGS.dim}, {devices} device(s): {row['qps']:.1f} q/s "
                    f"(FAISS flat {faiss_text}, bare matmul+top-k {row['matmul_qps']:.1f}; "
                    f"overhead {row['overhead_vs_matmul']:+.0%}); same top-k as FAISS "
                    f"{row['same_top_k_as_faiss']}, bf16 overlap {row['bf16_top_k_overlap']:.3f}, "
                    f"approx recall {row['approx_recall']:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    sys.exit(main())
