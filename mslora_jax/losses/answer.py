"""Next-token cross-entropy at the answer positions only, never over the whole sequence.

A LLaVA training sequence is mostly image patches, prompt and padding; only the answer tokens
(``loss_mask``) are scored. Computing ``lm_head`` and a float32 log-softmax at every position
would cost ``[B, L, V]`` float32 logits (5.4 GB at the paper's batch 16, 2623 positions, 32k
vocabulary). Here each row's scored positions are moved to its front (a stable sort, so the
order is kept), and the logits are computed ``chunk`` positions at a time; a chunk in which no
row has an answer token is skipped (``lax.cond``), and each chunk's logits are recomputed in
the backward pass rather than stored (``jax.checkpoint``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# head(hidden [B, C, D]) -> logits [B, C, V]
HeadFn = Callable[[jax.Array], jax.Array]


def answer_cross_entropy(
    head: HeadFn,
    hidden: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    chunk: int = 256,
) -> jax.Array:
    """Mean ``-log p(input_ids[:, l + 1] | prefix)`` over ``loss_mask[:, l + 1]``.

    ``hidden``: ``[B, L, D]`` final hidden states (position l predicts token l + 1);
    ``input_ids``, ``loss_mask``: ``[B, L]``. Equals the cross-entropy of the full logits
    ``head(hidden)[:, :-1]`` against ``input_ids[:, 1:]`` under ``loss_mask[:, 1:]``.
    """
    targets, mask = input_ids[:, 1:], loss_mask[:, 1:].astype(bool)
    hidden = hidden[:, :-1]
    # Scored positions first in every row (stable: their order is kept).
    order = jnp.argsort(~mask, axis=1, stable=True)
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
    hidden, targets, mask = take(hidden), take(targets), take(mask)
    length = mask.shape[1]
    chunk = max(1, min(chunk, length))
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))

    def split(x):  # [B, chunks * c, ...] -> [chunks, B, c, ...]
        return x.reshape(x.shape[0], chunks, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_nll(h, t, m):
        logits = head(h).astype(jnp.float32)
        safe = jnp.clip(t, 0, logits.shape[-1] - 1)  # image slots hold a sentinel id
        picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
        return jnp.sum(jnp.where(m, nll, 0.0))

    def one(args):
        h, t, m = args
        return jax.lax.cond(jnp.any(m), chunk_nll, lambda *_: jnp.float32(0.0), h, t, m)

    total = jnp.sum(jax.lax.map(one, (split(hidden), split(targets), split(mask))))
    return total / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
