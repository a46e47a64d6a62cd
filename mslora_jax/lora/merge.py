"""Fold adapters into the frozen kernels (zero inference overhead) and take them out again."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp

from mslora_jax.lora.adapter import LoraAdapter, adapter_paths
from mslora_jax.lora.targets import get_by_path, set_by_path
from mslora_jax.models.lora_dense import LORA_A, LORA_B


def adapter_delta(adapter: LoraAdapter, path: str) -> jnp.ndarray:
    """``scaling * A^T B^T``: the ``[in, out]`` change that ``adapter`` makes to a kernel."""
    layer = get_by_path(adapter.params, path)
    return adapter.scaling * (layer[LORA_A].T @ layer[LORA_B].T)


def _apply_deltas(base_params: Mapping, adapters: Sequence[LoraAdapter], sign: float) -> dict:
    out = dict(base_params)
    for adapter in adapters:
        for path in adapter_paths(adapter.params):
            layer = get_by_path(out, path)
            kernel = layer["kernel"] + sign * adapter_delta(adapter, path)
            out = set_by_path(out, path, {**layer, "kernel": kernel})
    return out


def merge(base_params: Mapping, adapters: Sequence[LoraAdapter]) -> dict:
    """Backbone params with every adapter's delta added to its kernels (a new tree)."""
    return _apply_deltas(base_params, adapters, +1.0)


def unmerge(merged_params: Mapping, adapters: Sequence[LoraAdapter]) -> dict:
    """Inverse of ``merge`` (exact up to float rounding)."""
    return _apply_deltas(merged_params, adapters, -1.0)
