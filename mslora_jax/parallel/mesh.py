"""The device mesh (axes ``data``, ``fsdp``, ``tensor``) and how batches are placed on it.

Decision (see CONVENTIONS): the mesh uses ``AxisType.Auto`` so that XLA propagates shardings
through the model from the explicitly sharded inputs (parameters by the rules of
``parallel.rules``, batches over ``(data, fsdp)``) and a few activation constraints; the one place
with explicit collectives is the contrastive loss, written with ``shard_map``.

- ``data``: pure data parallelism (parameters replicated across it);
- ``fsdp``: batches *and* parameters sharded (each device holds 1/fsdp of every frozen weight,
  gathered layer by layer when used);
- ``tensor``: the decoder's attention heads, MLP and vocabulary split across devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mslora_jax.errors import ConfigError

DATA_AXIS, FSDP_AXIS, TENSOR_AXIS = "data", "fsdp", "tensor"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch dimension is split over both


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)``, one ``-1`` filled in so that the product is ``num_devices``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ConfigError(f"mesh shape needs 3 sizes (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(
            f"mesh (data, fsdp, tensor) = {shape}: sizes must be >= 1, with at most one -1 "
            "(= the remaining devices)"
        )
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(
                f"mesh (data, fsdp, tensor) = {shape}: {num_devices} devices are not divisible "
                f"by {known}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if int(np.prod(shape)) != num_devices:
        raise ConfigError(
            f"mesh (data, fsdp, tensor) = {shape} needs {int(np.prod(shape))} devices, "
            f"but the run uses {num_devices}"
        )
    return shape  # type: ignore[return-value]


def make_mesh(num_devices: int = 0, shape: Sequence[int] = (-1, 1, 1)) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over all global devices, or the first ``num_devices``.

    Over all devices the layout comes from ``jax.make_mesh``, which follows the physical
    interconnect (TPU torus, GPU NVLink islands). ``num_devices`` (single process only) takes a
    prefix of the local devices, laid out by ``mesh_utils``. The default shape is pure data
    parallelism, as before the fsdp and tensor axes existed.
    """
    devices = jax.devices()
    n = num_devices or len(devices)
    if not 1 <= n <= len(devices):
        raise ConfigError(f"num_devices={num_devices} but only {len(devices)} devices are visible")
    if n != len(devices) and jax.process_count() > 1:
        raise ConfigError(
            f"num_devices={num_devices}: a multi-process run uses all {len(devices)} devices "
            "(set num_devices=0)"
        )
    sizes = resolve_mesh_shape(shape, n)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if n == len(devices):
        return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types)
    grid = mesh_utils.create_device_mesh(sizes, devices=devices[:n], allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``(data, fsdp)``; replicated over ``tensor``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch is split: ``data * fsdp``."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def round_up_to_batch_shards(rows: int, mesh: Mesh) -> int:
    """``rows`` rounded up to a multiple of the batch shards, so a batch of that size (e.g. an
    evaluation batch) shards evenly."""
    shards = batch_shards(mesh)
    return math.ceil(rows / shards) * shards


def check_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
    shards = batch_shards(mesh)
    if batch_size % shards:
        raise ConfigError(
            f"{what}={batch_size} is not divisible by the {shards} batch shards of the mesh "
            f"(data x fsdp = {mesh.shape[DATA_AXIS]} x {mesh.shape[FSDP_AXIS]})"
        )


def process_row_range(mesh: Mesh, global_rows: int) -> tuple[int, int]:
    """``[start, stop)``: the rows of a ``global_rows`` batch held by this process's devices.

    A process's devices must hold one contiguous block of rows (true of meshes from
    ``make_mesh``, whose devices are ordered by process along the batch axes).
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
    starts = sorted({s[0].start or 0 for s in index_map.values()})
    stops = sorted({global_rows if s[0].stop is None else s[0].stop for s in index_map.values()})
    start, stop = starts[0], stops[-1]
    held = sum(b - a for a, b in zip(starts, stops))
    if held != stop - start:
        raise ConfigError(
            f"this process's devices hold rows {list(zip(starts, stops))} of the batch, not one "
            "contiguous block; build the mesh with make_mesh"
        )
    return start, stop


def to_global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict:
    """Assemble this process's rows of a batch into global arrays sharded over ``(data, fsdp)``."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        rows = len(value) * jax.process_count()
        out[key] = jax.make_array_from_process_local_data(sharding, value, (rows, *value.shape[1:]))
    return out


def process_rows(mesh: Mesh, batch: Mapping[str, np.ndarray]) -> dict:
    """This process's rows of a batch that every process holds in full.

    ``to_global_batch`` of these rows rebuilds the full batch (used for evaluation, where every
    host reads the same test split).
    """
    out = {}
    for key, value in batch.items():
        start, stop = process_row_range(mesh, len(value))
        out[key] = value[start:stop]
    return out


def replicate(mesh: Mesh, tree):
    """Put a pytree on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
