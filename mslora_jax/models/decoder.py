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

The sizes and the layout conversions are in ``models.decoder_config``, the attention in
``models.attention`` and the cache in ``models.kv_cache``; this module builds the blocks and the
stack from them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mslora_jax.models.attention import Attention
from mslora_jax.models.decoder_config import SCANNED, DecoderConfig, scan_blocks, unrolled_config
from mslora_jax.models.kv_cache import KVCache, _write
from mslora_jax.models.lora_dense import LORA_ACTIVE, LORA_COLLECTION, LoraDense

# Logical axes of the residual stream [B, L, D], for the sharding constraints
# (``parallel.rules.LOGICAL_TO_MESH`` maps them to mesh axes).
RESIDUAL_AXES = ("batch", None, None)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """``[B, L]`` position ids: 0 at each row's first real token, counting real tokens only."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale``, computed in float32."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale).astype(x.dtype)


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
