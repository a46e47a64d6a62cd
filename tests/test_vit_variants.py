"""ViT variants: the layout of OpenAI's released CLIP towers against a NumPy reference."""

import dataclasses

import jax
import numpy as np
import pytest

from mslora_jax.errors import ConfigError
from mslora_jax.models.clip import ImageEncoder, ModelConfig
from mslora_jax.models.llava import VisionTower
from mslora_jax.models.transformer import quick_gelu

CLIP_LAYOUT = ModelConfig(
    image_size=8,
    patch_size=4,
    width=16,
    depth=3,
    num_heads=2,
    mlp_dim=32,
    patch_bias=False,
    pre_norm=True,
    mlp_activation="quick_gelu",
    layer_norm_eps=1e-5,
)


def _layer_norm(x, p, eps):
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return x * p["scale"] + p["bias"]


def _reference_hidden_states(params, images, cfg):
    """Hugging Face's CLIPVisionTransformer, written out: embeddings, pre-LN, pre-LN blocks.

    Returns ``hidden_states`` as HF's ``output_hidden_states`` does: the encoder input, then each
    layer's output.
    """
    p = {k: jax.tree.map(lambda a: np.asarray(a, np.float64), v) for k, v in params.items()}
    b, s, q = images.shape[0], cfg.image_size, cfg.patch_size
    n = s // q
    patches = images.reshape(b, n, q, n, q, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, n * n, -1)
    x = patches @ p["patch_embed"]["kernel"].reshape(-1, cfg.width)
    if cfg.patch_bias:
        x = x + p["patch_embed"]["bias"]
    x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, cfg.width)), x], axis=1)
    x = _layer_norm(x + p["pos_embed"], p["ln_pre"], cfg.layer_norm_eps)
    heads, dh = cfg.num_heads, cfg.width // cfg.num_heads
    hidden = [x]
    for i in range(cfg.depth):
        blk = p["encoder"][f"block_{i}"]
        h = _layer_norm(x, blk["ln_attn"], cfg.layer_norm_eps)

        def proj(name, h=h, blk=blk):
            out = h @ blk["attn"][name]["kernel"] + blk["attn"][name]["bias"]
            return out.reshape(b, -1, heads, dh)

        logits = np.einsum("bqhd,bkhd->bhqk", proj("q"), proj("k")) / np.sqrt(dh)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attn = np.einsum("bhqk,bkhd->bqhd", weights, proj("v")).reshape(b, -1, cfg.width)
        x = x + attn @ blk["attn"]["out"]["kernel"] + blk["attn"]["out"]["bias"]
        h = _layer_norm(x, blk["ln_mlp"], cfg.layer_norm_eps)
        h = h @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"]
        h = h / (1.0 + np.exp(-1.702 * h))  # quick GELU
        x = x + h @ blk["mlp"]["fc2"]["kernel"] + blk["mlp"]["fc2"]["bias"]
        hidden.append(x)
    return hidden


def test_quick_gelu_formula():
    x = np.linspace(-4, 4, 9, dtype=np.float32)
    np.testing.assert_allclose(quick_gelu(x), x / (1 + np.exp(-1.702 * x)), rtol=1e-6)


def test_clip_layout_vision_tower_matches_reference():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    params = VisionTower(CLIP_LAYOUT).init(jax.random.PRNGKey(1), images)["params"]
    # Nonzero biases, scales and [CLS], so every parameter matters.
    params = jax.tree.map(
        lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), params
    )
    hidden = _reference_hidden_states(params, images, CLIP_LAYOUT)
    for layer in (-2, -1, 1):
        got = VisionTower(CLIP_LAYOUT, layer=layer).apply({"params": params}, images)
        np.testing.assert_allclose(got, hidden[layer][:, 1:], rtol=2e-5, atol=1e-5)


def test_default_layout_is_unchanged_and_variants_are_checked():
    default = ModelConfig()
    shapes = jax.eval_shape(
        ImageEncoder(default).init, jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32)
    )["params"]
    assert "ln_pre" not in shapes
    clip = dataclasses.replace(default, pre_norm=True)
    shapes = jax.eval_shape(
        ImageEncoder(clip).init, jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32)
    )["params"]
    assert set(shapes["ln_pre"]) == {"scale", "bias"} and "bias" in shapes["patch_embed"]
    assert (
        "bias"
        not in jax.eval_shape(
            VisionTower(CLIP_LAYOUT).init, jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32)
        )["params"]["patch_embed"]
    )
    with pytest.raises(ConfigError, match="mlp_activation='relu' is unknown"):
        ModelConfig(mlp_activation="relu")
    with pytest.raises(ConfigError, match="layer_norm_eps must be > 0"):
        ModelConfig(layer_norm_eps=0.0)
