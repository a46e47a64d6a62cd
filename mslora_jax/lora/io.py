"""Save and load one task's adapter as a self-describing folder (orbax arrays + metadata)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from mslora_jax.errors import CheckpointError
from mslora_jax.io_utils import atomic_write_json, read_json
from mslora_jax.lora.adapter import LoraAdapter

_META_KEYS = ("rank", "alpha", "modality", "task")


def save_adapter(directory: os.PathLike | str, adapter: LoraAdapter) -> None:
    """Write ``directory/params`` (orbax) and ``directory/adapter.json`` (rank, alpha, ...)."""
    directory = Path(directory).absolute()
    if (directory / "params").exists():
        raise CheckpointError(f"{directory} already holds an adapter; choose a new folder")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", jax.tree.map(np.asarray, adapter.params))
    checkpointer.wait_until_finished()
    atomic_write_json(directory / "adapter.json", adapter.metadata())


def load_adapter(directory: os.PathLike | str) -> LoraAdapter:
    """Read an adapter written by ``save_adapter``; errors name the folder and what is wrong."""
    directory = Path(directory).absolute()
    if not (directory / "adapter.json").exists() or not (directory / "params").exists():
        raise CheckpointError(f"no adapter at {directory} (expected params/ and adapter.json)")
    meta = read_json(directory / "adapter.json", "adapter")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{directory}/adapter.json lacks {missing}")
    try:
        params = ocp.StandardCheckpointer().restore(directory / "params")
    except Exception as e:  # orbax raises many types for a damaged folder
        raise CheckpointError(f"{directory}/params is unreadable: {e}") from e
    return LoraAdapter.from_metadata(jax.tree.map(np.asarray, params), meta)
