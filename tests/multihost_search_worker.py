"""One process of tests/test_multihost_search.py: ``python tests/multihost_search_worker.py
COORDINATOR PROCESS_ID OUT.npy``. Each process embeds (here: draws) only its half of the database,
all-gathers the halves, places the database over the 8 devices of both processes and searches;
it saves the global top-k it got."""

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

ROWS, QUERIES, DIM, K = 1001, 37, 8, 9


def data():
    """The whole database and the queries (integer-valued: exact scores, real ties)."""
    rng = np.random.default_rng(0)
    db = rng.integers(-2, 3, size=(ROWS, DIM)).astype(np.float32)
    return db, rng.integers(-2, 3, size=(QUERIES, DIM)).astype(np.float32)


def main(coordinator: str, process: int, out: str) -> None:
    # Before any backend starts (importing jax starts none).
    jax.distributed.initialize(coordinator, num_processes=2, process_id=process)
    from mslora_jax.parallel.mesh import make_mesh
    from mslora_jax.retrieval.search import put_database, search

    db, queries = data()
    half = (ROWS + 1) // 2
    share = db[process * half : (process + 1) * half]  # what this process encodes
    padded = np.zeros((half, DIM), np.float32)
    padded[: len(share)] = share
    gathered = np.asarray(multihost_utils.process_allgather(padded, tiled=True))[:ROWS]
    found = search(put_database(gathered, make_mesh(8), block_rows=64), queries, k=K)
    np.save(out, found.rows)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
