"""Hugging Face ``CLIPModel`` names and settings for the dual encoder (``models.clip``).

The names table ``CLIP_NAMES`` maps every leaf of ``DualEncoder``'s params with a
``text_tower="clip"`` config onto the tensors of ``openai/clip-vit-*`` folders: the vision tower
(shared with LLaVA's table, ``hf_llava.vision_tower_names``) under ``vision_model.``, the text
tower under ``text_model.``, ``visual_projection``, ``text_projection`` and ``logit_scale`` (HF
stores its log, as ``DualEncoder.logit_scale`` is). Our text encoder's ``ln_final`` is CLIP's
``final_layer_norm`` (applied per token, as HF does, before the end-of-text token is pooled).

``model_config_from_hf`` reads the sizes and the settings shapes cannot tell (heads, activation,
LayerNorm epsilon, end-of-text id) from ``config.json``; a key the file omits takes
transformers' ``CLIPTextConfig``/``CLIPVisionConfig`` default (``HF_DEFAULTS``), which is what HF
itself would load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from mslora_jax.errors import CheckpointError
from mslora_jax.interop.hf_llava import vision_tower_names
from mslora_jax.interop.hf_names import (
    HF_ACTIVATIONS,
    SAME,
    NameTable,
    check_settings,
    module_name,
)
from mslora_jax.models.clip import ModelConfig

VISION_PREFIX = "vision_model."
TEXT_PREFIX = "text_model."
# OpenAI CLIP's pixel statistics (HF's OPENAI_CLIP_MEAN/STD), for a folder without a
# preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_VISION_MODULES, _VISION_LEAVES = vision_tower_names("image")
_MODULES = (
    *_VISION_MODULES,
    (r"image/proj", r"visual_projection"),
    (r"text/token_embed", r"text_model.embeddings.token_embedding"),
    (
        r"text/encoder/block_(\d+)/attn/(q|k|v|out)",
        r"text_model.encoder.layers.\1.self_attn.\2_proj",
    ),
    (r"text/encoder/block_(\d+)/ln_attn", r"text_model.encoder.layers.\1.layer_norm1"),
    (r"text/encoder/block_(\d+)/ln_mlp", r"text_model.encoder.layers.\1.layer_norm2"),
    (r"text/encoder/block_(\d+)/mlp/(fc1|fc2)", r"text_model.encoder.layers.\1.mlp.\2"),
    (r"text/encoder/ln_final", r"text_model.final_layer_norm"),
    (r"text/proj", r"text_projection"),
)
CLIP_NAMES = NameTable(
    modules=_MODULES,
    leaves={
        **_VISION_LEAVES,
        "text/pos_embed": ("text_model.embeddings.position_embedding.weight", SAME),
        "logit_scale": ("logit_scale", SAME),
    },
    ignored=(r"(^|\.)position_ids$",),  # index buffers some versions saved
)
SUBS = {"v": VISION_PREFIX}


def clip_module_name(module: str) -> str:
    """HF module of a dual-encoder module path, e.g. ``image/encoder/block_0/attn/q`` ->
    ``vision_model.encoder.layers.0.self_attn.q_proj`` (for exporting CLIP adapters)."""
    return module_name(module, CLIP_NAMES, SUBS)


# transformers' defaults (configuration_clip.py) for keys a config.json may omit.
HF_DEFAULTS = {
    "text_config": {
        "vocab_size": 49408,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "eos_token_id": 49407,
    },
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
    "projection_dim": 512,
}


def _section(hf_config: Mapping, name: str) -> dict:
    return {**HF_DEFAULTS[name], **(hf_config.get(name) or {})}


def _square(value, key: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(
                f"{where}: vision_config.{key}={value!r}; only square is supported"
            )
        value = value[0]
    return int(value)


def model_config_from_hf(
    hf_config: Mapping,
    where: str,
    *,
    max_text_len: int | None = None,
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
) -> ModelConfig:
    """The dual encoder's ``ModelConfig`` for an HF ``CLIPConfig`` dict (``config.json``).

    ``max_text_len``: the prompts' padded length (default: all of CLIP's positions, 77).
    CheckpointError naming the keys if the file states what this model cannot be (different
    activations or LayerNorm epsilons in the two towers, an unknown activation, not RGB).
    """
    text, vision = _section(hf_config, "text_config"), _section(hf_config, "vision_config")
    acts = {tower: cfg["hidden_act"] for tower, cfg in (("text", text), ("vision", vision))}
    if len(set(acts.values())) > 1:
        raise CheckpointError(
            f"{where}: text_config.hidden_act={acts['text']!r} but vision_config.hidden_act="
            f"{acts['vision']!r}; the dual encoder's towers share model.mlp_activation"
        )
    if acts["text"] not in HF_ACTIVATIONS:
        raise CheckpointError(
            f"{where}: hidden_act={acts['text']!r} is not supported; expected one of "
            f"{sorted(HF_ACTIVATIONS)}"
        )
    if text["layer_norm_eps"] != vision["layer_norm_eps"]:
        raise CheckpointError(
            f"{where}: text_config.layer_norm_eps={text['layer_norm_eps']!r} but "
            f"vision_config.layer_norm_eps={vision['layer_norm_eps']!r}; the towers share "
            "model.layer_norm_eps"
        )
    check_settings(vision, {"num_channels": 3}, where)
    eos = text["eos_token_id"]
    if not isinstance(eos, int):
        raise CheckpointError(f"{where}: text_config.eos_token_id={eos!r}; one id is expected")
    positions = int(text["max_position_embeddings"])
    return ModelConfig(
        image_size=_square(vision["image_size"], "image_size", where),
        patch_size=_square(vision["patch_size"], "patch_size", where),
        width=vision["hidden_size"],
        depth=vision["num_hidden_layers"],
        num_heads=vision["num_attention_heads"],
        mlp_dim=vision["intermediate_size"],
        vocab_size=text["vocab_size"],
        max_text_len=positions if max_text_len is None else max_text_len,
        text_width=text["hidden_size"],
        text_depth=text["num_hidden_layers"],
        text_num_heads=text["num_attention_heads"],
        text_mlp_dim=text["intermediate_size"],
        embed_dim=hf_config.get("projection_dim", HF_DEFAULTS["projection_dim"]),
        patch_bias=False,
        pre_norm=True,
        mlp_activation=HF_ACTIVATIONS[acts["text"]],
        layer_norm_eps=float(text["layer_norm_eps"]),
        text_tower="clip",
        text_positions=positions,
        text_eos_id=eos,
        image_mean=image_mean,
        image_std=image_std,
    )


def check_model_config(expected: ModelConfig, given: ModelConfig, where: str) -> None:
    """CheckpointError naming every field of ``given`` (a run's model) that differs from
    ``expected`` (what the weights are); ``init_temperature`` is not compared (the weights'
    ``logit_scale`` replaces it)."""
    diffs = [
        f"model.{f.name}={getattr(given, f.name)!r} but the weights need "
        f"{getattr(expected, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if f.name != "init_temperature" and getattr(given, f.name) != getattr(expected, f.name)
    ]
    if diffs:
        raise CheckpointError(f"{where}: {'; '.join(diffs)}")
