"""Causal self-attention through the Pallas splash-attention kernel (TPU), padding as segments.

``jax.experimental.pallas.ops.tpu.splash_attention`` is a flash-attention kernel for TPUs: it
never materialises the ``[B, H, L, L]`` scores, skips the masked-out (upper) half of the causal
blocks and has its own backward kernels. Here it serves the cache-free forward (training, the
uncached reference): queries and keys are the same L tokens, padding is a segment (real tokens
1, padding 0), so a real query sees exactly the real keys at or before it, as in
``attention.attend``. Padding queries see padding keys instead of nothing; their outputs are never
read (no loss, no real query attends to them). The kernel runs on per-device shards: under a
mesh (``jax.set_mesh``) it is wrapped in ``jax.shard_map`` with the batch split like the
residual stream and heads like the ``tensor`` axis. ``interpret=True`` runs the same kernel in
the Pallas interpreter on any backend (slow; for tests on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

from mslora_jax.parallel.mesh import BATCH_AXES, TENSOR_AXIS

_LANES = 128  # the kernel's sequence blocks are multiples of this


def _block(length: int) -> int:
    """The largest of 512, 256, 128 that divides ``length`` (a multiple of 128)."""
    return next(b for b in (512, 256, 128) if length % b == 0)


def _local(q, k, v, segments, interpret: bool):
    """One device's shard: q ``[B, H, L, Dh]``, k/v ``[B, K, L, Dh]``, segments ``[B, L]``."""
    heads, length = q.shape[1], q.shape[2]
    size = _block(length)
    sizes = kernel.BlockSizes(
        block_q=size,
        block_kv=size,
        block_kv_compute=size,
        block_q_dkv=size,
        block_kv_dkv=size,
        block_kv_dkv_compute=size,
        block_q_dq=size,
        block_kv_dq=size,
    )
    mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(heads)])
    attend = kernel.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)

    def one(q, k, v, seg):  # grouped-query heads: query head h reads kv head h // (H / K)
        return attend(q, k, v, segment_ids=kernel.SegmentIds(q=seg, kv=seg))

    return jax.vmap(one)(q, k, v, segments)


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, interpret: bool = False
) -> jax.Array:
    """Causal attention of q ``[B, L, H, Dh]`` over k, v ``[B, L, K, Dh]`` (``K`` divides ``H``)
    within segments ``[B, L]`` (1 real, 0 padding) -> ``[B, L, H, Dh]``; scale ``1/sqrt(Dh)``.

    The sequence is padded to a multiple of 128 (padded tokens are padding segments)."""
    b, length, _, dh = q.shape
    padded = -(-length // _LANES) * _LANES
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    # [B, L, H, Dh] -> [B, H, L', Dh]; the kernel does not scale the scores itself.
    to_heads = lambda x: jnp.pad(x, pad).transpose(0, 2, 1, 3)
    q = to_heads(q * jnp.asarray(1.0 / np.sqrt(dh), q.dtype))
    k, v = to_heads(k), to_heads(v)
    segments = jnp.pad(segments.astype(jnp.int32), ((0, 0), (0, padded - length)))
    local = functools.partial(_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
        tensor = TENSOR_AXIS if TENSOR_AXIS in mesh.axis_names else None
        heads = P(batch, tensor, None, None)
        local = jax.shard_map(
            local,
            in_specs=(heads, heads, heads, P(batch, None)),
            out_specs=heads,
            check_vma=False,
        )
    out = local(q, k, v, segments)  # [B, H, L', Dh]
    return out.transpose(0, 2, 1, 3)[:, :length]
