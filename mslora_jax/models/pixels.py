"""Pixels as the models read them: uint8 images normalised on device, so hosts ship bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from mslora_jax.models.clip import DualEncoder


def normalize_images(images: jax.Array, mean=None, std=None) -> jax.Array:
    """uint8 [0, 255] -> float32; done on device so hosts ship bytes.

    Default: [-1, 1]. With per-channel ``mean`` and ``std`` (on [0, 1] pixels, e.g. CLIP's):
    ``(x / 255 - mean) / std``.
    """
    if mean is None:
        return images.astype(jnp.float32) / 127.5 - 1.0
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def model_images(model: DualEncoder, images: jax.Array) -> jax.Array:
    """uint8 images -> the dual encoder's input, normalized as its config says."""
    return normalize_images(images, model.config.image_mean, model.config.image_std)
