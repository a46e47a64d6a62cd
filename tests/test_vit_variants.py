"""ViT variants: the layout of OpenAI's released CLIP towers against a NumPy reference of HF's
CLIPVisionTransformer (tests/helpers.py)."""

import dataclasses

import jax
import numpy as np
import pytest

from mslora_jax.errors import ConfigError
from mslora_jax.models.clip import ImageEncoder, ModelConfig
from mslora_jax.models.llava import VisionTower
from mslora_jax.models.transformer import quick_gelu
from tests.helpers import TINY_CLIP_VIT, clip_vision_hidden_states


def _as_hf_clip(params, prefix: str = "vision_model.") -> dict[str, np.ndarray]:
    """The VisionTower's params under HF ``CLIPVisionModel`` names and layouts (by hand, so the
    shared reference in tests/helpers.py reads them as HF weights)."""
    p = jax.tree.map(np.asarray, params)
    hf = {
        "embeddings.class_embedding": p["cls"].reshape(-1),
        "embeddings.patch_embedding.weight": p["patch_embed"]["kernel"].transpose(3, 2, 0, 1),
        "embeddings.position_embedding.weight": p["pos_embed"],
        "pre_layrnorm.weight": p["ln_pre"]["scale"],
        "pre_layrnorm.bias": p["ln_pre"]["bias"],
    }
    for i in range(TINY_CLIP_VIT.depth):
        blk, layer = p["encoder"][f"block_{i}"], f"encoder.layers.{i}."
        modules = {f"self_attn.{n}_proj": blk["attn"][n] for n in ("q", "k", "v", "out")}
        modules.update({f"mlp.{n}": blk["mlp"][n] for n in ("fc1", "fc2")})
        for name, dense in modules.items():
            hf[f"{layer}{name}.weight"] = dense["kernel"].T
            hf[f"{layer}{name}.bias"] = dense["bias"]
        for ours, theirs in (("ln_attn", "layer_norm1"), ("ln_mlp", "layer_norm2")):
            hf[f"{layer}{theirs}.weight"] = blk[ours]["scale"]
            hf[f"{layer}{theirs}.bias"] = blk[ours]["bias"]
    return {prefix + name: value for name, value in hf.items()}


def test_quick_gelu_formula():
    x = np.linspace(-4, 4, 9, dtype=np.float32)
    np.testing.assert_allclose(quick_gelu(x), x / (1 + np.exp(-1.702 * x)), rtol=1e-6)


def test_clip_layout_vision_tower_matches_reference():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    params = VisionTower(TINY_CLIP_VIT).init(jax.random.PRNGKey(1), images)["params"]
    # Nonzero biases, scales and [CLS], so every parameter matters.
    params = jax.tree.map(
        lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), params
    )
    hidden = clip_vision_hidden_states(
        _as_hf_clip(params),
        "vision_model.",
        images.transpose(0, 3, 1, 2),
        num_heads=TINY_CLIP_VIT.num_heads,
        eps=TINY_CLIP_VIT.layer_norm_eps,
    )
    for layer in (-2, -1, 1):
        got = VisionTower(TINY_CLIP_VIT, layer=layer).apply({"params": params}, images)
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
            VisionTower(TINY_CLIP_VIT).init,
            jax.random.PRNGKey(0),
            np.zeros((1, 8, 8, 3), np.float32),
        )["params"]["patch_embed"]
    )
    with pytest.raises(ConfigError, match="mlp_activation='relu' is unknown"):
        ModelConfig(mlp_activation="relu")
    with pytest.raises(ConfigError, match="layer_norm_eps must be > 0"):
        ModelConfig(layer_norm_eps=0.0)
