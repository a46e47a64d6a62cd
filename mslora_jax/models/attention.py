"""The decoder's grouped-query self-attention with RoPE (``Attention``) and how its scores are
computed: XLA's ``dot_product_attention``, optionally a chunk of queries at a time (``attend``),
or the Pallas splash kernel for cache-free calls (``models.splash``).

Separate from ``models.decoder``: the attention kernels are what changes for long sequences and
TPUs, and read best next to each other.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mslora_jax.models.decoder_config import DecoderConfig
from mslora_jax.models.kv_cache import _write
from mslora_jax.models.lora_dense import LoraDense
from mslora_jax.models.splash import splash_attention

# Attention kernels: XLA's (``jax.nn.dot_product_attention``), the Pallas splash kernel on TPU
# for cache-free calls (``models.splash``), or that kernel in the Pallas interpreter (any backend).
ATTENTION_KERNELS = ("xla", "splash", "splash_interpret")


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates ``x`` ``[B, L, H, Dh]`` by ``positions`` ``[B, L]`` (RoPE, "rotate half" layout).

    Pair ``(x[i], x[i + Dh/2])`` is rotated by the angle ``position * theta ** (-2 i / Dh)``.
    Computed in float32 and cast back.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])  # [Dh/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]  # [B, L, 1, Dh/2]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; LoRA-targetable projections q, k, v, o.

    ``query_chunk`` > 0 computes the scores that many queries at a time (see ``attend``);
    ``kernel``: ``ATTENTION_KERNELS`` (``splash``: the Pallas TPU kernel for cache-free calls).
    """

    config: DecoderConfig
    lora_dropout: float = 0.0
    query_chunk: int = 0
    kernel: str = "xla"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        visible: jax.Array,
        task_weights: jax.Array | None = None,
        layer_cache: dict[str, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """x: [B, L, D]; positions: [B, L]; visible: [B, L, S] bool, query l may attend key s.

        Without a cache the keys are this call's L tokens (S = L); with one, the new keys and
        values are written at slots ``cache_index + [0, L)`` and the keys are all S cache slots.
        """
        cfg = self.config
        heads, kv_heads, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        groups = heads // kv_heads

        def dense(features: int, name: str):
            return LoraDense(features, use_bias=False, lora_dropout=self.lora_dropout, name=name)

        b, length = x.shape[:2]
        q = dense(heads * dh, "q")(x, task_weights, deterministic).reshape(b, length, heads, dh)
        k = dense(kv_heads * dh, "k")(x, task_weights, deterministic)
        v = dense(kv_heads * dh, "v")(x, task_weights, deterministic)
        k = k.reshape(b, length, kv_heads, dh)
        v = v.reshape(b, length, kv_heads, dh)
        # Sharding hints (no-ops outside a mesh with logical rules): heads over ``tensor``.
        q = nn.with_logical_constraint(q, ("batch", None, "act_heads", None))
        k = nn.with_logical_constraint(k, ("batch", None, "act_kv_heads", None))
        v = nn.with_logical_constraint(v, ("batch", None, "act_kv_heads", None))
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
        if layer_cache is not None:
            layer_cache = {
                "k": _write(layer_cache["k"], k, cache_index),
                "v": _write(layer_cache["v"], v, cache_index),
            }
            k, v = layer_cache["k"].astype(x.dtype), layer_cache["v"].astype(x.dtype)  # [B,S,K,Dh]
        if self.kernel != "xla" and layer_cache is None:
            # Cache-free: keys are these tokens, and the last query sees every real key.
            out = splash_attention(q, k, v, visible[:, -1], self.kernel == "splash_interpret")
            return dense(cfg.width, "o")(
                out.reshape(b, length, heads * dh), task_weights, deterministic
            ), layer_cache
        # Query head h = kv * groups + g uses kv head h // groups (HF's repeat_kv order).
        q = q.reshape(b, length, kv_heads, groups, dh)
        out = attend(q, k, v, visible, self.query_chunk).reshape(b, length, heads * dh)
        return dense(cfg.width, "o")(out, task_weights, deterministic), layer_cache


def _attend_all(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """Softmax attention of queries ``[B, L, K, G, Dh]`` over keys/values ``[B, S, K, Dh]``.

    ``jax.nn.dot_product_attention`` (grouped-query: query head ``k * G + g`` reads kv head
    ``k``, HF's ``repeat_kv`` order), with float32 scores and softmax; the backend picks the
    kernel (XLA's today; the call is where fused kernels plug in)."""
    b, length, kv_heads, groups, dh = q.shape
    out = jax.nn.dot_product_attention(
        q.reshape(b, length, kv_heads * groups, dh), k, v, mask=visible[:, None]
    )
    return out.reshape(b, length, kv_heads, groups, dh)


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, query_chunk: int = 0
) -> jax.Array:
    """``_attend_all``, optionally ``query_chunk`` queries at a time.

    The float32 scores ``[B, K, G, L, S]`` are what limits long sequences (the paper config's
    2623 tokens: 1.8 GB per layer for 2 sequences); in chunks, only ``[B, K, G, chunk, S]`` is
    alive, and ``jax.checkpoint`` recomputes each chunk's scores in the backward pass instead of
    keeping them. Every query row is computed exactly as without chunks. The queries are padded
    to a multiple of the chunk (padded rows see nothing and are dropped).
    """
    length = q.shape[1]
    if not query_chunk or length <= query_chunk:
        return _attend_all(q, k, v, visible)
    chunks = -(-length // query_chunk)
    pad = chunks * query_chunk - length
    q = jnp.pad(q, ((0, 0), (0, pad)) + ((0, 0),) * 3)
    visible = jnp.pad(visible, ((0, 0), (0, pad), (0, 0)))

    def split(x):  # [B, chunks * c, ...] -> [chunks, B, c, ...]
        return x.reshape(x.shape[0], chunks, query_chunk, *x.shape[2:]).swapaxes(0, 1)

    one = jax.checkpoint(lambda qv: _attend_all(qv[0], k, v, qv[1]))
    out = jax.lax.map(one, (split(q), split(visible)))  # [chunks, B, c, K, G, Dh]
    out = out.swapaxes(0, 1).reshape(q.shape[0], chunks * query_chunk, *q.shape[2:])
    return out[:, :length]
