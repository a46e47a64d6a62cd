"""The decoder's KV cache: every layer's keys and values, which slots hold real tokens, and where
each example writes next (``KVCache``, ``init_cache``), and the per-example slot write.

Separate from ``models.decoder`` so attention (which writes a layer's slots) and the decoder
(which writes the slot mask) share it without importing each other.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mslora_jax.errors import ConfigError
from mslora_jax.models.decoder_config import DecoderConfig

# Logical axes of cached keys/values, for the sharding constraints
# (``parallel.rules.LOGICAL_TO_MESH`` maps them to mesh axes).
CACHE_AXES = (None, "batch", None, "act_kv_heads", None)  # [layers, B, S, K, Dh]


@flax.struct.dataclass
class KVCache:
    """Every layer's keys and values plus which slots hold real tokens and where to write next.

    ``keys``/``values``: ``[depth, B, S, num_kv_heads, head_dim]`` (S = cache length; one array
    for all layers in both layouts, so a scanned decoder updates its layer's slice in place);
    ``mask``: ``[B, S]`` bool, True where a slot holds a real (non-padding) token;
    ``index``: ``[B]`` int32, the slot the next token of each example is written to.
    """

    keys: jax.Array
    values: jax.Array
    mask: jax.Array
    index: jax.Array

    @property
    def size(self) -> int:
        return self.mask.shape[1]


def init_cache(
    config: DecoderConfig, batch: int, size: int, dtype: jnp.dtype = jnp.float32
) -> KVCache:
    """An empty cache of ``size`` slots (all masked, index 0)."""
    if size > config.max_len:
        raise ConfigError(f"cache size {size} is over decoder.max_len={config.max_len}")
    shape = (config.depth, batch, size, config.num_kv_heads, config.head_dim)

    def zeros():  # sharded over batch (and kv heads) inside a mesh with logical rules
        return nn.with_logical_constraint(jnp.zeros(shape, dtype), CACHE_AXES)

    return KVCache(zeros(), zeros(), jnp.zeros((batch, size), bool), jnp.zeros((batch,), jnp.int32))


def _write(cache: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    """Per example ``b``: ``cache[b, index[b] : index[b] + L] = update[b]`` (dim 1 is slots)."""

    def one(c, u, i):
        return jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (i,) + (0,) * (c.ndim - 1))

    return jax.vmap(one)(cache, update, index)
