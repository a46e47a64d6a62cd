"""A BERT-family text tower, as in BiomedCLIP-style dual encoders and sentence-transformers.

Token ids -> word + position + token-type embeddings -> LayerNorm -> post-LN blocks
(``transformer.PostNormBlock``: attention, add & LayerNorm; GELU MLP, add & LayerNorm) -> pooling
-> an optional linear projection to the dual encoder's ``embed_dim``. Attention q/k/v/out and MLP
fc1/fc2 are ``LoraDense``, so per-task adapters (the ``lora`` collection with ``task_weights``)
apply as in the other towers. Id 0 is padding (BERT's ``[PAD]``, this repo's ``PAD_ID``): padded
keys are masked out of attention and out of mean pooling. Every text is one segment (token type
0). The backbone has no dropout: it is frozen; only the adapters' inputs see ``lora_dropout``.

Pooling: ``"mean"`` (masked mean over the tokens, sentence-transformers' mean pooling, as
all-MiniLM-L6-v2 uses), ``"cls"`` (the ``[CLS]`` token's hidden state) or ``"pooler"`` (HF
``BertModel``'s ``pooler_output``: tanh of a dense layer over ``[CLS]``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mslora_jax.errors import ConfigError
from mslora_jax.models.transformer import ACTIVATIONS, PostNormBlock

PAD_ID = 0  # BERT's [PAD]; equal to mslora_jax.data.tokenizer.PAD_ID
POOLINGS = ("mean", "cls", "pooler")


@dataclasses.dataclass(frozen=True)
class BertTextConfig:
    """Sizes and variant of a BERT encoder (tiny defaults; ``interop.hf_bert`` reads real ones)."""

    vocab_size: int = 1024
    width: int = 64  # hidden_size
    depth: int = 2  # num_hidden_layers
    num_heads: int = 4
    mlp_dim: int = 128  # intermediate_size
    max_positions: int = 64  # max_position_embeddings
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"  # a key of transformer.ACTIVATIONS; BERT's "gelu" is the erf GELU
    pooling: str = "mean"  # one of POOLINGS
    embed_dim: int | None = None  # a bias-free projection of the pooled feature; None: none

    def __post_init__(self):
        for name in ("vocab_size", "width", "depth", "num_heads", "mlp_dim", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"bert.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 1:
            raise ConfigError(
                f"bert.type_vocab_size must be a positive integer, got {self.type_vocab_size!r}"
            )
        if self.embed_dim is not None and (
            not isinstance(self.embed_dim, int) or self.embed_dim < 1
        ):
            raise ConfigError(
                f"bert.embed_dim must be None or a positive integer, got {self.embed_dim!r}"
            )
        if self.width % self.num_heads:
            raise ConfigError(
                f"bert.width={self.width} is not divisible by bert.num_heads={self.num_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"bert.activation={self.activation!r} is unknown; expected one of "
                f"{sorted(ACTIVATIONS)}"
            )
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"bert.pooling={self.pooling!r} is unknown; expected one of {list(POOLINGS)}"
            )
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"bert.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def out_dim(self) -> int:
        """Width of the tower's output: ``embed_dim``, or the hidden size without a projection."""
        return self.width if self.embed_dim is None else self.embed_dim


class PostNormEncoder(nn.Module):
    """``depth`` post-LN blocks ``block_{i}`` (no final LayerNorm: each block ends with one)."""

    config: BertTextConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, mask, task_weights, deterministic: bool = True):
        cfg = self.config
        for i in range(cfg.depth):
            x = PostNormBlock(
                cfg.width,
                cfg.num_heads,
                cfg.mlp_dim,
                self.lora_dropout,
                cfg.activation,
                cfg.layer_norm_eps,
                name=f"block_{i}",
            )(x, mask, task_weights, deterministic)
        return x


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``hidden`` ``[B, L, D]`` over the tokens where ``mask`` ``[B, L]`` is True."""
    weights = mask.astype(hidden.dtype)[..., None]
    # sentence-transformers clamps the count at 1e-9, so an all-padding row gives zeros.
    return (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)


class BertTextEncoder(nn.Module):
    """``(tokens [B, L] int, task_weights, deterministic) -> [B, out_dim]`` (not normalized)."""

    config: BertTextConfig
    lora_dropout: float = 0.0

    def setup(self):
        cfg = self.config
        self.token_embed = nn.Embed(cfg.vocab_size, cfg.width)
        self.position_embed = nn.Embed(cfg.max_positions, cfg.width)
        self.type_embed = nn.Embed(cfg.type_vocab_size, cfg.width)
        self.ln_embed = nn.LayerNorm(epsilon=cfg.layer_norm_eps)
        self.encoder = PostNormEncoder(cfg, self.lora_dropout)
        if cfg.pooling == "pooler":
            self.pooler = nn.Dense(cfg.width)
        if cfg.embed_dim is not None:
            self.proj = nn.Dense(cfg.embed_dim, use_bias=False)

    def hidden_states(self, tokens, task_weights=None, deterministic: bool = True):
        """The last layer's hidden states ``[B, L, width]`` (HF's ``last_hidden_state``)."""
        length = tokens.shape[1]
        if length > self.config.max_positions:
            raise ConfigError(
                f"{length} tokens per text, but bert.max_positions={self.config.max_positions}"
            )
        x = self.token_embed(tokens) + self.position_embed(jnp.arange(length))[None]
        x = self.ln_embed(x + self.type_embed(jnp.zeros_like(tokens)))
        return self.encoder(x, tokens != PAD_ID, task_weights, deterministic)

    def pool(self, hidden, tokens):
        """The pooled text feature ``[B, width]`` (before the projection)."""
        if self.config.pooling == "mean":
            return mean_pool(hidden, tokens != PAD_ID)
        if self.config.pooling == "pooler":
            return jnp.tanh(self.pooler(hidden[:, 0]))
        return hidden[:, 0]

    def __call__(self, tokens, task_weights=None, deterministic: bool = True):
        pooled = self.pool(self.hidden_states(tokens, task_weights, deterministic), tokens)
        return pooled if self.config.embed_dim is None else self.proj(pooled)


def init_bert(config: BertTextConfig, rng: jax.Array, seq_len: int = 8) -> dict:
    """Random parameters (the ``params`` collection) of a ``BertTextEncoder``."""
    tokens = jnp.ones((1, min(seq_len, config.max_positions)), jnp.int32)
    return BertTextEncoder(config).init(rng, tokens)["params"]
