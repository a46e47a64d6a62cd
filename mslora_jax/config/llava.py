"""The generative model's settings (``config.llava``, read when ``model_kind="llava"``): the ViT,
the decoder, tokenizer, chat template, image normalization and the memory knobs.

Split from ``experiment.py`` so the LLaVA settings read on their own; the model's own config is
``LlavaSettings.model_config()``.
"""

from __future__ import annotations

import dataclasses

from mslora_jax.data.chat_template import ChatTemplate
from mslora_jax.errors import ConfigError
from mslora_jax.models.attention import ATTENTION_KERNELS
from mslora_jax.models.clip import ModelConfig, check_image_stats
from mslora_jax.models.decoder import DecoderConfig
from mslora_jax.models.llava import LlavaConfig

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LlavaSettings:
    """The generative model (``model_kind="llava"``): ViT sizes, its layer, and the decoder."""

    vision: ModelConfig = ModelConfig()
    vision_layer: int = -2
    decoder: DecoderConfig = DecoderConfig(
        vocab_size=512, width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=128, max_len=256
    )
    image_token_id: int = 4  # "<image>" in mslora_jax.data.conversation.SPECIAL_TOKENS
    # Centre non-square images on a square before resizing (LLaVA's image_aspect_ratio="pad")
    # instead of squashing them.
    pad_to_square: bool = False
    max_len: int = 160  # text tokens per training sequence (before the image tokens are spliced)
    max_new_tokens: int = 8  # generated answer length limit at evaluation
    tokenizer_file: str = ""  # a tokenizer.json; empty: build a byte-level BPE from the data
    tokenizer_vocab_size: int = 512  # for a built tokenizer
    # Conversation template (mslora_jax.data.chat_template): "vicuna_v1" (LLaVA v1) or
    # "mistral_instruct" (LLaVA-Med v1.5's); system line: None = the template's default.
    template: str = "vicuna_v1"
    system_prompt: str | None = None
    # Image normalization per RGB channel, on [0, 1] pixels: (x - mean) / std. None: x * 2 - 1
    # (what the backbones trained here use); a released CLIP tower needs CLIP's mean and std.
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    # Recompute decoder blocks in the backward pass instead of keeping their activations: what
    # makes a 7B decoder's LoRA training fit (experiments/bench_memory.py); same results.
    remat: bool = False
    # Decoder attention scores computed this many queries at a time (0: all at once). Same
    # values; the float32 [B, heads, L, L] scores of long sequences no longer fill memory.
    attention_chunk: int = 0
    # Attention kernel of the cache-free forward (training): None or "xla"
    # (jax.nn.dot_product_attention, any backend), "splash" (the Pallas flash kernel for TPUs:
    # no [B, H, L, L] scores, causal blocks skipped; needs TPU devices) or "splash_interpret"
    # (that kernel interpreted, any backend, slow: for checking). Generation with the KV cache
    # always uses XLA's. (None, not "xla", is the default so workdirs written before this key
    # existed still match.)
    attention_kernel: str | None = None
    # Frozen backbone and activations in "bfloat16" (half the memory; LoRA adapters, their
    # optimizer and the loss stay float32) or "float32".
    dtype: str = "float32"

    def __post_init__(self):
        ChatTemplate(self.template, self.system_prompt)  # raises for an unknown template
        if self.attention_chunk < 0:
            raise ConfigError(f"llava.attention_chunk must be >= 0, got {self.attention_chunk}")
        if self.attention_kernel is not None and self.attention_kernel not in ATTENTION_KERNELS:
            raise ConfigError(
                f"llava.attention_kernel={self.attention_kernel!r} is unknown; expected one of "
                f"{ATTENTION_KERNELS}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"llava.dtype={self.dtype!r} is unknown; expected one of {DTYPES}")
        mean, std = check_image_stats(self.image_mean, self.image_std, "llava")
        object.__setattr__(self, "image_mean", mean)  # lists from a ConfigDict -> tuples
        object.__setattr__(self, "image_std", std)

    def model_config(self) -> LlavaConfig:
        """The model's own config (the training-only fields above are left out)."""
        return LlavaConfig(
            vision=self.vision,
            vision_layer=self.vision_layer,
            decoder=self.decoder,
            image_token_id=self.image_token_id,
        )
