"""Shared test utilities: the smoke config with overrides, a small experiment, HF references."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import ml_collections
import numpy as np

from mslora_jax.config import ExperimentConfig, experiment_config
from mslora_jax.families.dual_encoder.experiment import Experiment
from mslora_jax.families.dual_encoder.setup import random_experiment
from mslora_jax.models.clip import ModelConfig
from mslora_jax.parallel.mesh import make_mesh

# A tiny ViT in the layout of OpenAI's released CLIP towers (LLaVA's vision tower).
TINY_CLIP_VIT = ModelConfig(
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

ROOT = Path(__file__).resolve().parents[1]


def load_config_file(name: str, *args: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def smoke_dict(**overrides) -> dict:
    """configs/smoke.py as a plain dict, with dotted overrides ("train.steps_per_task": 5)."""
    cfg = load_config_file("smoke.py").to_dict()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        node[leaf] = value
    return cfg


def smoke_config(**overrides) -> ExperimentConfig:
    return experiment_config(smoke_dict(**overrides))


def random_backbone_experiment(
    num_devices: int = 1, mesh_shape=(-1, 1, 1), **overrides
) -> Experiment:
    """An Experiment on the smoke stream with a seeded random (not pretrained) backbone, on a
    ``(data, fsdp, tensor)`` mesh of ``num_devices`` devices."""
    config = smoke_config(**{"backbone.source": "random", **overrides})
    mesh = make_mesh(num_devices, mesh_shape)
    return random_experiment(config, None, mesh)


# NumPy references of Hugging Face modules, written from HF's code over HF-named weights
# (float64), so they check mslora_jax's models and weight conversion without using either.


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return x * weight + bias


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def clip_vision_hidden_states(
    weights: Mapping[str, np.ndarray],
    prefix: str,
    pixel_values: np.ndarray,
    *,
    num_heads: int,
    eps: float = 1e-5,
) -> list[np.ndarray]:
    """HF ``CLIPVisionTransformer``'s ``hidden_states`` (quick-GELU MLP, as OpenAI's towers).

    ``pixel_values``: ``[B, 3, H, W]`` (torch layout); names are ``prefix + "embeddings..."``.
    Returns the encoder input (after ``pre_layrnorm``), then each layer's output: ``[B, 1+P, D]``.
    """

    def w(name: str) -> np.ndarray:
        return np.asarray(weights[prefix + name], np.float64)

    conv = w("embeddings.patch_embedding.weight")  # [D, 3, p, p], a stride-p conv
    d, c, p, _ = conv.shape
    b, _, height, width = pixel_values.shape
    nh, nw = height // p, width // p
    # Each p x p patch (in the weight's (c, kh, kw) order) times the flattened kernel; patches
    # row-major, as HF's ``flatten(2).transpose(1, 2)``.
    patches = pixel_values.astype(np.float64).reshape(b, c, nh, p, nw, p)
    patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(b, nh * nw, c * p * p)
    x = patches @ conv.reshape(d, -1).T
    if prefix + "embeddings.patch_embedding.bias" in weights:
        x = x + w("embeddings.patch_embedding.bias")
    cls = np.broadcast_to(w("embeddings.class_embedding"), (b, 1, d))
    x = np.concatenate([cls, x], axis=1) + w("embeddings.position_embedding.weight")
    x = layer_norm(x, w("pre_layrnorm.weight"), w("pre_layrnorm.bias"), eps)
    dh = d // num_heads
    hidden = [x]
    i = 0
    while f"{prefix}encoder.layers.{i}.layer_norm1.weight" in weights:
        layer = f"encoder.layers.{i}."

        def linear(name: str, h: np.ndarray, layer: str = layer) -> np.ndarray:
            return h @ w(f"{layer}{name}.weight").T + w(f"{layer}{name}.bias")

        h = layer_norm(x, w(layer + "layer_norm1.weight"), w(layer + "layer_norm1.bias"), eps)
        q = linear("self_attn.q_proj", h).reshape(b, -1, num_heads, dh) * dh**-0.5
        k = linear("self_attn.k_proj", h).reshape(b, -1, num_heads, dh)
        v = linear("self_attn.v_proj", h).reshape(b, -1, num_heads, dh)
        attn = softmax(np.einsum("bqhd,bkhd->bhqk", q, k))
        out = np.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, -1, d)
        x = x + linear("self_attn.out_proj", out)
        h = layer_norm(x, w(layer + "layer_norm2.weight"), w(layer + "layer_norm2.bias"), eps)
        h = linear("mlp.fc1", h)
        h = h / (1.0 + np.exp(-1.702 * h))  # quick_gelu: x * sigmoid(1.702 x)
        x = x + linear("mlp.fc2", h)
        hidden.append(x)
        i += 1
    return hidden


def assert_same_batches(batches, reference) -> None:
    """``batches`` (an iterator) equals the list ``reference``: same keys, dtypes, shapes and
    values, batch by batch."""
    batches = list(batches)
    assert len(batches) == len(reference)
    for batch, expected in zip(batches, reference):
        assert sorted(batch) == sorted(expected)  # worker output comes back with sorted keys
        for key, value in expected.items():
            assert batch[key].dtype == value.dtype and batch[key].shape == value.shape
            np.testing.assert_array_equal(batch[key], value)
