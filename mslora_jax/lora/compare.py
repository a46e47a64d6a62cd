"""Compare adapter trees: the CR similarity of two adapters, and pairwise matrices over many.

Adapters are plain trees (``{path: {"lora_a": [..., r, in], "lora_b": [..., out, r]}}``, as
``LoraAdapter.params``) of numpy or jax arrays, all of one structure (one lora config per run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from mslora_jax.losses.regularizers import adapter_similarities, layer_pairs
from mslora_jax.models.lora_dense import LORA_A, LORA_B


def cr_similarity(
    a: Mapping, b: Mapping, distance: str = "released", scaling: float = 1.0
) -> float:
    """The CR similarity s of the run's ``regularizer.cr_distance`` (released: the mean over
    matrices of exp(-||P_a - P_b||_F), a scanned layer's ``[layers, m, n]`` factor counting as
    its ``layers`` matrices, as in the CR loss; the others: ``adapter_similarities``)."""
    if distance == "released":
        diffs = jax.tree.map(
            lambda x, y: np.exp(-np.linalg.norm(x - y, axis=(-2, -1))).ravel(), a, b
        )
        return float(np.mean(np.concatenate(jax.tree.leaves(diffs))))
    stacked = jax.tree.map(lambda x: x[None], b)
    return float(adapter_similarities(a, stacked, distance, scaling)[0])


def cr_similarity_matrix(
    adapters: Sequence[Mapping], distance: str = "released", scaling: float = 1.0
) -> np.ndarray:
    """``[n, n]``: ``cr_similarity`` of every pair of ``adapters`` (1 on the diagonal)."""
    return np.array([[cr_similarity(a, b, distance, scaling) for b in adapters] for a in adapters])


def delta_w_cosine_matrix(adapters: Sequence[Mapping]) -> np.ndarray:
    """``[n, n]``: cosine similarity of the adapters' weight updates, each adapter's ``B A`` of
    every adapted layer (each scanned slice) flattened and concatenated into one vector.

    Why delta-W and not the concatenated factors: every adapter starts from its own random A
    (and B = 0), so the factors of two adapters stay nearly orthogonal whatever they learn, and
    ``B A = (B R)(R^-1 A)`` gives one update many factorisations; the update is what the adapter
    does to the model. The cosine is scale-free (alpha / rank cancels), unlike exp(-d), which
    saturates at 0 once adapters are a few units apart. An adapter with a zero update (B = 0,
    untrained) has no direction: its row and column are NaN.

    Computed in float64 from ``r x r`` Grams, ``<B_i A_i, B_j A_j>_F = tr((B_i^T B_j)(A_j A_i^T))``,
    so no ``[out, in]`` product is formed.
    """
    n = len(adapters)
    inner = np.zeros((n, n))
    for i, a in enumerate(adapters):
        for j, b in enumerate(adapters[: i + 1]):
            total = 0.0
            for layer_a, layer_b in layer_pairs(a, b):
                a_i, b_i = (np.asarray(layer_a[k], np.float64) for k in (LORA_A, LORA_B))
                a_j, b_j = (np.asarray(layer_b[k], np.float64) for k in (LORA_A, LORA_B))
                gram_b = np.einsum("...or,...os->...rs", b_i, b_j)  # B_i^T B_j
                gram_a = np.einsum("...si,...ri->...sr", a_j, a_i)  # A_j A_i^T
                total += float(np.sum(np.einsum("...rs,...sr->...", gram_b, gram_a)))
            inner[i, j] = inner[j, i] = total
    norms = np.sqrt(np.maximum(np.diag(inner), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = inner / np.outer(norms, norms)
    cosine[(norms == 0)[:, None] | (norms == 0)[None, :]] = np.nan
    return np.clip(cosine, -1.0, 1.0)
