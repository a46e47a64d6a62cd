"""Symmetric CLIP InfoNCE, on one device or sharded over a data-parallel mesh with ``shard_map``.

Samples of one class share one prompt, so a batch usually holds the same text several times. The
target of row i is therefore uniform over every column whose prompt id equals i's (a sample's own
pair and its duplicates); with all-distinct prompts this is exactly CLIP's one-hot InfoNCE.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mslora_jax.parallel.mesh import BATCH_AXES

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the inverse temperature at 100


def _row_losses(queries, keys, query_ids, key_ids, scale):
    """Per-row cross-entropy of ``queries`` against all ``keys``, duplicate-aware targets."""
    logits = scale * queries @ keys.T
    positives = (query_ids[:, None] == key_ids[None, :]).astype(logits.dtype)
    targets = positives / positives.sum(axis=1, keepdims=True)
    return -(targets * jax.nn.log_softmax(logits, axis=1)).sum(axis=1)


def clip_loss(image_emb, text_emb, prompt_ids, logit_scale) -> jax.Array:
    """Symmetric InfoNCE over the whole batch. Embeddings ``[B, D]`` (normalised), ids ``[B]``."""
    scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
    i2t = _row_losses(image_emb, text_emb, prompt_ids, prompt_ids, scale)
    t2i = _row_losses(text_emb, image_emb, prompt_ids, prompt_ids, scale)
    return 0.5 * (i2t.mean() + t2i.mean())


def sharded_clip_loss(mesh: Mesh, axis: str | tuple[str, ...] = BATCH_AXES):
    """``clip_loss`` with the batch sharded over ``mesh[axis]`` (default: ``(data, fsdp)``;
    replicated over the other mesh axes).

    Each device all-gathers the embeddings and ids, contrasts its local rows against the global
    batch, and the per-row losses are summed with ``psum``: the value and the gradients equal the
    single-device ``clip_loss`` on the global batch.
    """

    def local(image_emb, text_emb, prompt_ids, logit_scale):
        gather = lambda x: jax.lax.all_gather(x, axis, tiled=True)
        all_images, all_texts, all_ids = gather(image_emb), gather(text_emb), gather(prompt_ids)
        scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
        i2t = _row_losses(image_emb, all_texts, prompt_ids, all_ids, scale).sum()
        t2i = _row_losses(text_emb, all_images, prompt_ids, all_ids, scale).sum()
        global_batch = all_ids.shape[0]
        return jax.lax.psum(i2t + t2i, axis) / (2.0 * global_batch)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P(axis), P()), out_specs=P())
