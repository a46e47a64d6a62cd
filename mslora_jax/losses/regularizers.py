"""Weight-space regularizers of MSLoRA-CR, as released with the paper.

Both act on stacked adapter trees: every leaf has a leading task axis ``T``; which tasks count is
given by ``[T]`` masks, so the current stage is data and never triggers a recompile.

Every LoRA factor is a matrix (A ``[r, in]``, B ``[out, r]``) in its last two axes; axes between
the task axis and those (a scanned decoder's layer axis) index more matrices. The released code
sees one tensor per layer, so each matrix counts as one P here too: norms are taken over the last
two axes and means run over every matrix, and a scanned adapter gives the same values as the
unrolled one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mslora_jax.models.lora_dense import LORA_A, LORA_B


def _safe_norm(x: jax.Array, axes) -> jax.Array:
    """Frobenius norm with a zero (not NaN) gradient where the norm is 0."""
    sq = jnp.sum(jnp.square(x), axis=axes)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _matrix_norms(x: jax.Array) -> jax.Array:
    """``[T, ..., m, n]`` -> ``[T, M]``: the Frobenius norm of each of the M matrices per slot."""
    return _safe_norm(x, (-2, -1)).reshape(x.shape[0], -1)


def adapter_similarities(active: Mapping, stacked: Mapping) -> jax.Array:
    """``s_t = mean over P of exp(-||P_active - stopgrad(P_t)||_F)`` for every slot t: ``[T]``.

    P ranges over every LoRA matrix (each A and each B of every adapted layer).
    """
    per_tensor = jax.tree.map(
        lambda p, s: jnp.exp(-_matrix_norms(p[None] - jax.lax.stop_gradient(s))),
        active,
        stacked,
    )
    return jnp.mean(jnp.concatenate(jax.tree.leaves(per_tensor), axis=1), axis=1)


def contrastive_regularizer(
    active: Mapping, stacked: Mapping, earlier_mask: jax.Array, same_modality: jax.Array
) -> jax.Array:
    """CR loss: ``sum over earlier tasks i of (same_modality(c, i) ? 1 - s_i : s_i)``.

    Pulls the current adapter toward earlier adapters of its modality, pushes it away from the
    others. ``earlier_mask``/``same_modality``: ``[T]`` booleans over the slots of ``stacked``.
    """
    s = adapter_similarities(active, stacked)
    per_task = jnp.where(same_modality, 1.0 - s, s)
    return jnp.sum(jnp.where(earlier_mask, per_task, 0.0))


def _layers(stacked: Mapping):
    """The ``{lora_a, lora_b}`` dicts of every adapted layer."""
    if LORA_A in stacked:
        return [stacked]
    return [layer for child in stacked.values() for layer in _layers(child)]


def _num_layers(stacked: Mapping) -> int:
    """Adapted layers, a scanned layer's every slice counted (its A's shape ``[T, ..., r, in]``)."""
    return sum(math.prod(layer[LORA_A].shape[1:-2]) for layer in _layers(stacked))


def orthogonality_per_slot(stacked: Mapping) -> jax.Array:
    """``[T]``: sum over layers of ``||A A^T - I_r||_F^2 + ||B^T B - I_r||_F^2`` per slot.

    A stage's frozen slots do not change during the stage, so their terms are computed once per
    stage (``AdapterContext.frozen_ortho``) rather than in every step."""
    total = 0.0
    for layer in _layers(stacked):
        a, b = layer[LORA_A], layer[LORA_B]
        eye = jnp.eye(a.shape[-2], dtype=a.dtype)
        aat = jnp.einsum("t...ri,t...si->t...rs", a, a) - eye
        btb = jnp.einsum("t...or,t...os->t...rs", b, b) - eye
        axes = tuple(range(1, aat.ndim))
        total = total + jnp.sum(jnp.square(aat), axis=axes) + jnp.sum(jnp.square(btb), axes)
    return total


def orthogonality_regularizer(stacked: Mapping, task_mask: jax.Array) -> jax.Array:
    """Mean over (A, B) pairs of the masked tasks and all layers of
    ``||A A^T - I_r||_F^2 + ||B^T B - I_r||_F^2`` (A: ``[T, r, in]``, B: ``[T, out, r]``)."""
    per_task = orthogonality_per_slot(stacked)
    count = _num_layers(stacked) * jnp.maximum(jnp.sum(task_mask.astype(jnp.float32)), 1.0)
    return jnp.sum(jnp.where(task_mask, per_task, 0.0)) / count


def orthogonality_with_active(
    frozen_terms: jax.Array, active: Mapping, task_mask: jax.Array, active_slot: jax.Array
) -> jax.Array:
    """``orthogonality_regularizer`` of a stack whose per-slot terms are ``frozen_terms``
    (``orthogonality_per_slot`` of the frozen stack, ``[T]``) with slot ``active_slot``
    replaced by the unstacked ``active`` adapter, without building that stack (the trained
    adapter's gradient never touches the other slots)."""
    one = jax.tree.map(lambda x: x[None], active)
    own = orthogonality_per_slot(one)[0]
    per_task = jnp.where(jnp.arange(frozen_terms.shape[0]) == active_slot, own, frozen_terms)
    count = _num_layers(one) * jnp.maximum(jnp.sum(task_mask.astype(jnp.float32)), 1.0)
    return jnp.sum(jnp.where(task_mask, per_task, 0.0)) / count
