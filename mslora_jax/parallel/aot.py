"""Ahead-of-time compilation for a TPU topology that is not attached: memory without hardware.

``libtpu`` (the ``tpu-aot`` extra) compiles for a described topology (``v5e:2x4``, ``v4:2x2x1``)
on any machine, CPU-only included: ``jax.experimental.topologies`` gives compile-only devices, a
mesh over them shards the abstract arguments (``jax.ShapeDtypeStruct``), and the compiled
program's ``memory_analysis`` gives the per-device bytes the TPU compiler planned. A program
over the chip's HBM does not compile at all (``RESOURCE_EXHAUSTED`` / ``CompileTimeHbmOom``):
``compile_memory`` turns that into a "does not fit" report carrying the compiler's figures.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from mslora_jax.parallel.mesh import MESH_AXES, resolve_mesh_shape

GIB = 2**30

# HBM per chip in GiB, by ``device_kind`` (Google Cloud TPU system architecture pages).
HBM_GIB_PER_CHIP = {
    "TPU v4": 32,
    "TPU v5 lite": 16,  # v5e
    "TPU v5": 95,  # v5p
    "TPU v6 lite": 32,  # Trillium (v6e)
}

# libtpu reads these at start-up: it warns when the first two are unset on a machine without a
# TPU (they describe the attached slice, which an AOT compile does not use), and without the
# last it refuses to load while another process holds /tmp/libtpu_lockfile (any JAX process
# with libtpu installed takes it, even on a CPU-only machine).
_QUIET_ENV = {
    "TPU_ACCELERATOR_TYPE": "v5litepod-8",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def libtpu_available() -> bool:
    """Whether ``libtpu`` can be imported (TPU topologies can then be compiled for)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def tpu_topology_devices(name: str, chip_config_name: str | None = None) -> list:
    """Compile-only devices of the TPU topology ``name`` (e.g. ``"v5e:2x4"``, ``"v4:2x2x1"``).

    ``chip_config_name="megacore"`` makes each v4 chip one device (what JAX uses on real v4
    hardware); libtpu's default is one device per TensorCore. The first call loads libtpu.
    """
    from jax.experimental import topologies

    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    kwargs = {} if chip_config_name is None else {"chip_config_name": chip_config_name}
    return list(topologies.get_topology_desc(name, platform="tpu", **kwargs).devices)


def device_mesh(devices: Sequence, shape: Sequence[int]) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh (Auto axis types, as ``parallel.mesh.make_mesh``) over
    ``devices`` in their given order; ``shape`` may hold one ``-1``."""
    sizes = resolve_mesh_shape(shape, len(devices))
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def hbm_bytes_per_device(devices: Sequence) -> int | None:
    """HBM of one device of a TPU topology (a v4 chip split into 2 cores gives each half), or
    None for a kind not in ``HBM_GIB_PER_CHIP``."""
    gib = HBM_GIB_PER_CHIP.get(devices[0].device_kind)
    if gib is None:
        return None
    cores = {getattr(d, "core_on_chip", 0) for d in devices}
    return int(gib * GIB // len(cores))


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of one compiled program, or the compiler's refusal.

    ``peak_bytes`` = arguments + outputs - aliased (donated state reused for the new state) +
    temporaries; ``fits`` compares it with ``hbm_bytes`` (None when unknown). A program the
    compiler refused has ``fits=False``, ``error`` its message and, where the message says so,
    ``oom_used_bytes`` / ``oom_available_bytes`` (the temporaries it needed, and the HBM left
    for them); its ``temp_bytes`` are those temporaries, its ``argument_bytes`` the arguments'
    shards (given by the caller), and its peak their sum (outputs taken as all aliased).
    """

    compile_s: float
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    hbm_bytes: int | None = None
    error: str | None = None
    oom_used_bytes: int | None = None
    oom_available_bytes: int | None = None

    @property
    def peak_bytes(self) -> int | None:
        if self.argument_bytes is None or self.temp_bytes is None:
            return None
        if self.output_bytes is None:  # refused: outputs unknown, taken as all aliased
            return self.argument_bytes + self.temp_bytes
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool | None:
        if self.error is not None:
            return False
        if self.hbm_bytes is None:
            return None
        return self.peak_bytes <= self.hbm_bytes

    def as_dict(self) -> dict:
        """JSON-ready figures in GiB (3 decimals)."""
        gib = lambda b: None if b is None else round(b / GIB, 3)
        out = {
            "argument_gib": gib(self.argument_bytes),
            "output_gib": gib(self.output_bytes),
            "alias_gib": gib(self.alias_bytes),
            "temp_gib": gib(self.temp_bytes),
            "peak_estimate_gib": gib(self.peak_bytes),
            "hbm_gib": gib(self.hbm_bytes),
            "fits": None if self.fits is None else ("yes" if self.fits else "no"),
            "compile_s": round(self.compile_s, 1),
        }
        if self.error is not None:
            out["oom_used_gib"] = gib(self.oom_used_bytes)
            out["oom_available_gib"] = gib(self.oom_available_bytes)
            out["error"] = self.error
        return out


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([0-9.]+)\s*([KMGT]?)i?B?"
# "Used 42.31G of 15.75G hbm" (XLA:TPU) and "... (42.31G) exceeds available HBM (15.75G)".
_OOM_PATTERNS = (
    re.compile(rf"Used {_SIZE} of {_SIZE} hbm"),
    re.compile(rf"\({_SIZE}\) exceeds available HBM \({_SIZE}\)"),
)


def _size(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit])


def is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "HbmOom" in text or "Ran out of memory" in text


def oom_figures(message: str) -> tuple[int | None, int | None]:
    """(used, available) bytes from an XLA out-of-memory message, or (None, None)."""
    for pattern in _OOM_PATTERNS:
        match = pattern.search(message)
        if match:
            used, available = match.groups()[:2], match.groups()[2:]
            return _size(*used), _size(*available)
    return None, None


def _short(message: str, limit: int = 600) -> str:
    """The informative lines of a compiler error, at most ``limit`` characters."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " | ".join(lines)[:limit]


def per_device_bytes(tree, shardings=None) -> int:
    """Bytes of one device's shards of ``tree``'s arrays (or ``ShapeDtypeStruct``s), placed
    by ``shardings`` (a matching tree; default: each leaf's own ``.sharding``)."""
    leaves = jax.tree.leaves(tree)
    placed = [x.sharding for x in leaves] if shardings is None else jax.tree.leaves(shardings)
    total = 0
    for leaf, sharding in zip(leaves, placed, strict=True):
        shape = sharding.shard_shape(tuple(leaf.shape)) if sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def compile_memory(
    lowered, hbm_bytes: int | None = None, argument_bytes: int | None = None
) -> tuple[MemoryReport, object]:
    """Compile ``lowered`` (a ``jax.stages.Lowered``) and read its per-device memory.

    Returns the report and the compiled program (None when the compiler ran out of memory,
    which is reported, not raised; other errors propagate). ``argument_bytes`` (e.g. from
    ``per_device_bytes``) completes the report of a refused program, whose error names only
    its temporaries."""
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as error:  # XlaRuntimeError / JaxRuntimeError, depending on the path
        if not is_oom(error):
            raise
        used, available = oom_figures(str(error))
        report = MemoryReport(
            compile_s=time.perf_counter() - start,
            argument_bytes=argument_bytes,
            temp_bytes=used,
            hbm_bytes=available if hbm_bytes is None else hbm_bytes,
            error=_short(str(error)),
            oom_used_bytes=used,
            oom_available_bytes=available,
        )
        return report, None
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    report = MemoryReport(
        compile_s=seconds,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        hbm_bytes=hbm_bytes,
    )
    return report, compiled


def mesh_description(mesh: Mesh) -> dict:
    """``{"mesh": [data, fsdp, tensor], "devices": n, "device_kind": ...}`` for a report line."""
    devices = mesh.devices.reshape(-1)
    return {
        "mesh": [int(mesh.shape[a]) for a in MESH_AXES],
        "devices": int(devices.size),
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
    }
