"""A CLIP-style dual encoder: a ViT image tower and a transformer text tower over token ids.

Both towers are pure Flax modules used through ``apply``; their attention and MLP layers are
``LoraDense`` so per-task adapters (the ``lora`` collection) can be added to either tower.
Embeddings are L2-normalised; ``logit_scale`` is the log of the inverse temperature.

The text tower is chosen by ``ModelConfig.text_tower`` from ``TEXT_TOWERS``: this repo's own
(bidirectional, [CLS] pooled, hashed-word ids) or ``"clip"``, the released CLIP text transformer
(causal, pooled at the end-of-text token, BPE ids from the backbone folder's ``tokenizer.json``)
or ``"bert"``, a BERT-family encoder (``models.bert``: post-LN, padding masked, mean/[CLS]/pooler
pooled, WordPiece ids from the backbone folder's ``tokenizer.json``), as in BiomedCLIP-style
pairings of a CLIP vision tower with a BERT text tower.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mslora_jax.models.bert import POOLINGS, BertTextConfig, BertTextEncoder
from mslora_jax.models.transformer import ACTIVATIONS, Encoder

PAD_ID = 0  # token id 0 is padding; see mslora_jax.data.tokenizer (kept equal)
HASHED = "hashed"  # the default text tower's name (stored as None, see ModelConfig.text_tower)
# HF CLIP configs written before transformers PR #24773 say eos_token_id=2; HF then pools at the
# largest id (the end-of-text token has CLIP's largest id), and so do we.
LEGACY_EOS_ID = 2


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
    # The text tower, a key of TEXT_TOWERS. None (or "hashed", stored as None so backbones and
    # workdirs written before this key still match): bidirectional, [CLS] pooled, hashed words.
    # "clip": the released CLIP text tower (causal, pooled at text_eos_id, a tokenizer.json).
    text_tower: str | None = None
    # "clip" tower: rows of its position table (HF max_position_embeddings; prompts are padded
    # to max_text_len <= this), and the end-of-text id it pools at (HF eos_token_id; 2: argmax).
    text_positions: int | None = None
    text_eos_id: int | None = None
    # "bert" tower (with text_positions, its position table's rows): its pooling (one of
    # models.bert.POOLINGS), token-type table rows, and its own activation and LayerNorm epsilon
    # (None: mlp_activation / layer_norm_eps, the vision tower's).
    text_pooling: str | None = None
    text_type_vocab_size: int | None = None
    text_activation: str | None = None
    text_layer_norm_eps: float | None = None
    # Image normalization per RGB channel, on [0, 1] pixels: (x - mean) / std (a released CLIP's
    # mean and std). None: x * 2 - 1, what the backbones trained here use.
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None

    def __post_init__(self):
        from mslora_jax.errors import ConfigError

        if self.text_tower == HASHED:
            object.__setattr__(self, "text_tower", None)
        if self.text_tower is not None and self.text_tower not in TEXT_TOWERS:
            raise ConfigError(
                f"model.text_tower={self.text_tower!r} is unknown; expected one of "
                f"{[HASHED, *TEXT_TOWERS]}"
            )
        _check_text_tower_fields(self)
        mean, std = check_image_stats(self.image_mean, self.image_std, "model")
        object.__setattr__(self, "image_mean", mean)  # lists from a ConfigDict -> tuples
        object.__setattr__(self, "image_std", std)
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


# The text tower fields each tower reads, and those it cannot do without.
_TOWER_FIELDS = {
    "clip": ("text_positions", "text_eos_id"),
    "bert": (
        "text_positions",
        "text_pooling",
        "text_type_vocab_size",
        "text_activation",
        "text_layer_norm_eps",
    ),
}
_REQUIRED_FIELDS = {
    "clip": ("text_positions", "text_eos_id"),
    "bert": ("text_positions", "text_pooling", "text_type_vocab_size"),
}


def _check_text_tower_fields(cfg: ModelConfig) -> None:
    """ConfigError naming the key: a field the tower needs is None, one it does not read is set,
    or a value is out of range."""
    from mslora_jax.errors import ConfigError

    tower = cfg.text_tower
    name = HASHED if tower is None else tower
    needed = [f for f in _REQUIRED_FIELDS.get(tower, ()) if getattr(cfg, f) is None]
    if needed:
        raise ConfigError(
            f"model.text_tower={name!r} needs {', '.join('model.' + f for f in needed)} "
            "(written by mslora-jax convert-clip into the backbone's meta.json)"
        )
    every = {f for fields in _TOWER_FIELDS.values() for f in fields}
    unread = sorted(
        f for f in every - set(_TOWER_FIELDS.get(tower, ())) if getattr(cfg, f) is not None
    )
    if unread:
        raise ConfigError(
            f"model.text_tower={name!r} does not read {', '.join('model.' + f for f in unread)}; "
            "leave them None"
        )
    if cfg.text_positions is not None and cfg.max_text_len > cfg.text_positions:
        raise ConfigError(
            f"model.max_text_len={cfg.max_text_len} exceeds "
            f"model.text_positions={cfg.text_positions} (the position table's rows)"
        )
    if tower != "bert":
        return
    if cfg.text_pooling not in POOLINGS:
        raise ConfigError(
            f"model.text_pooling={cfg.text_pooling!r} is unknown; expected one of {list(POOLINGS)}"
        )
    if not isinstance(cfg.text_type_vocab_size, int) or cfg.text_type_vocab_size < 1:
        raise ConfigError(
            f"model.text_type_vocab_size must be a positive integer, got "
            f"{cfg.text_type_vocab_size!r}"
        )
    if cfg.text_activation is not None and cfg.text_activation not in ACTIVATIONS:
        raise ConfigError(
            f"model.text_activation={cfg.text_activation!r} is unknown; expected one of "
            f"{sorted(ACTIVATIONS)}"
        )
    if cfg.text_layer_norm_eps is not None and not cfg.text_layer_norm_eps > 0:
        raise ConfigError(f"model.text_layer_norm_eps must be > 0, got {cfg.text_layer_norm_eps}")


def check_image_stats(mean, std, where: str) -> tuple[tuple | None, tuple | None]:
    """``(mean, std)`` as tuples of 3 floats (or both None); ConfigError naming ``where``."""
    from mslora_jax.errors import ConfigError

    if (mean is None) != (std is None):
        raise ConfigError(f"{where}.image_mean and {where}.image_std must be set together")
    if mean is None:
        return None, None
    try:
        as_tuples = tuple(tuple(float(v) for v in x) for x in (mean, std))
    except (TypeError, ValueError):
        as_tuples = ((), ())
    if any(len(x) != 3 for x in as_tuples):
        raise ConfigError(
            f"{where}.image_mean and image_std need 3 numbers (RGB), got {mean!r} and {std!r}"
        )
    if min(as_tuples[1]) <= 0:
        raise ConfigError(f"{where}.image_std must be > 0, got {std}")
    return as_tuples


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


def text_encoder(cfg: ModelConfig, lora_dropout: float, causal: bool = False) -> Encoder:
    """The pre-LN block stack (named ``encoder``) of the hashed and CLIP text towers."""
    return Encoder(
        cfg.text_width,
        cfg.text_depth,
        cfg.text_num_heads,
        cfg.text_mlp_dim,
        lora_dropout,
        activation=cfg.mlp_activation,
        layer_norm_eps=cfg.layer_norm_eps,
        causal=causal,
        name="encoder",
    )


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
        x = text_encoder(cfg, self.lora_dropout)(x, mask, task_weights, deterministic)
        return nn.Dense(cfg.embed_dim, use_bias=False, name="proj")(x[:, 0])


def eos_positions(tokens: jax.Array, eos_id: int) -> jax.Array:
    """``[B]`` int: where HF's CLIPTextTransformer pools each row of ``tokens`` ``[B, L]``.

    The first ``eos_id``; for a legacy config (``eos_id == LEGACY_EOS_ID``) the first largest id
    (CLIP's end-of-text token is its vocabulary's last). A row without ``eos_id`` pools at 0, as
    HF's argmax over an all-False row does (only padding rows of a class table have none).
    """
    if eos_id == LEGACY_EOS_ID:
        return jnp.argmax(tokens, axis=-1)
    return jnp.argmax(tokens == eos_id, axis=-1)


class ClipTextEncoder(nn.Module):
    """CLIP's text tower: token + learned positions, causal pre-LN blocks, final LayerNorm,
    the end-of-text token's output projected (HF ``CLIPTextModelWithProjection``)."""

    config: ModelConfig
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens, task_weights=None, deterministic: bool = True):
        cfg = self.config
        length = tokens.shape[1]
        if length > cfg.text_positions:
            raise ValueError(f"{length} tokens but the position table has {cfg.text_positions}")
        x = nn.Embed(cfg.vocab_size, cfg.text_width, name="token_embed")(tokens)
        pos = self.param(
            "pos_embed", nn.initializers.normal(0.01), (cfg.text_positions, cfg.text_width)
        )
        x = x + pos[:length]
        # No padding mask: padding follows the end-of-text token, which (causal) never sees it.
        x = text_encoder(cfg, self.lora_dropout, causal=True)(x, None, task_weights, deterministic)
        pooled = x[jnp.arange(x.shape[0]), eos_positions(tokens, cfg.text_eos_id)]
        return nn.Dense(cfg.embed_dim, use_bias=False, name="proj")(pooled)


def bert_text_config(config: ModelConfig) -> BertTextConfig:
    """The BERT tower of a ``text_tower="bert"`` config, projected to ``embed_dim``."""
    return BertTextConfig(
        vocab_size=config.vocab_size,
        width=config.text_width,
        depth=config.text_depth,
        num_heads=config.text_num_heads,
        mlp_dim=config.text_mlp_dim,
        max_positions=config.text_positions,
        type_vocab_size=config.text_type_vocab_size,
        layer_norm_eps=config.text_layer_norm_eps or config.layer_norm_eps,
        activation=config.text_activation or config.mlp_activation,
        pooling=config.text_pooling,
        embed_dim=config.embed_dim,
    )


def bert_text_fields(bert: BertTextConfig) -> dict:
    """The ``ModelConfig`` text fields of the BERT tower ``bert`` (``bert_text_config``'s
    inverse; ``embed_dim`` is the dual encoder's own and not among them)."""
    return dict(
        text_tower="bert",
        vocab_size=bert.vocab_size,
        text_width=bert.width,
        text_depth=bert.depth,
        text_num_heads=bert.num_heads,
        text_mlp_dim=bert.mlp_dim,
        text_positions=bert.max_positions,
        text_eos_id=None,
        text_type_vocab_size=bert.type_vocab_size,
        text_layer_norm_eps=bert.layer_norm_eps,
        text_activation=bert.activation,
        text_pooling=bert.pooling,
    )


def bert_tower(config: ModelConfig, lora_dropout: float = 0.0) -> BertTextEncoder:
    """The ``"bert"`` text tower: pooled BERT output, projected to ``embed_dim`` by ``proj``."""
    return BertTextEncoder(bert_text_config(config), lora_dropout)


# Text towers by ``ModelConfig.text_tower`` (None: the hashed-word tower). Each entry builds a
# module from (config, lora_dropout) whose call is ``(tokens [B, L] int32, task_weights=None,
# deterministic=True) -> [B, embed_dim]`` (not normalized); DualEncoder names it ``text``. Towers
# other than the hashed one read their ids from the backbone folder's tokenizer.json
# (``mslora_jax.data.prompt_tokenizer``).
TEXT_TOWERS = {
    "clip": ClipTextEncoder,
    "bert": bert_tower,
}
# Towers whose attention masks padding as ``tokens != PAD_ID``: their tokenizer must pad with
# PAD_ID and a prompt holding that id is refused (``data.prompt_tokenizer``). CLIP's tower needs
# no mask (causal, padding follows the pooled end-of-text token), so it may pad with any id.
PADDING_MASKED_TOWERS = ("bert",)


def text_tower(config: ModelConfig, lora_dropout: float = 0.0) -> nn.Module:
    """The text tower ``config.text_tower`` names (unnamed: the caller's attribute names it)."""
    factory = TextEncoder if config.text_tower is None else TEXT_TOWERS[config.text_tower]
    return factory(config, lora_dropout)


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
        self.text = text_tower(self.config, self.lora_dropout)
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
