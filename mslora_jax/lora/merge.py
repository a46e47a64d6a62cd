"""Fold adapters into the frozen kernels (zero inference overhead) and take them out again."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp

from mslora_jax.lora.adapter import LoraAdapter, adapter_paths
from mslora_jax.lora.targets import get_by_path, module_paths, set_by_path
from mslora_jax.models.lora_dense import LORA_A, LORA_B


def adapter_delta(adapter: LoraAdapter, path: str) -> jnp.ndarray:
    """``scaling * A^T B^T``: the ``[in, out]`` change that ``adapter`` makes to a kernel."""
    layer = get_by_path(adapter.params, path)  # leading axes (a scanned layer axis) map over
    return adapter.scaling * jnp.einsum("...ri,...or->...io", layer[LORA_A], layer[LORA_B])


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


def merge_stack(base_params: Mapping, stack: Mapping, weights: jnp.ndarray) -> dict:
    """The adapted kernels with a stack's weighted deltas folded in: ``{path: {"kernel": W'}}``.

    ``W' = W + sum_t weights[t] * A_t^T B_t^T`` for every layer of ``stack`` (``[T, r, in]`` /
    ``[T, out, r]`` leaves), summed in float32 and cast back to the kernel's dtype. Only the
    adapted kernels are returned (a sparse tree with the backbone's paths, so the sharding rules
    apply to it), so the rest of the backbone is never copied: see ``with_kernels``.
    """
    out: dict = {}
    for path in adapter_paths(stack):
        layer = get_by_path(stack, path)
        kernel = get_by_path(base_params, path)["kernel"]
        a = layer[LORA_A].astype(jnp.float32)
        w = weights.astype(jnp.float32).reshape((-1,) + (1,) * (layer[LORA_B].ndim - 1))
        b = layer[LORA_B].astype(jnp.float32) * w
        delta = jnp.einsum("t...ri,t...or->...io", a, b)  # ``...``: a scanned layer axis
        merged = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        out = set_by_path(out, path, {"kernel": merged})
    return out


def with_kernels(base_params: Mapping, kernels: Mapping) -> dict:
    """``base_params`` with the kernels of ``kernels`` (``merge_stack``'s output) swapped in."""
    out = dict(base_params)
    for path in module_paths(kernels):
        layer = get_by_path(out, path)
        out = set_by_path(out, path, {**layer, "kernel": get_by_path(kernels, path)["kernel"]})
    return out
