"""Weight-space regularizers of MSLoRA-CR, as released with the paper.

Both act on stacked adapter trees: every leaf has a leading task axis ``T``; which tasks count is
given by ``[T]`` masks, so the current stage is data and never triggers a recompile.

Every LoRA factor is a matrix (A ``[r, in]``, B ``[out, r]``) in its last two axes; axes between
the task axis and those (a scanned decoder's layer axis) index more matrices. The released code
sees one tensor per layer, so each matrix counts as one P here too: norms are taken over the last
two axes and means run over every matrix, and a scanned adapter gives the same values as the
unrolled one.

The CR distance has three variants (``regularizer.cr_distance``, ``CR_DISTANCES``):

- ``released``: ``d_P = ||P_c - P_t||_F`` for every matrix P (each A, each B), as released.
- ``normalized``: ``d_P = ||P_c - P_t||_F / sqrt(numel(P))``, the RMS entry difference, so a
  matrix's distance does not grow with its size. (Two kaiming-uniform A's, U(+-1/sqrt(in)), lie
  about ``sqrt(2r/3)`` apart: 6.5 at r = 64, where the released exp(-d) is about 1.5e-3.)
- ``delta_w``: one ``d = ||s B_c A_c - s B_t A_t||_F`` per adapted layer (s = alpha / rank), the
  distance between the weight updates the adapters make, blind to the factors'
  ``B A = (B R)(R^-1 A)`` ambiguity. A plain Frobenius norm: its scale grows with the layer's
  size and with alpha.

Each gives ``s_t = mean exp(-d)`` over its terms (matrices, or layers for ``delta_w``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp

from mslora_jax.models.lora_dense import LORA_A, LORA_B

CR_DISTANCES = ("released", "normalized", "delta_w")


def _safe_sqrt(sq: jax.Array) -> jax.Array:
    """``sqrt(max(sq, 0))`` with a zero (not NaN or infinite) gradient where ``sq <= 0``."""
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _safe_norm(x: jax.Array, axes) -> jax.Array:
    """Frobenius norm with a zero (not NaN) gradient where the norm is 0."""
    return _safe_sqrt(jnp.sum(jnp.square(x), axis=axes))


def _matrix_norms(x: jax.Array) -> jax.Array:
    """``[T, ..., m, n]`` -> ``[T, M]``: the Frobenius norm of each of the M matrices per slot."""
    return _safe_norm(x, (-2, -1)).reshape(x.shape[0], -1)


def layer_pairs(active: Mapping, stacked: Mapping) -> Iterator[tuple[Mapping, Mapping]]:
    """The ``({lora_a, lora_b}, stacked {lora_a, lora_b})`` pair of every adapted layer."""
    if LORA_A in active:
        yield active, stacked
        return
    for key, child in active.items():
        yield from layer_pairs(child, stacked[key])


def _product_sq_norm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``||B A||_F^2 = tr((B^T B)(A A^T))`` over the last two axes, from ``r x r`` Grams (both
    symmetric, so the trace is the sum of their elementwise product)."""
    gram_b = jnp.einsum("...or,...os->...rs", b, b)
    gram_a = jnp.einsum("...ri,...si->...rs", a, a)
    return jnp.sum(gram_b * gram_a, axis=(-2, -1))


def _delta_w_distances(active: Mapping, stacked: Mapping, scaling: float) -> jax.Array:
    """``[T, L]``: ``||s B_c A_c - s B_t A_t||_F`` of each adapted layer (each scanned slice).

    Never forms an ``[out, in]`` product: with ``||B A||_F^2 = tr((B^T B)(A A^T))``,
    ``||X||^2 = s^2 (||B_c A_c||^2 + ||B_t A_t||^2 - 2 tr((B_t^T B_c)(A_c A_t^T)))``, all from
    ``r x r`` matrices. The difference cancels: in float32 ``||X||^2`` carries an error of about
    1e-7 of ``||s B A||^2``, so near-identical adapters can read a distance of up to about
    3e-4 ``||s B A||_F`` rather than 0.
    """
    out = []
    for act, stk in layer_pairs(active, stacked):
        a_c, b_c = act[LORA_A], act[LORA_B]  # [..., r, in], [..., out, r]
        a_t, b_t = stk[LORA_A], stk[LORA_B]  # [T, ..., r, in], [T, ..., out, r]
        own_c, own_t = _product_sq_norm(a_c, b_c), _product_sq_norm(a_t, b_t)
        gram_b = jnp.einsum("t...or,...os->t...rs", b_t, b_c)  # B_t^T B_c: [T, ..., r, r]
        gram_a = jnp.einsum("...si,t...ri->t...sr", a_c, a_t)  # A_c A_t^T: [T, ..., r, r]
        cross = jnp.einsum("t...rs,t...sr->t...", gram_b, gram_a)
        sq = scaling**2 * (own_c[None] + own_t - 2.0 * cross)
        # Rounding can leave sq slightly below 0; _safe_sqrt reads that as 0 (zero gradient).
        out.append(_safe_sqrt(sq).reshape(sq.shape[0], -1))
    return jnp.concatenate(out, axis=1)


def adapter_similarities(
    active: Mapping, stacked: Mapping, distance: str = "released", scaling: float = 1.0
) -> jax.Array:
    """``s_t = mean exp(-d_t)`` for every slot t: ``[T]``, ``d_t`` the CR ``distance``.

    ``released`` (default): mean over P of ``exp(-||P_active - stopgrad(P_t)||_F)``, P ranging
    over every LoRA matrix (each A and each B of every adapted layer); ``normalized`` divides
    each distance by ``sqrt(numel(P))``; ``delta_w`` compares ``scaling * B A`` per layer.
    ``scaling`` (alpha / rank) is read by ``delta_w`` only.
    """
    if distance not in CR_DISTANCES:
        raise ValueError(f"unknown CR distance {distance!r}; expected one of {CR_DISTANCES}")
    stacked = jax.lax.stop_gradient(stacked)
    if distance == "delta_w":
        return jnp.mean(jnp.exp(-_delta_w_distances(active, stacked, scaling)), axis=1)

    def per_matrix(p, s):
        d = _matrix_norms(p[None] - s)
        if distance == "normalized":
            d = d / math.sqrt(p.shape[-2] * p.shape[-1])
        return jnp.exp(-d)

    per_tensor = jax.tree.map(per_matrix, active, stacked)
    return jnp.mean(jnp.concatenate(jax.tree.leaves(per_tensor), axis=1), axis=1)


def contrastive_regularizer(
    active: Mapping,
    stacked: Mapping,
    earlier_mask: jax.Array,
    same_modality: jax.Array,
    distance: str = "released",
    scaling: float = 1.0,
) -> jax.Array:
    """CR loss: ``sum over earlier tasks i of (same_modality(c, i) ? 1 - s_i : s_i)``.

    Pulls the current adapter toward earlier adapters of its modality, pushes it away from the
    others. ``earlier_mask``/``same_modality``: ``[T]`` booleans over the slots of ``stacked``;
    ``distance``/``scaling``: see ``adapter_similarities``.
    """
    s = adapter_similarities(active, stacked, distance, scaling)
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
