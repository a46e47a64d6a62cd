"""The decoder's sizes (``DecoderConfig``) and its two parameter layouts: the scanned ``blocks``
module (``SCANNED``, a leading ``layers`` axis) and the unrolled ``block_{i}`` modules, with
``scan_blocks``/``unscan_blocks`` converting a tree between them (see ``models.decoder``).

Separate from ``models.decoder`` so the attention and KV-cache modules, which the decoder
imports, can read the sizes too; nothing here builds or runs a module.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mslora_jax.errors import ConfigError

SCANNED = "blocks"  # the scanned layout's module name (leaves with a leading layer axis)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes of the causal LM; ``max_len`` is the longest sequence (prompt + generation)."""

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    max_len: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    # Blocks under ``nn.scan`` with parameters stacked on a leading layer axis (see the module
    # docstring); False: unrolled ``block_{i}`` modules.
    scan_layers: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "width", "depth", "num_heads", "num_kv_heads", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"decoder.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_len < 1:
            raise ConfigError(f"decoder.max_len must be >= 1, got {self.max_len}")
        if self.width % self.num_heads:
            raise ConfigError(
                f"decoder.width={self.width} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"decoder.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"decoder head_dim={self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0 or self.rms_eps <= 0:
            raise ConfigError(
                f"decoder.rope_theta={self.rope_theta} and rms_eps={self.rms_eps} must be > 0"
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @classmethod
    def mistral_7b(cls, max_len: int = 32768, rope_theta: float = 1e6) -> DecoderConfig:
        """Mistral-7B sizes; the defaults are those of Mistral-7B-Instruct-v0.2 (LLaVA-Med v1.5)."""
        return cls(
            vocab_size=32000,
            width=4096,
            depth=32,
            num_heads=32,
            num_kv_heads=8,
            mlp_dim=14336,
            max_len=max_len,
            rope_theta=rope_theta,
        )


def unrolled_config(config: DecoderConfig) -> DecoderConfig:
    """``config`` in the unrolled layout (``block_{i}`` modules)."""
    return dataclasses.replace(config, scan_layers=False)


def _block_index(key: str) -> int | None:
    match = re.fullmatch(r"block_(\d+)", key)
    return None if match is None else int(match.group(1))


def scan_blocks(tree: Mapping, axis: int = 0) -> dict:
    """A LLaVA-rooted tree (params, an adapter, or an adapter stack) with the unrolled
    ``decoder/block_{i}`` subtrees stacked into ``decoder/blocks`` along ``axis`` (0 for params
    and one adapter, 1 for a ``[T, ...]`` stack); anything else is returned as it is."""
    decoder = tree.get("decoder") if isinstance(tree, Mapping) else None
    if not isinstance(decoder, Mapping):
        return dict(tree)
    blocks = sorted((i, k) for k in decoder if (i := _block_index(k)) is not None)
    if not blocks:
        return dict(tree)
    if [i for i, _ in blocks] != list(range(len(blocks))):
        raise ConfigError(f"decoder blocks {[k for _, k in blocks]} are not block_0..block_N-1")
    rest = {k: v for k, v in decoder.items() if _block_index(k) is None}
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis), *(decoder[k] for _, k in blocks))
    return {**tree, "decoder": {**rest, SCANNED: stacked}}


def unscan_blocks(tree: Mapping, axis: int = 0) -> dict:
    """Inverse of ``scan_blocks``: ``decoder/blocks`` split into ``decoder/block_{i}``."""
    decoder = tree.get("decoder") if isinstance(tree, Mapping) else None
    if not isinstance(decoder, Mapping) or SCANNED not in decoder:
        return dict(tree)
    stacked = decoder[SCANNED]
    depth = jax.tree.leaves(stacked)[0].shape[axis]
    rest = {k: v for k, v in decoder.items() if k != SCANNED}
    blocks = {
        f"block_{i}": jax.tree.map(lambda x, i=i: jnp.take(x, i, axis), stacked)
        for i in range(depth)
    }
    return {**tree, "decoder": {**rest, **blocks}}
