"""A Mistral/LLaMA-style causal language model with LoRA-targetable projections and a KV cache.

Every block: ``x + attn(attn_norm(x))`` then ``x + mlp(mlp_norm(x))``, with RMSNorm,
rotary position embeddings (RoPE, the "rotate half" layout of Hugging Face checkpoints),
grouped-query attention (``num_heads`` query heads share ``num_kv_heads`` key/value heads) and a
SwiGLU MLP ``down(silu(gate(x)) * up(x))``. The seven projections ``attn/{q,k,v,o}`` and
``mlp/{gate,up,down}`` are bias-free ``LoraDense`` layers (adapters come from the ``lora``
collection); ``embed_tokens``, the norms and ``lm_head`` (untied) are never adapted.

The forward takes input *embeddings* (so LLaVA can splice image tokens in), per-token positions
(``positions_from_mask``: 0 at each row's first real token, so left padding does not shift them),
a padding mask, and optionally a ``KVCache``. Cache slots and positions are different things: a
prompt of length L occupies slots ``[index, index + L)`` whatever its padding, the slot mask
remembers which slots are padding, and RoPE uses the positions.

Layouts (``DecoderConfig.scan_layers``): scanned (the default) keeps one module ``blocks`` whose
parameters carry a leading ``layers`` axis (``blocks/attn/q/kernel``: ``[depth, in, out]``) and
runs it under ``nn.scan``, so the program holds one block whatever the depth (compile time and
program size stay flat); unrolled keeps ``block_{i}`` modules called in a Python loop (any layer
can be targeted by itself; the layout of workdirs written before the scan). The two compute the
same function of the same weights: ``scan_blocks``/``unscan_blocks`` convert a tree between them.

Not implemented: Mistral-7B-v0.1's 4096-token sliding window (v0.2, the base of LLaVA-Med v1.5,
has none).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mslora_jax.errors import ConfigError
from mslora_jax.models.lora_dense import LORA_ACTIVE, LORA_COLLECTION, LoraDense
from mslora_jax.models.splash import splash_attention

# Logical axes of the residual stream [B, L, D] and of cached keys/values [B, S, K, Dh], for the
# sharding constraints (``parallel.rules.LOGICAL_TO_MESH`` maps them to mesh axes).
RESIDUAL_AXES = ("batch", None, None)
CACHE_AXES = (None, "batch", None, "act_kv_heads", None)  # [layers, B, S, K, Dh]
SCANNED = "blocks"  # the scanned layout's module name (leaves with a leading layer axis)
# Attention kernels: XLA's (``jax.nn.dot_product_attention``), the Pallas splash kernel on TPU
# for cache-free calls (``models.splash``), or that kernel in the Pallas interpreter (any backend).
ATTENTION_KERNELS = ("xla", "splash", "splash_interpret")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes of the causal LM; ``max_len`` is the longest sequence (prompt + generation)."""

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    max_len: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    # Blocks under ``nn.scan`` with parameters stacked on a leading layer axis (see the module
    # docstring); False: unrolled ``block_{i}`` modules.
    scan_layers: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "width", "depth", "num_heads", "num_kv_heads", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"decoder.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_len < 1:
            raise ConfigError(f"decoder.max_len must be >= 1, got {self.max_len}")
        if self.width % self.num_heads:
            raise ConfigError(
                f"decoder.width={self.width} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"decoder.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"decoder head_dim={self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0 or self.rms_eps <= 0:
            raise ConfigError(
                f"decoder.rope_theta={self.rope_theta} and rms_eps={self.rms_eps} must be > 0"
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @classmethod
    def mistral_7b(cls, max_len: int = 32768, rope_theta: float = 1e6) -> DecoderConfig:
        """Mistral-7B sizes; the defaults are those of Mistral-7B-Instruct-v0.2 (LLaVA-Med v1.5)."""
        return cls(
            vocab_size=32000,
            width=4096,
            depth=32,
            num_heads=32,
            num_kv_heads=8,
            mlp_dim=14336,
            max_len=max_len,
            rope_theta=rope_theta,
        )


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


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """``[B, L]`` position ids: 0 at each row's first real token, counting real tokens only."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def _write(cache: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    """Per example ``b``: ``cache[b, index[b] : index[b] + L] = update[b]`` (dim 1 is slots)."""

    def one(c, u, i):
        return jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (i,) + (0,) * (c.ndim - 1))

    return jax.vmap(one)(cache, update, index)


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


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale``, computed in float32."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale).astype(x.dtype)


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


class SwiGluMlp(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with LoRA-targetable gate, up, down (no bias)."""

    config: DecoderConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(
        self, x: jax.Array, task_weights: jax.Array | None = None, deterministic: bool = True
    ) -> jax.Array:
        cfg = self.config

        def dense(features: int, name: str):
            return LoraDense(features, use_bias=False, lora_dropout=self.lora_dropout, name=name)

        gate = dense(cfg.mlp_dim, "gate")(x, task_weights, deterministic)
        up = dense(cfg.mlp_dim, "up")(x, task_weights, deterministic)
        return dense(cfg.width, "down")(nn.silu(gate) * up, task_weights, deterministic)


class _BlockModule(nn.Module):
    """What both block layouts are built from; ``_body`` creates the block's modules inside
    the calling compact method, so ``DecoderBlock`` and ``_ScannedBlock`` name them alike."""

    config: DecoderConfig
    lora_dropout: float = 0.0
    query_chunk: int = 0
    kernel: str = "xla"

    def _body(
        self,
        x: jax.Array,
        positions: jax.Array,
        visible: jax.Array,
        task_weights: jax.Array | None,
        layer_cache: dict[str, jax.Array] | None,
        cache_index: jax.Array | None,
        deterministic: bool,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        cfg = self.config
        h = RMSNorm(cfg.rms_eps, name="attn_norm")(x)
        attention = Attention(cfg, self.lora_dropout, self.query_chunk, self.kernel, name="attn")
        h, layer_cache = attention(
            h, positions, visible, task_weights, layer_cache, cache_index, deterministic
        )
        x = x + h
        h = RMSNorm(cfg.rms_eps, name="mlp_norm")(x)
        x = x + SwiGluMlp(cfg, self.lora_dropout, name="mlp")(h, task_weights, deterministic)
        return nn.with_logical_constraint(x, RESIDUAL_AXES), layer_cache


class DecoderBlock(_BlockModule):
    """``x + attn(RMSNorm(x))`` then ``x + mlp(RMSNorm(x))``."""

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
        return self._body(
            x, positions, visible, task_weights, layer_cache, cache_index, deterministic
        )


class _ScannedBlock(_BlockModule):
    """A block as an ``nn.scan`` body: ``((x, keys, values, layer), inputs) -> (carry, None)``.

    The whole cache (``[depth, ...]`` keys and values, or None) rides in the carry and the block
    reads and writes its own layer's slice, so the loop updates one buffer in place instead of
    stacking a second cache as scan outputs.
    """

    @nn.compact
    def __call__(self, carry, positions, visible, task_weights, cache_index, deterministic):
        x, keys, values, layer = carry
        layer_cache = None
        if keys is not None:
            take = lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)
            layer_cache = {"k": take(keys), "v": take(values)}
        x, layer_cache = self._body(
            x, positions, visible, task_weights, layer_cache, cache_index, deterministic
        )
        if keys is not None:
            put = lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u.astype(a.dtype), layer, 0)
            keys, values = put(keys, layer_cache["k"]), put(values, layer_cache["v"])
        return (x, keys, values, layer + 1), None


def scanned_blocks(
    config: DecoderConfig, lora_dropout: float, query_chunk: int, kernel: str, remat: bool
):
    """The ``blocks`` module of the scanned layout: ``_ScannedBlock`` (rematerialized inside
    the loop when ``remat``: each layer keeps only its input for the backward pass) under
    ``nn.scan`` over ``config.depth`` layers.

    Parameters and the trained adapter (``lora_active``) are stacked on axis 0; the frozen
    adapter stack ``lora`` (``[T, depth, ...]``: its task axis comes first everywhere else) is
    scanned along axis 1. Each layer draws its own init and dropout keys.
    """
    body = _ScannedBlock
    if remat:  # static_argnums counts self: argument 6 is the Python bool ``deterministic``
        body = nn.remat(body, static_argnums=(6,), prevent_cse=False)
    scan = nn.scan(
        body,
        variable_axes={"params": 0, LORA_ACTIVE: 0, LORA_COLLECTION: 1},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * 5,
        length=config.depth,
    )
    return scan(config, lora_dropout, query_chunk, kernel, name=SCANNED)


class Decoder(nn.Module):
    """The causal LM: ``embed`` ids, then ``__call__`` on embeddings -> (logits, cache).

    ``remat``: keep only each block's input for the backward pass and recompute the rest
    (``nn.remat``); same parameters and values, far less activation memory at full size.
    """

    config: DecoderConfig
    lora_dropout: float = 0.0
    remat: bool = False
    query_chunk: int = 0  # attention scores this many queries at a time (0: all at once)
    attention_kernel: str = "xla"  # ATTENTION_KERNELS

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.width, name="embed_tokens")
        if cfg.scan_layers:
            self.blocks = scanned_blocks(
                cfg, self.lora_dropout, self.query_chunk, self.attention_kernel, self.remat
            )
        else:
            # static_argnums counts self: argument 7 is the Python bool ``deterministic``.
            block = nn.remat(DecoderBlock, static_argnums=(7,)) if self.remat else DecoderBlock
            self.blocks = [
                block(
                    cfg,
                    self.lora_dropout,
                    self.query_chunk,
                    self.attention_kernel,
                    name=f"block_{i}",
                )
                for i in range(cfg.depth)
            ]
        self.norm = RMSNorm(cfg.rms_eps, name="norm")
        self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """``[B, L]`` ids -> ``[B, L, D]`` embeddings."""
        return self.embed_tokens(input_ids)

    def __call__(
        self,
        input_embeds: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        task_weights: jax.Array | None = None,
        cache: KVCache | None = None,
        deterministic: bool = True,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits ``[B, L, V]`` for ``input_embeds`` ``[B, L, D]``, and the updated cache.

        ``attention_mask`` ``[B, L]`` is True on real tokens. With ``cache``, the L tokens are
        written at slots ``cache.index + [0, L)`` (prefill: a whole prompt; decode: L = 1) and
        attend to every earlier real slot; the returned cache has ``index + L``. The caller keeps
        ``index + L <= cache.size`` (``dynamic_update_slice`` would clamp, not fail).
        ``logits_at`` ``[B, K]``: logits only at these positions (``[B, K, V]``), e.g. a
        prefill's last token: ``lm_head`` then never runs over the whole prompt.
        """
        x, cache = self.hidden_states(
            input_embeds, positions, attention_mask, task_weights, cache, deterministic
        )
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None].astype(jnp.int32), axis=1)
        return self.logits(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``lm_head(norm(hidden))``: ``[..., D]`` final hidden states -> ``[..., V]`` logits."""
        logits = self.lm_head(self.norm(hidden))
        return nn.with_logical_constraint(
            logits, ("batch",) + (None,) * (logits.ndim - 2) + ("act_vocab",)
        )

    def hidden_states(
        self,
        input_embeds: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        task_weights: jax.Array | None = None,
        cache: KVCache | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, KVCache | None]:
        """The last block's output ``[B, L, D]`` (before the final norm) and the new cache."""
        attention_mask = attention_mask.astype(bool)
        length = input_embeds.shape[1]
        if cache is None:
            key_mask, query_slot = attention_mask, jnp.arange(length)[None]  # [B, S=L], [1, L]
            key_slot = jnp.arange(length)
        else:
            key_mask = _write(cache.mask, attention_mask, cache.index)  # [B, S]
            query_slot = cache.index[:, None] + jnp.arange(length)  # [B, L]
            key_slot = jnp.arange(cache.size)
        # visible[b, l, s]: key slot s is real and not in the future of query l.
        visible = key_mask[:, None, :] & (key_slot[None, None, :] <= query_slot[..., None])
        # The residual stream is split over the batch only (FSDP gathers weights, not tokens).
        x = nn.with_logical_constraint(input_embeds, RESIDUAL_AXES)
        index = None if cache is None else cache.index
        keys, values = (None, None) if cache is None else (cache.keys, cache.values)
        if self.config.scan_layers:
            carry = (x, keys, values, jnp.zeros((), jnp.int32))
            (x, keys, values, _), _ = self.blocks(
                carry, positions, visible, task_weights, index, deterministic
            )
        else:
            for i, block in enumerate(self.blocks):
                layer_cache = None if cache is None else {"k": keys[i], "v": values[i]}
                x, layer_cache = block(
                    x, positions, visible, task_weights, layer_cache, index, deterministic
                )
                if cache is not None:
                    keys = keys.at[i].set(layer_cache["k"].astype(keys.dtype))
                    values = values.at[i].set(layer_cache["v"].astype(values.dtype))
        if cache is None:
            return x, None
        return x, KVCache(keys, values, key_mask, cache.index + length)

    def logits_from_ids(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        task_weights: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Uncached forward over token ids (mask defaults to all real) -> ``[B, L, V]``."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        positions = positions_from_mask(attention_mask)
        logits, _ = self(
            self.embed(input_ids), positions, attention_mask, task_weights, None, deterministic
        )
        return logits


def init_decoder(config: DecoderConfig, rng: jax.Array) -> dict:
    """Random decoder parameters (the ``params`` collection only); a scanned decoder gets the
    unrolled layout's draws, stacked, so one seed gives the same weights in both layouts."""
    ids = jnp.zeros((1, 1), jnp.int32)
    unrolled = Decoder(unrolled_config(config))

    def init(key):
        params = unrolled.init(key, ids, method=Decoder.logits_from_ids)["params"]
        return scan_blocks({"decoder": params})["decoder"] if config.scan_layers else params

    return jax.jit(init)(rng)  # one compiled program instead of many eager ops


def unrolled_config(config: DecoderConfig) -> DecoderConfig:
    """``config`` in the unrolled layout (``block_{i}`` modules)."""
    return dataclasses.replace(config, scan_layers=False)


def _block_index(key: str) -> int | None:
    match = re.fullmatch(r"block_(\d+)", key)
    return None if match is None else int(match.group(1))


def scan_blocks(tree: Mapping, axis: int = 0) -> dict:
    """A LLaVA-rooted tree (params, an adapter, or an adapter stack) with the unrolled
    ``decoder/block_{i}`` subtrees stacked into ``decoder/blocks`` along ``axis`` (0 for params
    and one adapter, 1 for a ``[T, ...]`` stack); anything else is returned as it is."""
    decoder = tree.get("decoder") if isinstance(tree, Mapping) else None
    if not isinstance(decoder, Mapping):
        return dict(tree)
    blocks = sorted((i, k) for k in decoder if (i := _block_index(k)) is not None)
    if not blocks:
        return dict(tree)
    if [i for i, _ in blocks] != list(range(len(blocks))):
        raise ConfigError(f"decoder blocks {[k for _, k in blocks]} are not block_0..block_N-1")
    rest = {k: v for k, v in decoder.items() if _block_index(k) is None}
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis), *(decoder[k] for _, k in blocks))
    return {**tree, "decoder": {**rest, SCANNED: stacked}}


def unscan_blocks(tree: Mapping, axis: int = 0) -> dict:
    """Inverse of ``scan_blocks``: ``decoder/blocks`` split into ``decoder/block_{i}``."""
    decoder = tree.get("decoder") if isinstance(tree, Mapping) else None
    if not isinstance(decoder, Mapping) or SCANNED not in decoder:
        return dict(tree)
    stacked = decoder[SCANNED]
    depth = jax.tree.leaves(stacked)[0].shape[axis]
    rest = {k: v for k, v in decoder.items() if k != SCANNED}
    blocks = {
        f"block_{i}": jax.tree.map(lambda x, i=i: jnp.take(x, i, axis), stacked)
        for i in range(depth)
    }
    return {**tree, "decoder": {**rest, **blocks}}
