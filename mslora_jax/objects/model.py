"""The region embedder: the dual encoder's image tower (its weights under ``image``, frozen and
adapted by LoRA like any tower here) with MS-UGCML's heads on its projected embedding: for each
scale group a small head (512-d in the paper, the one retrieval uses for group 0) and a large
one (1024-d, the teacher's pseudo-labels and the self-distillation target).

``embed_groups`` returns, per group, the small and large embeddings of a batch of crops;
``retrieval_embedding`` the unit small embedding of group 0.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mslora_jax.models.clip import ImageEncoder, ModelConfig
from mslora_jax.models.pixels import normalize_images


class RegionEmbedder(nn.Module):
    config: ModelConfig
    small_dim: int = 512
    large_dim: int = 1024
    groups: int = 1
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, images, task_weights=None, deterministic: bool = True):
        """``[groups, 2]`` nested list: per group, (small ``[B, small_dim]``, large ``[B,
        large_dim]``), not normalised (STML normalises what it needs)."""
        cfg = self.config
        pixels = normalize_images(images, cfg.image_mean, cfg.image_std)
        tower = ImageEncoder(cfg, self.lora_dropout, name="image")
        features = tower(pixels, task_weights, deterministic)
        return [
            (
                nn.Dense(self.small_dim, name=f"group_{g}_small")(features),
                nn.Dense(self.large_dim, name=f"group_{g}_large")(features),
            )
            for g in range(self.groups)
        ]


def init_heads(model: RegionEmbedder, image_params: dict, rng: jax.Array) -> dict:
    """Fresh heads for ``model`` over a trained image tower (``image_params``: the dual
    encoder's ``params["image"]``): ``{"image": image_params, "group_g_small": ..., ...}``."""
    size = model.config.image_size
    images = jnp.zeros((1, size, size, 3), jnp.uint8)
    fresh = model.init(rng, images)["params"]
    return {**fresh, "image": image_params}


def retrieval_embedding(model: RegionEmbedder, variables: dict, images, task_weights=None):
    """The unit embedding retrieval uses: group 0's small head."""
    small = model.apply(variables, images, task_weights)[0][0]
    return small / jnp.maximum(jnp.linalg.norm(small, axis=-1, keepdims=True), 1e-12)
