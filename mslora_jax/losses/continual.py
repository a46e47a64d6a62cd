"""Loss terms of the continual-learning baselines (``train.methods``: olora, ewc, lwf, modx).

Pure functions of adapter trees and model outputs; which slots or which previous model they
compare against is given to them (masks, anchors), so a stage's place in the stream is data.

- O-LoRA (Wang et al. 2023, eq. 4): ``sum_{i<c} sum_layers sum_{j,k} |A_c A_i^T|_{jk}``.
- EWC (Kirkpatrick et al. 2017, eq. 3): ``1/2 sum_p F_p (theta_p - theta*_p)^2``.
- LwF (Li & Hoiem 2016): ``KL(softmax(z_old / T) || softmax(z / T))`` averaged over examples.
- Mod-X (Ni et al. 2023): the KL between the old and new in-batch similarity distributions,
  rows whose old argmax is wrong left out (its "cognition alignment"), as released.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mslora_jax.losses.regularizers import layer_pairs
from mslora_jax.models.lora_dense import LORA_A


def olora_penalty(active: Mapping, stacked: Mapping, earlier_mask: jax.Array) -> jax.Array:
    """O-LoRA's orthogonality loss: over the slots t of ``earlier_mask`` (``[T]`` bool) and
    every adapted layer (each scanned slice), the sum of ``|A_c A_t^T|`` elementwise, with A
    ``[r, in]``; the stack is under stop-gradient (earlier tasks are frozen)."""
    stacked = jax.lax.stop_gradient(stacked)
    per_slot = 0.0
    for act, stk in layer_pairs(active, stacked):
        a_c, a_t = act[LORA_A], stk[LORA_A]  # [..., r, in], [T, ..., r, in]
        inner = jnp.einsum("...ri,t...si->t...rs", a_c, a_t)  # A_c A_t^T: [T, ..., r, r]
        per_slot = per_slot + jnp.sum(jnp.abs(inner).reshape(inner.shape[0], -1), axis=1)
    return jnp.sum(jnp.where(earlier_mask, per_slot, 0.0))


def ewc_penalty(active: Mapping, anchor: Mapping, fisher: Mapping) -> jax.Array:
    """``1/2 sum F (theta - theta*)^2`` over every adapter leaf; ``anchor`` (theta*) and
    ``fisher`` (F, the diagonal Fisher, same tree) under stop-gradient."""
    anchor, fisher = jax.lax.stop_gradient((anchor, fisher))
    terms = jax.tree.map(lambda p, a, f: jnp.sum(f * jnp.square(p - a)), active, anchor, fisher)
    return 0.5 * sum(jax.tree.leaves(terms))


def distillation_kl(
    teacher_logits: jax.Array,
    student_logits: jax.Array,
    temperature: float = 1.0,
    valid: jax.Array | None = None,
) -> jax.Array:
    """``[N]``: per row, ``KL(softmax(t / T) || softmax(s / T))`` over the columns ``valid``
    (``[C]`` bool; None: all). The teacher is under stop-gradient."""
    teacher = jax.lax.stop_gradient(teacher_logits) / temperature
    student = student_logits / temperature
    if valid is not None:
        teacher = jnp.where(valid, teacher, -jnp.inf)
        student = jnp.where(valid, student, -jnp.inf)
    log_p = jax.nn.log_softmax(teacher, axis=-1)
    log_q = jax.nn.log_softmax(student, axis=-1)
    terms = jnp.exp(log_p) * (log_p - log_q)
    if valid is not None:  # padded columns: p = 0, and 0 * (-inf - -inf) would be NaN
        terms = jnp.where(valid, terms, 0.0)
    return jnp.sum(terms, axis=-1)


def lwf_loss(
    teacher_logits: jax.Array,
    student_logits: jax.Array,
    temperature: float,
    valid: jax.Array | None = None,
) -> jax.Array:
    """LwF's distillation: the mean over examples of ``distillation_kl`` at temperature T
    (logits ``[B, C]``: each image against the current task's class prompts)."""
    return jnp.mean(distillation_kl(teacher_logits, student_logits, temperature, valid))


def modx_loss(
    teacher_image: jax.Array,
    teacher_text: jax.Array,
    student_image: jax.Array,
    student_text: jax.Array,
    labels: jax.Array,
) -> jax.Array:
    """Mod-X's off-diagonal information distillation, as released (``ModX_Training``).

    Embeddings ``[B, D]``, L2-normalised; ``labels`` ``[B]`` (examples of one class share a
    prompt, so column j is a right answer for row i when ``labels[j] == labels[i]``). The
    in-batch cosine similarities ``I T^T`` (image rows) and ``T I^T`` (text rows) are
    softmaxed per row (temperature 1, as released) and the teacher's rows distilled into the
    student's: ``(sum_i KL_i2t + sum_i KL_t2i) / 2``, summed over rows as released. A row whose
    teacher argmax is not a right answer is left out (Mod-X's cognition alignment, which
    replaces it by the student's own row, a KL of 0).
    """
    same = labels[:, None] == labels[None, :]

    def rows(t_q, t_k, s_q, s_k):
        teacher = jax.lax.stop_gradient(t_q @ t_k.T)
        right = jnp.take_along_axis(same, jnp.argmax(teacher, axis=1)[:, None], axis=1)[:, 0]
        return jnp.sum(jnp.where(right, distillation_kl(teacher, s_q @ s_k.T), 0.0))

    i2t = rows(teacher_image, teacher_text, student_image, student_text)
    t2i = rows(teacher_text, teacher_image, student_text, student_image)
    return 0.5 * (i2t + t2i)
