"""Proof of fit for the sharded search without the hardware: compile ``retrieval.search``'s
per-chunk program for a TPU topology ahead of time and print its per-chip memory.

The database is abstract (nothing is allocated): ``--items`` rows of ``--dim`` in ``--dtype``,
split over every chip of the topology in equal blocks (``put_database``'s layout), queried by a
chunk of ``--queries`` float32 queries for the top ``--k``. Prints one JSON line per (items,
topology); asserts nothing. A program the TPU compiler refuses for memory is reported with
``"fits": "no"`` and its figures. Needs ``libtpu`` (``pip install -e '.[tpu-aot]'``).

    python experiments/aot_search_memory.py --items 100000000 --topology v5e:2x2 \
        --topology v5e:2x4
    python experiments/aot_search_memory.py --items 1000000000 --topology v5e:16x16
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the topology; run nothing

import json  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from mslora_jax.parallel import aot  # noqa: E402
from mslora_jax.retrieval.search import DEFAULT_BLOCK_ROWS, _search_chunk  # noqa: E402

_ITEMS = flags.DEFINE_multi_integer("items", [100_000_000], "Database rows.")
_TOPOLOGY = flags.DEFINE_multi_string("topology", ["v5e:2x4"], "TPU topologies (libtpu's).")
_DIM = flags.DEFINE_integer("dim", 512, "Embedding dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored embeddings.")
_QUERIES = flags.DEFINE_integer("queries", 256, "Queries per compiled chunk.")
_K = flags.DEFINE_integer("k", 10, "Results per query.")
_BLOCK = flags.DEFINE_integer("block_rows", DEFAULT_BLOCK_ROWS, "Rows scored at a time per chip.")
_APPROX = flags.DEFINE_bool("approximate", False, "lax.approx_max_k instead of lax.top_k.")


def database_layout(items: int, shards: int, block_rows: int) -> tuple[int, int]:
    """(rows per chip, block) as ``put_database`` pads them: equal blocks of at most
    ``block_rows`` rows on every chip."""
    per_shard = max(1, math.ceil(items / shards))
    blocks = math.ceil(per_shard / max(1, block_rows))
    block = math.ceil(per_shard / blocks)
    return blocks * block, block


def report(items: int, topology: str) -> dict:
    devices = aot.tpu_topology_devices(topology)
    mesh = aot.device_mesh(devices, (-1, 1, 1))
    per_chip, block = database_layout(items, len(devices), _BLOCK.value)
    dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
    rows = jax.ShapeDtypeStruct(
        (per_chip * len(devices), _DIM.value), dtype,
        sharding=NamedSharding(mesh, P(tuple(mesh.axis_names))),
    )  # fmt: skip
    queries = jax.ShapeDtypeStruct(
        (_QUERIES.value, _DIM.value), jnp.float32, sharding=NamedSharding(mesh, P())
    )
    lowered = _search_chunk.lower(
        queries, rows, mesh=mesh, k=_K.value, size=items, block=block,
        approximate=_APPROX.value, recall_target=0.95,
    )  # fmt: skip
    hbm = aot.hbm_bytes_per_device(devices)
    argument_bytes = aot.per_device_bytes([queries, rows])
    memory, _ = aot.compile_memory(lowered, hbm, argument_bytes)
    database_gib = per_chip * _DIM.value * jnp.dtype(dtype).itemsize / aot.GIB
    return {
        "items": items,
        "dim": _DIM.value,
        "dtype": _DTYPE.value,
        "topology": topology,
        "chips": len(devices),
        "rows_per_chip": per_chip,
        "block_rows": block,
        "database_gib_per_chip": round(database_gib, 3),
        "queries_per_chunk": _QUERIES.value,
        # One block's float32 scores, by construction: libtpu's memory_analysis may report no
        # temporaries for this program, so the figure the loop must hold is given beside it.
        "score_block_gib": round(_QUERIES.value * block * 4 / aot.GIB, 3),
        **memory.as_dict(),
    }


def main(argv) -> None:
    del argv
    for items in _ITEMS.value:
        for topology in _TOPOLOGY.value:
            print(json.dumps(report(items, topology)), flush=True)


if __name__ == "__main__":
    app.run(main)
