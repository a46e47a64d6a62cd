"""The data-parallel mesh and how batches are placed on it.

Decision (see CONVENTIONS): the mesh uses ``AxisType.Auto`` so that XLA propagates shardings
through the model automatically; the one place with explicit collectives is the contrastive loss,
written with ``shard_map``. Parameters are replicated; batches are sharded over ``data``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mslora_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (0 = all)."""
    devices = jax.devices()
    n = num_devices or len(devices)
    if not 1 <= n <= len(devices):
        raise ConfigError(f"num_devices={num_devices} but only {len(devices)} devices are visible")
    return Mesh(np.asarray(devices[:n]), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
    if batch_size % mesh.size:
        raise ConfigError(f"{what}={batch_size} is not divisible by the {mesh.size} devices")


def to_global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict:
    """Assemble this process's part of a batch into global arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def process_rows(batch: Mapping[str, np.ndarray]) -> dict:
    """This process's contiguous share of a batch that every process holds in full.

    With a 1-D mesh whose devices are ordered by process, ``to_global_batch`` of these shares
    rebuilds the full batch (used for evaluation, where every host reads the same test split).
    """
    count, index = jax.process_count(), jax.process_index()
    out = {}
    for key, value in batch.items():
        rows = len(value) // count
        out[key] = value[index * rows : (index + 1) * rows]
    return out


def replicate(mesh: Mesh, tree):
    """Put a pytree on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
