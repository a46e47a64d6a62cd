"""Multi-process runs: starting ``jax.distributed``, which process writes, who is speaking.

A run over several hosts (or several processes on one machine) starts the same command once per
process. Each process then sees every device of the run (``jax.devices()``), builds the same
mesh, reads only its rows of each batch, and joins every computation; orbax checkpoints are
written cooperatively, while files that are one per run (results, tables, answers, the workdir's
config.json, the tokenizer, the backbone's meta.json) are written by process 0 alone.

How a process learns its place, in order of precedence:

- explicit coordinates, from arguments (the CLI's ``--coordinator_address``,
  ``--num_processes``, ``--process_id``) or else the environment variables
  ``MSLORA_COORDINATOR_ADDRESS`` (``host:port`` of process 0, which hosts the coordinator),
  ``MSLORA_NUM_PROCESSES`` and ``MSLORA_PROCESS_ID`` (``0 .. N-1``); all three are required;
- ``mode="auto"`` (``--distributed=auto`` or ``MSLORA_DISTRIBUTED=auto``): jax detects them
  (TPU pods, SLURM, Open MPI, ...); any coordinate given as above overrides the detected one;
- otherwise a plain single-process run, and nothing is initialised.

On the CPU backend, cross-process collectives need ``jax_cpu_collectives_implementation``; the
jax this project requires (>= 0.10) defaults it to ``"gloo"``, so nothing is set here (the
multi-process test runs on it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax
from jax.experimental import multihost_utils

from mslora_jax.errors import ConfigError

ENV_MODE = "MSLORA_DISTRIBUTED"
ENV_COORDINATOR_ADDRESS = "MSLORA_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MSLORA_NUM_PROCESSES"
ENV_PROCESS_ID = "MSLORA_PROCESS_ID"
MODES = ("off", "auto")

log = logging.getLogger(__name__)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    mode: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Call ``jax.distributed.initialize`` if this is a multi-process run; True if it did.

    Must run before anything else touches jax (jax raises otherwise). Arguments left as None
    come from ``environ`` (default ``os.environ``), see the module docstring.
    """
    env = os.environ if environ is None else environ
    mode = mode or env.get(ENV_MODE) or "off"
    if mode not in MODES:
        raise ConfigError(f"distributed mode must be one of {MODES}, got {mode!r}")
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR_ADDRESS) or None
    num_processes = _int_or_none(num_processes, env, ENV_NUM_PROCESSES, "num_processes")
    process_id = _int_or_none(process_id, env, ENV_PROCESS_ID, "process_id")
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if mode == "off" and all(v is None for v in given.values()):
        return False
    if mode == "off":
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ConfigError(
                f"a multi-process run needs coordinator_address, num_processes and process_id; "
                f"missing {missing} (flags --{' --'.join(missing)} or {_env_names(missing)}), "
                "or use --distributed=auto to let jax detect them"
            )
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and (
        process_id < 0 or (num_processes is not None and process_id >= num_processes)
    ):
        raise ConfigError(
            f"process_id must be in [0, num_processes = {num_processes}), got {process_id}"
        )
    # Explicit coordinates are used as given; "auto" lets jax fill in the rest from the cluster.
    detection = "deactivate" if mode == "off" else None
    try:
        jax.distributed.initialize(
            coordinator_address, num_processes, process_id, cluster_detection_method=detection
        )
    except ValueError as error:  # what jax raises for coordinates it could not work out
        raise ConfigError(
            f"distributed mode {mode!r}: {error} (no cluster detected? give --coordinator_address, "
            "--num_processes and --process_id)"
        ) from None
    log.info(
        "jax.distributed: process %d of %d, %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def _int_or_none(value: int | None, env: Mapping[str, str], key: str, name: str) -> int | None:
    if value is not None:
        return int(value)
    text = env.get(key, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r}: {name} must be an integer") from None


def _env_names(names: list[str]) -> str:
    keys = {
        "coordinator_address": ENV_COORDINATOR_ADDRESS,
        "num_processes": ENV_NUM_PROCESSES,
        "process_id": ENV_PROCESS_ID,
    }
    return " ".join(f"${keys[n]}" for n in names)


def is_primary() -> bool:
    """True in the process that writes the run's one-per-run files (process 0)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Barrier: returns once every process has reached ``sync_processes(name)``; free alone."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class ProcessLogFilter(logging.Filter):
    """Prefixes each record's message with ``[process i/n]`` (once, however many handlers)."""

    def __init__(self, index: int, count: int):
        super().__init__()
        self.prefix = f"[process {index}/{count}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "mslora_process_prefixed", False):
            record.msg = self.prefix + str(record.msg)
            record.mslora_process_prefixed = True
        return True


def label_logs_with_process(logger: logging.Logger | None = None) -> None:
    """In a multi-process run, make every handler of ``logger`` (default root) say who speaks."""
    if jax.process_count() == 1:
        return
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, ProcessLogFilter) for f in handler.filters):
            handler.addFilter(ProcessLogFilter(jax.process_index(), jax.process_count()))
