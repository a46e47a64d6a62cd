"""A CLIP-style dual encoder: a ViT image tower and a transformer text tower over token ids.

Both towers are pure Flax modules used through ``apply``; their attention and MLP layers are
``LoraDense`` so per-task adapters (the ``lora`` collection) can be added to either tower.
Embeddings are L2-normalised; ``logit_scale`` is the log of the inverse temperature.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mslora_jax.models.transformer import ACTIVATIONS, Encoder

PAD_ID = 0  # token id 0 is padding; see mslora_jax.data.tokenizer (kept equal)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of the dual encoder (tiny defaults run on a laptop CPU)."""

    image_size: int = 16
    patch_size: int = 4
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    vocab_size: int = 1024
    max_text_len: int = 12
    text_width: int = 64
    text_depth: int = 2
    text_num_heads: int = 4
    text_mlp_dim: int = 128
    embed_dim: int = 64
    init_temperature: float = 0.07
    # Transformer variant, both towers. Defaults: this repo's ViT. OpenAI's released CLIP towers
    # (e.g. LLaVA's ViT-L/14-336): patch_bias=False, pre_norm=True, mlp_activation="quick_gelu",
    # layer_norm_eps=1e-5.
    patch_bias: bool = True  # a bias in the patch embedding
    pre_norm: bool = False  # LayerNorm "ln_pre" on the ViT's input tokens (CLIP's pre_layrnorm)
    mlp_activation: str = "gelu_tanh"  # a key of transformer.ACTIVATIONS
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        from mslora_jax.errors import ConfigError

        if self.mlp_activation not in ACTIVATIONS:
            raise ConfigError(
                f"model.mlp_activation={self.mlp_activation!r} is unknown; "
                f"expected one of {sorted(ACTIVATIONS)}"
            )
        if self.layer_norm_eps <= 0:
            raise ConfigError(f"model.layer_norm_eps must be > 0, got {self.layer_norm_eps}")

        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size={self.image_size} is not a multiple of "
                f"model.patch_size={self.patch_size}"
            )
        for width, heads, name in (
            (self.width, self.num_heads, "width/num_heads"),
            (self.text_width, self.text_num_heads, "text_width/text_num_heads"),
        ):
            if width % heads:
                raise ConfigError(f"model.{name}: {width} is not divisible by {heads}")


def embed_patches(module: nn.Module, cfg: ModelConfig, images: jax.Array) -> jax.Array:
    """ViT input: patch embedding, a [CLS] token in front, learned positions. ``[B, 1+P, D]``.

    Called inside a compact ``__call__`` of ``module``; the parameter names (``patch_embed``,
    ``cls``, ``pos_embed``) are shared by every ViT here, so their weights are interchangeable.
    """
    p = cfg.patch_size
    x = nn.Conv(
        cfg.width,
        (p, p),
        strides=(p, p),
        padding="VALID",
        use_bias=cfg.patch_bias,
        name="patch_embed",
    )(images)
    x = x.reshape(x.shape[0], -1, cfg.width)
    cls = module.param("cls", nn.initializers.zeros, (1, 1, cfg.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.width)), x], axis=1)
    x = x + module.param("pos_embed", nn.initializers.normal(0.02), x.shape[1:])
    if cfg.pre_norm:
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="ln_pre")(x)
    return x


def vit_encoder(
    cfg: ModelConfig, lora_dropout: float = 0.0, return_hidden_states: bool = False
) -> Encoder:
    """The ViT's block stack (named ``encoder``), shared by every ViT here."""
    return Encoder(
        cfg.width,
        cfg.depth,
        cfg.num_heads,
        cfg.mlp_dim,
        lora_dropout,
        return_hidden_states,
        cfg.mlp_activation,
        cfg.layer_norm_eps,
        name="encoder",
    )


class ImageEncoder(nn.Module):
    """ViT: patch embedding, [CLS] + learned positions, pre-LN blocks, [CLS] pooling, projection."""

    config: ModelConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, images, task_weights=None, deterministic: bool = True):
        cfg = self.config
        x = embed_patches(self, cfg, images)
        x = vit_encoder(cfg, self.lora_dropout)(x, None, task_weights, deterministic)
        return nn.Dense(cfg.embed_dim, use_bias=False, name="proj")(x[:, 0])


class TextEncoder(nn.Module):
    """Transformer over token ids; position 0 holds the [CLS] token whose output is pooled."""

    config: ModelConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens, task_weights=None, deterministic: bool = True):
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.text_width, name="token_embed")(tokens)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), x.shape[1:])
        mask = tokens != PAD_ID
        x = Encoder(
            cfg.text_width,
            cfg.text_depth,
            cfg.text_num_heads,
            cfg.text_mlp_dim,
            self.lora_dropout,
            activation=cfg.mlp_activation,
            layer_norm_eps=cfg.layer_norm_eps,
            name="encoder",
        )(x, mask, task_weights, deterministic)
        return nn.Dense(cfg.embed_dim, use_bias=False, name="proj")(x[:, 0])


def _normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


class DualEncoder(nn.Module):
    """CLIP-style model. ``__call__`` returns (image_emb, text_emb, logit_scale).

    ``lora_dropout`` is applied to the input of every adapter (training only); it is a property
    of the adapters, not of the backbone, so it is not part of ``ModelConfig``.
    """

    config: ModelConfig
    lora_dropout: float = 0.0

    def setup(self):
        self.image = ImageEncoder(self.config, self.lora_dropout, name="image")
        self.text = TextEncoder(self.config, self.lora_dropout, name="text")
        self.logit_scale = self.param(
            "logit_scale",
            nn.initializers.constant(np.log(1.0 / self.config.init_temperature)),
            (),
        )

    def encode_image(self, images, task_weights=None, deterministic: bool = True):
        return _normalize(self.image(images, task_weights, deterministic))

    def encode_text(self, tokens, task_weights=None, deterministic: bool = True):
        return _normalize(self.text(tokens, task_weights, deterministic))

    def __call__(self, images, tokens, task_weights=None, deterministic: bool = True):
        return (
            self.encode_image(images, task_weights, deterministic),
            self.encode_text(tokens, task_weights, deterministic),
            self.logit_scale,
        )


def init_backbone(config: ModelConfig, rng: jax.Array) -> dict:
    """Random backbone parameters (the ``params`` collection only)."""
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, config.max_text_len), jnp.int32)
    return DualEncoder(config).init(rng, images, tokens)["params"]
