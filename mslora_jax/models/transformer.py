"""Pre-LN transformer blocks; attention (q, k, v, out) and MLP (fc1, fc2) are LoRA-targetable.

``PostNormBlock`` is BERT's post-LN variant of ``Block``, with the same parameter names.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mslora_jax.models.lora_dense import LoraDense


class SelfAttention(nn.Module):
    """Multi-head self-attention with LoRA-targetable projections named q, k, v, out."""

    width: int
    num_heads: int
    lora_dropout: float = 0.0
    causal: bool = False  # position i attends to positions <= i only (CLIP's text tower)

    @nn.compact
    def __call__(self, x, mask, task_weights, deterministic: bool = True):
        # x: [B, L, D]; mask: [B, L] True for real tokens (None = all real).
        head_dim = self.width // self.num_heads
        dense = lambda name: LoraDense(self.width, lora_dropout=self.lora_dropout, name=name)
        split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head_dim)
        q = split(dense("q")(x, task_weights, deterministic))
        k = split(dense("k")(x, task_weights, deterministic))
        v = split(dense("v")(x, task_weights, deterministic))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        if self.causal:  # [L, L] lower triangle: query q sees keys k <= q
            length = x.shape[1]
            allowed = jnp.tril(jnp.ones((length, length), bool))
            logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
        # Softmax in float32 also when activations are bfloat16 (a no-op for float32).
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
        return dense("out")(out, task_weights, deterministic)


def quick_gelu(x: jax.Array) -> jax.Array:
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP towers were trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


# MLP activations by config name. "gelu_tanh" is this repo's default ViT; released CLIP towers
# use "quick_gelu"; "gelu" is the exact (erf) GELU.
ACTIVATIONS = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "quick_gelu": quick_gelu,
}


class Mlp(nn.Module):
    """Two-layer MLP (activation from ``ACTIVATIONS``) with LoRA-targetable fc1 and fc2."""

    width: int
    mlp_dim: int
    lora_dropout: float = 0.0
    activation: str = "gelu_tanh"

    @nn.compact
    def __call__(self, x, task_weights, deterministic: bool = True):
        h = LoraDense(self.mlp_dim, lora_dropout=self.lora_dropout, name="fc1")(
            x, task_weights, deterministic
        )
        h = ACTIVATIONS[self.activation](h)
        return LoraDense(self.width, lora_dropout=self.lora_dropout, name="fc2")(
            h, task_weights, deterministic
        )


class Block(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x))."""

    width: int
    num_heads: int
    mlp_dim: int
    lora_dropout: float = 0.0
    activation: str = "gelu_tanh"
    layer_norm_eps: float = 1e-6
    causal: bool = False

    @nn.compact
    def __call__(self, x, mask, task_weights, deterministic: bool = True):
        h = nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_attn")(x)
        attn = SelfAttention(
            self.width, self.num_heads, self.lora_dropout, self.causal, name="attn"
        )
        x = x + attn(h, mask, task_weights, deterministic)
        h = nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_mlp")(x)
        mlp = Mlp(self.width, self.mlp_dim, self.lora_dropout, self.activation, name="mlp")
        return x + mlp(h, task_weights, deterministic)


class PostNormBlock(Block):
    """x = LN(x + attn(x)), then LN(x + mlp(x)): BERT's post-LN block (same parameter names).

    ``ln_attn`` is BERT's ``attention.output.LayerNorm`` and ``ln_mlp`` its ``output.LayerNorm``.
    """

    @nn.compact
    def __call__(self, x, mask, task_weights, deterministic: bool = True):
        attn = SelfAttention(
            self.width, self.num_heads, self.lora_dropout, self.causal, name="attn"
        )
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_attn")(
            x + attn(x, mask, task_weights, deterministic)
        )
        mlp = Mlp(self.width, self.mlp_dim, self.lora_dropout, self.activation, name="mlp")
        return nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_mlp")(
            x + mlp(x, task_weights, deterministic)
        )


class Encoder(nn.Module):
    """A stack of ``depth`` pre-LN blocks followed by a final LayerNorm.

    With ``return_hidden_states=True`` it returns ``(output, hidden_states)``, where
    ``hidden_states`` holds ``depth + 1`` arrays ``[B, L, D]``: the input, then each block's
    output (before ``ln_final``), as Hugging Face's ``output_hidden_states`` (LLaVA takes ``[-2]``).
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    lora_dropout: float = 0.0
    return_hidden_states: bool = False
    activation: str = "gelu_tanh"
    layer_norm_eps: float = 1e-6
    causal: bool = False  # causal self-attention in every block (see ``SelfAttention``)

    @nn.compact
    def __call__(self, x, mask, task_weights, deterministic: bool = True):
        hidden_states = [x]
        for i in range(self.depth):
            x = Block(
                self.width,
                self.num_heads,
                self.mlp_dim,
                self.lora_dropout,
                self.activation,
                self.layer_norm_eps,
                self.causal,
                name=f"block_{i}",
            )(x, mask, task_weights, deterministic)
            hidden_states.append(x)
        out = nn.LayerNorm(epsilon=self.layer_norm_eps, name="ln_final")(x)
        return (out, tuple(hidden_states)) if self.return_hidden_states else out
