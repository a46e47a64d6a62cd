"""AdamW with a warmup-then-cosine schedule whose settings are data, not structure.

The peak learning rate and the step counts differ per task (and per stage), so they travel as
arrays in a ``Schedule`` rather than being baked into the compiled step: every stage of every
method reuses one compiled train step.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mslora_jax.models.decoder import SCANNED


@flax.struct.dataclass
class Schedule:
    peak_lr: jax.Array
    warmup_steps: jax.Array
    total_steps: jax.Array

    @classmethod
    def create(cls, peak_lr: float, total_steps: int, warmup_ratio: float) -> Schedule:
        warmup = math.ceil(warmup_ratio * total_steps)
        return cls(jnp.float32(peak_lr), jnp.int32(warmup), jnp.int32(total_steps))

    def __call__(self, step: jax.Array) -> jax.Array:
        """Linear warmup from 0, then cosine decay to 0 (optax.warmup_cosine_decay_schedule)."""
        step = step.astype(jnp.float32)
        warmup = self.warmup_steps.astype(jnp.float32)
        decay = jnp.maximum(self.total_steps.astype(jnp.float32) - warmup, 1.0)
        warm = self.peak_lr * step / jnp.maximum(warmup, 1.0)
        progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        cosine = 0.5 * self.peak_lr * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)


def _is_matrix(tree):
    """True for matrices; a scanned decoder's leaves count without their leading layer axis
    (its norm scales ``[layers, D]`` are vectors, as in the unrolled layout)."""

    def one(path, x):
        scanned = any(getattr(key, "key", None) == SCANNED for key in path)
        return jnp.ndim(x) - int(scanned) >= 2

    return jax.tree_util.tree_map_with_path(one, tree)


def make_optimizer(weight_decay: float, grad_clip_norm: float) -> optax.GradientTransformation:
    """AdamW without the learning rate (applied by the train step from its ``Schedule``).

    Weight decay is masked to matrices: scalars such as the temperature or learned regularizer
    weights are not decayed.
    """
    parts = []
    if grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    parts.append(optax.scale_by_adam())
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay, mask=_is_matrix))
    return optax.chain(*parts)


def scale_by_lr(updates, lr: jax.Array):
    return jax.tree.map(lambda u: -lr * u, updates)
