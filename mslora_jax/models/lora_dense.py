"""A dense layer that adds the deltas of a stack of per-task LoRA adapters.

The adapters are not parameters of this module: they live in the separate variable collection
``"lora"`` (``lora_a``: ``[T, r, in]``, ``lora_b``: ``[T, out, r]``, a stacked task axis), so the
backbone ``params`` stay untouched and a layer that is not targeted simply has no entry there.
Which tasks contribute is data, not structure: ``task_weights`` (``[T]``) is the task mask times
each task's scaling ``alpha / r``, so switching the active set never changes a shape and never
recompiles.

    y = x W + b + sum_t task_weights[t] * (x A_t^T) B_t^T  [+ w (x A^T) B^T]

The bracketed term is the *trainable* adapter while a task is trained: the collection
``"lora_active"`` holds one unstacked ``{lora_a [r, in], lora_b [out, r], weight []}`` per layer,
so the backward pass differentiates one ``r``-row product per layer, never the ``[T, ...]``
stack (whose slot for that task then has weight 0; see ``train.adapter_loss``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

LORA_COLLECTION = "lora"
LORA_ACTIVE = "lora_active"  # the one adapter being trained (unstacked), with its weight
LORA_WEIGHT = "weight"
LORA_A = "lora_a"
LORA_B = "lora_b"


class LoraDense(nn.Module):
    """A dense layer (``kernel``: ``[in, out]``, ``bias``) plus the ``lora`` adapters' deltas."""

    features: int
    use_bias: bool = True
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(
        self, x: jax.Array, task_weights: jax.Array | None = None, deterministic: bool = True
    ) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32
        )
        y = x @ kernel.astype(x.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        stacked = task_weights is not None and self.has_variable(LORA_COLLECTION, LORA_A)
        active = self.has_variable(LORA_ACTIVE, LORA_A)
        if not (stacked or active):
            return y
        if self.lora_dropout > 0.0 and not deterministic:
            x = nn.Dropout(self.lora_dropout)(x, deterministic=False)  # one mask, every adapter
        if stacked:
            lora_a = self.get_variable(LORA_COLLECTION, LORA_A)  # [T, r, in]
            lora_b = self.get_variable(LORA_COLLECTION, LORA_B)  # [T, out, r]
            hidden = jnp.einsum("...i,tri->...tr", x, lora_a.astype(x.dtype))
            hidden = hidden * task_weights.astype(x.dtype)[:, None]
            y = y + jnp.einsum("...tr,tor->...o", hidden, lora_b.astype(x.dtype))
        if active:
            lora_a = self.get_variable(LORA_ACTIVE, LORA_A)  # [r, in]
            lora_b = self.get_variable(LORA_ACTIVE, LORA_B)  # [out, r]
            weight = self.get_variable(LORA_ACTIVE, LORA_WEIGHT).astype(x.dtype)
            hidden = jnp.einsum("...i,ri->...r", x, lora_a.astype(x.dtype)) * weight
            y = y + jnp.einsum("...r,or->...o", hidden, lora_b.astype(x.dtype))
        return y
