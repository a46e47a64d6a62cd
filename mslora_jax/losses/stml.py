"""Self-taught metric learning (STML; Kim et al., CVPR 2022), the loss MS-UGCML trains each
group of regions with: a momentum teacher's embeddings give soft pseudo-labels, and the student
is pulled toward or pushed from every other item of the batch by them.

Facts from the authors' release, written here as batched matrix operations (no per-row loop):

- teacher similarity ``W_P = exp(-d_t^2 / sigma)`` over unit teacher embeddings, items that are
  views of one object (equal ``ids``) counted as 1 when choosing neighbours;
- contextual similarity: ``V`` marks mutual k-nearest neighbours (by that similarity, self
  included); ``W~_C[i, j] = |V_i n V_j| / |V_i|`` for ``j`` in ``V_i`` (else 0); each row is then
  averaged over the ``round(k / 2)`` nearest neighbours of ``i`` and the result symmetrised;
- pseudo-label ``W = (W_P + W_C) / 2``;
- relaxed contrastive loss over the student's distances divided by their row mean ``d~``:
  ``sum_{i != j} W d~^2 + (1 - W) max(0, delta - d~)^2``, over ``N (N - 1)``;
- self-distillation: KL from the softmax of ``-d~`` of one head (detached) to that of the other;
- MS-UGCML's cross-group distillation (``cross_group_kl``): for a tenth of an earlier group's
  objects, KL between the softmax over fixed centres of their distances by that group's head and
  by the current group's head.

Every function is checked against a slow NumPy loop in ``tests/test_stml.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SIGMA, DELTA, TOP_K = 3.0, 1.0, 10  # MS-UGCML's settings


def pairwise_distances(x: jax.Array) -> jax.Array:
    """Euclidean distances ``[N, N]``, with a zero gradient (not NaN) on the diagonal."""
    sq = jnp.sum(x**2, -1)[:, None] + jnp.sum(x**2, -1)[None, :] - 2.0 * x @ x.T
    sq = jnp.maximum(sq, 0.0)
    positive = sq > 1e-12
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pseudo_labels(
    teacher: jax.Array, ids: jax.Array, sigma: float = SIGMA, k: int = TOP_K
) -> jax.Array:
    """STML's soft pseudo-labels ``W`` ``[N, N]`` from the teacher's embeddings (no gradient)."""
    teacher = jax.lax.stop_gradient(_unit(teacher))
    n = teacher.shape[0]
    k = min(k, n)
    w_p = jnp.exp(-(pairwise_distances(teacher) ** 2) / sigma)
    choose = jnp.where(ids[:, None] == ids[None, :], 1.0, w_p)
    _, nearest = jax.lax.top_k(choose, k)  # ties: the lower index
    knn = jnp.zeros((n, n)).at[jnp.arange(n)[:, None], nearest].set(1.0)
    mutual = knn * knn.T
    shared = mutual @ mutual  # [i, j] = |V_i n V_j| (V is symmetric)
    w_c_tilde = mutual * shared / jnp.sum(mutual, axis=1, keepdims=True)
    half = int(round(k / 2))
    w_c_hat = jnp.mean(w_c_tilde[nearest[:, :half]], axis=1)
    w_c = (w_c_hat + w_c_hat.T) / 2
    return (w_p + w_c) / 2


def relative_distances(x: jax.Array) -> jax.Array:
    """Distances divided by their row's mean (the diagonal's zero included, as released)."""
    d = pairwise_distances(x)
    return d / jnp.mean(d, axis=1, keepdims=True)


def relaxed_contrastive_loss(
    student: jax.Array, weights: jax.Array, delta: float = DELTA
) -> jax.Array:
    """Pull by ``weights``, push by ``1 - weights``, off the diagonal, mean over pairs."""
    n = student.shape[0]
    d = relative_distances(student)
    off = 1.0 - jnp.eye(n)
    pull = jnp.maximum(d, 0.0) ** 2 * weights * off
    push = jnp.maximum(delta - d, 0.0) ** 2 * (1.0 - weights) * off
    return (jnp.sum(pull) + jnp.sum(push)) / (n * (n - 1))


def self_distillation_kl(student: jax.Array, target: jax.Array) -> jax.Array:
    """``KL(softmax(-d~_target) || softmax(-d~_student))`` summed over rows, over ``N``; the
    target head's distances carry no gradient."""
    log_q = jax.nn.log_softmax(-relative_distances(student), axis=-1)
    log_p = jax.nn.log_softmax(-jax.lax.stop_gradient(relative_distances(target)), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q)) / student.shape[0]


def stml_loss(student_small, student_large, teacher_large, ids, sigma=SIGMA, delta=DELTA,
              k=TOP_K) -> tuple[jax.Array, dict]:  # fmt: skip
    """STML's objective over two student heads (e.g. 512-d and 1024-d) and the teacher's large
    head: the relaxed contrastive loss of each head against the teacher's pseudo-labels,
    averaged, plus the small head distilled from the large one."""
    weights = pseudo_labels(teacher_large, ids, sigma, k)
    contrastive = (
        relaxed_contrastive_loss(student_small, weights, delta)
        + relaxed_contrastive_loss(student_large, weights, delta)
    ) / 2
    distill = self_distillation_kl(student_small, student_large)
    return contrastive + distill, {"contrastive": contrastive, "self_distill": distill}


def centre_distances(x: jax.Array, centres: jax.Array) -> jax.Array:
    """Euclidean distances ``[N, C]`` of embeddings to fixed centres (e.g. 100 k-means ones)."""
    sq = jnp.sum(x**2, -1)[:, None] - 2.0 * x @ centres.T + jnp.sum(centres**2, -1)[None, :]
    return jnp.sqrt(jnp.maximum(sq, 1e-12))


def cross_group_kl(
    earlier_head: jax.Array, current_head: jax.Array, centres: jax.Array, eps: float = 1e-8
) -> jax.Array:
    """MS-UGCML's cross-group distillation for some objects of an earlier (smaller-scale) group:
    ``KL(p || q)`` averaged over objects, ``p`` and ``q`` the softmax over centres of the
    distances (as logits, as released) by the earlier group's head and by the current one, each
    smoothed by ``eps``. Both heads receive gradients (nothing is detached in the release)."""
    p = jax.nn.softmax(centre_distances(earlier_head, centres), axis=-1)
    q = jax.nn.softmax(centre_distances(current_head, centres), axis=-1)
    p, q = (p + eps) / (1.0 + eps), (q + eps) / (1.0 + eps)
    return jnp.mean(jnp.sum(p * jnp.log(p / q), axis=-1))
