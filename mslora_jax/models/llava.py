"""LLaVA-style generative model (LLaVA-Med v1.5): CLIP ViT tower, 2-layer MLP projector, causal LM.

Parameter tree (top level): ``vision_tower`` (the ViT of ``clip.ImageEncoder``: same names, no
``proj``, so a CLIP image tower's params load after dropping ``proj``), ``projector``
(``linear_1 -> GELU -> linear_2``, "mlp2x_gelu") and ``decoder`` (``models.decoder.Decoder``).
LoRA adapts only the decoder's seven projections per block (``LLAVA_LORA_TARGETS``); the vision
tower and projector are frozen as released with the paper and never see ``task_weights``.

Image features are the patch tokens (no [CLS]) of the ViT's hidden state ``vision_layer``
(Hugging Face ``hidden_states`` indexing: entry 0 is the embedding output, entry i the output of
block i-1; LLaVA uses -2, the penultimate block's output).

Splicing (``splice_image_tokens``): every sequence holds exactly one ``<image>`` placeholder id
(``image_token_id``, may be negative like LLaVA's -200: it is never looked up in the embedding).
It is replaced by the P projected patch tokens, so a ``[B, L]`` batch becomes ``[B, L + P - 1]``:
with the placeholder at index ``w``, text token ``t < w`` stays at ``t``, patch ``p`` lands at
``w + p`` and text token ``t > w`` moves to ``t + P - 1``. Padding stays where it was (left padding
for generation, right padding for training). The spliced ``attention_mask`` is True on the
patches (the placeholder's value), the spliced ``loss_mask`` False on them, and the spliced
``input_ids`` hold ``image_token_id`` there, so next-token labels keep the convention of
``mslora_jax.data.conversation``: compare ``logits[:, :-1]`` with ``input_ids[:, 1:]`` under
``loss_mask[:, 1:]``, all taken from the spliced inputs. Position ids then come from the spliced
mask (``positions_from_mask``), so the patches take P consecutive positions.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mslora_jax.errors import ConfigError, DataError
from mslora_jax.models.clip import ModelConfig, embed_patches, vit_encoder
from mslora_jax.models.decoder import (
    Decoder,
    DecoderConfig,
    positions_from_mask,
    scan_blocks,
    unrolled_config,
)

# LoRA targets of the LLaVA model: the decoder's q, k, v, o, gate, up, down in every block
# (``decoder/blocks/...`` scanned, one path for all layers; ``decoder/block_{i}/...`` unrolled).
LLAVA_LORA_TARGETS = (
    r"^decoder/(blocks|block_\d+)/attn/(q|k|v|o)$",
    r"^decoder/(blocks|block_\d+)/mlp/(gate|up|down)$",
)
LLAVA_IMAGE_TOKEN_INDEX = -200  # LLaVA's IMAGE_TOKEN_INDEX


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlavaConfig:
    """ViT (a ``clip.ModelConfig``, text fields unused), its layer, the decoder, the <image> id."""

    vision: ModelConfig
    vision_layer: int = -2
    decoder: DecoderConfig
    image_token_id: int

    def __post_init__(self):
        depth = self.vision.depth
        if not -(depth + 1) <= self.vision_layer <= depth:
            raise ConfigError(
                f"llava.vision_layer={self.vision_layer} is out of range for a ViT of depth "
                f"{depth} (hidden states -{depth + 1}..{depth})"
            )
        if self.image_token_id >= self.decoder.vocab_size:
            raise ConfigError(
                f"llava.image_token_id={self.image_token_id} is not below "
                f"decoder.vocab_size={self.decoder.vocab_size}"
            )

    @property
    def num_patches(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2

    @classmethod
    def llava_med_v15(cls) -> LlavaConfig:
        """LLaVA-Med v1.5 sizes: CLIP ViT-L/14 at 336 px (576 patches), Mistral-7B."""
        vision = ModelConfig(
            image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096
        )
        return cls(
            vision=vision,
            decoder=DecoderConfig.mistral_7b(),
            image_token_id=LLAVA_IMAGE_TOKEN_INDEX,
        )


class VisionTower(nn.Module):
    """``clip.ImageEncoder``'s ViT returning the patch tokens ``[B, P, width]`` of one hidden state.

    Set ``pre_norm=True, mlp_activation="quick_gelu", layer_norm_eps=1e-5`` in its
    ``ModelConfig`` for the layout of OpenAI's released CLIP ViTs (LLaVA's vision tower).
    """

    config: ModelConfig
    layer: int = -2

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        # Same modules and names as clip.ImageEncoder (see test_vision_tower_matches_image_encoder).
        x = embed_patches(self, cfg, images)
        # No task_weights: the tower is never adapted.
        _, hidden = vit_encoder(cfg, return_hidden_states=True)(x, None, None)
        return hidden[self.layer][:, 1:]  # drop [CLS]


class Projector(nn.Module):
    """``linear_2(gelu(linear_1(x)))`` (LLaVA's mlp2x_gelu, exact GELU); plain Dense, frozen."""

    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.gelu(nn.Dense(self.width, name="linear_1")(x), approximate=False)
        return nn.Dense(self.width, name="linear_2")(x)


class SplicedInputs(NamedTuple):
    """Decoder inputs after splicing, all ``[B, L + P - 1, ...]`` (see the module docstring)."""

    embeds: jax.Array  # [B, L+P-1, D]
    input_ids: jax.Array  # [B, L+P-1], image_token_id on the patches
    attention_mask: jax.Array  # [B, L+P-1] bool
    loss_mask: jax.Array  # [B, L+P-1] bool, False on the patches
    image_mask: jax.Array  # [B, L+P-1] bool, True exactly on the patches


def check_image_tokens(input_ids, image_token_id: int) -> None:
    """DataError unless every row of (concrete) ``input_ids`` has exactly one placeholder."""
    counts = np.sum(np.asarray(input_ids) == image_token_id, axis=1)
    bad = np.flatnonzero(counts != 1)
    if bad.size:
        raise DataError(
            f"input_ids row {int(bad[0])} has {int(counts[bad[0]])} <image> tokens "
            f"(id {image_token_id}); every sequence needs exactly one"
        )


def splice_image_tokens(
    input_embeds: jax.Array,
    input_ids: jax.Array,
    image_tokens: jax.Array,
    attention_mask: jax.Array,
    loss_mask: jax.Array | None = None,
    *,
    image_token_id: int,
) -> SplicedInputs:
    """Replaces each row's ``<image>`` embedding by its ``image_tokens`` ``[B, P, D]``.

    ``input_embeds``: ``[B, L, D]``; ``input_ids``, ``attention_mask``, ``loss_mask``: ``[B, L]``.
    Concrete ``input_ids`` are checked (``check_image_tokens``); under ``jit`` a row without
    exactly one placeholder is spliced at its first one (or at 0 when it has none).
    """
    if not isinstance(input_ids, jax.core.Tracer):
        check_image_tokens(input_ids, image_token_id)
    length, num_patches = input_ids.shape[1], image_tokens.shape[1]
    if loss_mask is None:
        loss_mask = jnp.zeros(input_ids.shape, bool)
    where = jnp.argmax(input_ids == image_token_id, axis=1)[:, None]  # [B, 1]
    j = jnp.arange(length + num_patches - 1)[None]  # [1, L+P-1] output index
    is_image = (j >= where) & (j < where + num_patches)  # [B, L+P-1]
    text_src = jnp.clip(jnp.where(j < where, j, j - num_patches + 1), 0, length - 1)
    patch_src = jnp.clip(j - where, 0, num_patches - 1)

    def take(x, idx):  # x: [B, N, ...], idx: [B, M] -> [B, M, ...]
        idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=1)

    embeds = jnp.where(
        is_image[..., None],
        take(image_tokens.astype(input_embeds.dtype), patch_src),
        take(input_embeds, text_src),
    )
    attention_mask = attention_mask.astype(bool)
    placeholder_mask = jnp.take_along_axis(attention_mask, where, axis=1)  # [B, 1]
    return SplicedInputs(
        embeds=embeds,
        input_ids=jnp.where(is_image, image_token_id, take(input_ids, text_src)),
        attention_mask=jnp.where(is_image, placeholder_mask, take(attention_mask, text_src)),
        loss_mask=~is_image & take(loss_mask.astype(bool), text_src),
        image_mask=is_image,
    )


class Llava(nn.Module):
    """``__call__(images, input_ids, attention_mask, task_weights) -> logits [B, L+P-1, V]``.

    ``remat`` rematerializes the decoder blocks in the backward pass (see ``Decoder``); the
    frozen vision tower and projector need no backward pass.
    """

    config: LlavaConfig
    lora_dropout: float = 0.0
    remat: bool = False
    query_chunk: int = 0  # decoder attention this many queries at a time (``attention.attend``)
    attention_kernel: str = "xla"  # ``attention.ATTENTION_KERNELS``

    def setup(self):
        cfg = self.config
        self.vision_tower = VisionTower(cfg.vision, cfg.vision_layer)
        self.projector = Projector(cfg.decoder.width)
        self.decoder = Decoder(
            cfg.decoder, self.lora_dropout, self.remat, self.query_chunk, self.attention_kernel
        )

    def encode_images(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` images -> ``[B, P, D]`` projected patch tokens."""
        return self.projector(self.vision_tower(images))

    def prepare_inputs(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        loss_mask: jax.Array | None = None,
    ) -> SplicedInputs:
        """Embeds the text, encodes the images and splices them in (see the module docstring)."""
        cfg = self.config
        spliced_len = input_ids.shape[1] + cfg.num_patches - 1
        if spliced_len > cfg.decoder.max_len:
            raise ConfigError(
                f"{input_ids.shape[1]} tokens + {cfg.num_patches - 1} extra image tokens = "
                f"{spliced_len}, over decoder.max_len={cfg.decoder.max_len}"
            )
        is_image = input_ids == cfg.image_token_id
        text_embeds = self.decoder.embed(jnp.where(is_image, 0, input_ids))
        return splice_image_tokens(
            text_embeds,
            input_ids,
            self.encode_images(images),
            attention_mask,
            loss_mask,
            image_token_id=cfg.image_token_id,
        )

    def forward_spliced(
        self,
        inputs: SplicedInputs,
        task_weights: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Decoder logits ``[B, L+P-1, V]`` for already spliced inputs (no cache)."""
        return self.head(self.hidden_spliced(inputs, task_weights, deterministic))

    def hidden_spliced(
        self,
        inputs: SplicedInputs,
        task_weights: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """The decoder's last hidden states ``[B, L+P-1, D]`` (before its final norm); ``head``
        turns any gathered subset of them into logits."""
        positions = positions_from_mask(inputs.attention_mask)
        hidden, _ = self.decoder.hidden_states(
            inputs.embeds, positions, inputs.attention_mask, task_weights, None, deterministic
        )
        return hidden

    def head(self, hidden: jax.Array) -> jax.Array:
        """``[..., D]`` hidden states -> ``[..., V]`` logits (final norm, ``lm_head``)."""
        return self.decoder.logits(hidden)

    def __call__(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        task_weights: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        inputs = self.prepare_inputs(images, input_ids, attention_mask)
        return self.forward_spliced(inputs, task_weights, deterministic)


def init_llava(config: LlavaConfig, rng: jax.Array) -> dict:
    """Random LLaVA parameters (the ``params`` collection only).

    A scanned decoder gets the unrolled layout's draws, stacked (``scan_blocks``): one seed gives
    the same weights in both layouts, so ``decoder.scan_layers`` never changes a result."""
    size = config.vision.image_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    ids = jnp.full((1, 1), config.image_token_id, jnp.int32)
    unrolled = dataclasses.replace(config, decoder=unrolled_config(config.decoder))

    def init(key):
        params = Llava(unrolled).init(key, images, ids, jnp.ones((1, 1), bool))["params"]
        return scan_blocks(params) if config.decoder.scan_layers else params

    return jax.jit(init)(rng)  # one compiled program instead of many eager ops


def decoder_variables(variables: dict) -> dict:
    """The decoder's slice of LLaVA variables (``params`` and, if present, ``lora``)."""
    return {name: tree["decoder"] for name, tree in variables.items() if "decoder" in tree}
