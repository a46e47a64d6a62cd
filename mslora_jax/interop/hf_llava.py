"""Map Hugging Face LLaVA(-Med) weights onto the parameter tree of ``models.llava.Llava``.

The conversion is driven by the target tree (``jax.eval_shape`` of ``init_llava``): every leaf's
path is turned into the name of one HF tensor by ``_MODULES`` (module path -> HF module) and
``_LEAF_NAMES``, and that tensor is read, re-laid out and checked against the leaf's shape. Any
tensor left over that is not on the ``IGNORED`` list is an error, as is a missing one, so a config
that does not match the weights cannot load silently.

HF names as released (``LlavaMistralForCausalLM``): ``model.embed_tokens``, ``model.layers.{i}``
(``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``), ``model.norm``, ``lm_head``, ``model.mm_projector.{0,2}`` and, if
saved with the model, the CLIP tower under ``LLAVA_VISION_PREFIX``; OpenAI's own CLIP folder
(``openai/clip-vit-large-patch14-336``) has the tower under ``CLIP_VISION_PREFIX``.

Layouts (``tensor_map``): torch ``Linear`` and conv weights are re-laid out as flax's. A
scanned decoder's leaf ``decoder/blocks/...`` ``[depth, ...]`` is filled from ``model.layers.{i}``
for every i, one layer's tensor at a time, into one array. q and k need no permutation:
``decoder.apply_rope`` uses HF's "rotate half" pairing (checked by
tests/test_interop_llava_med.py against HF's formulas).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np

from mslora_jax.errors import CheckpointError
from mslora_jax.interop import tensor_map
from mslora_jax.interop.safetensors_folder import TensorSource
from mslora_jax.interop.tensor_map import SAME, Layout, Target, check_settings, leaf_paths
from mslora_jax.models.decoder import SCANNED
from mslora_jax.models.llava import LlavaConfig

LLAVA_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
CLIP_VISION_PREFIX = "vision_model."

# HF tensors that are deliberately not converted (re.search): CLIP's text tower and contrastive
# head (a CLIP folder holds the whole CLIPModel), index buffers, and RoPE's inverse frequencies,
# which older checkpoints saved although they only restate rope_theta.
IGNORED = (
    r"(^|\.)text_model\.",
    r"(^|\.)(logit_scale|visual_projection\.weight|text_projection\.weight)$",
    r"(^|\.)position_ids$",
    r"\.rotary_emb\.inv_freq$",
)

# (flax module path, HF module name); ``{v}`` is the vision tower's prefix. Matched in full.
_MODULES = (
    (r"vision_tower/patch_embed", r"{v}embeddings.patch_embedding"),
    (r"vision_tower/ln_pre", r"{v}pre_layrnorm"),  # sic: HF's spelling
    (
        r"vision_tower/encoder/block_(\d+)/attn/(q|k|v|out)",
        r"{v}encoder.layers.\1.self_attn.\2_proj",
    ),
    (r"vision_tower/encoder/block_(\d+)/ln_attn", r"{v}encoder.layers.\1.layer_norm1"),
    (r"vision_tower/encoder/block_(\d+)/ln_mlp", r"{v}encoder.layers.\1.layer_norm2"),
    (r"vision_tower/encoder/block_(\d+)/mlp/(fc1|fc2)", r"{v}encoder.layers.\1.mlp.\2"),
    # Our encoder's final LayerNorm is CLIP's post_layernorm (a per-token LayerNorm, so applying
    # it to every token or, as HF does, to the pooled [CLS] only is the same map). LLaVA reads an
    # earlier hidden state and never uses it, but the tree has it, so it is filled faithfully.
    (r"vision_tower/encoder/ln_final", r"{v}post_layernorm"),
    (r"projector/linear_1", r"model.mm_projector.0"),  # mlp2x_gelu: Linear, GELU, Linear
    (r"projector/linear_2", r"model.mm_projector.2"),
    (r"decoder/embed_tokens", r"model.embed_tokens"),
    (r"decoder/block_(\d+)/attn/(q|k|v|o)", r"model.layers.\1.self_attn.\2_proj"),
    (r"decoder/block_(\d+)/mlp/(gate|up|down)", r"model.layers.\1.mlp.\2_proj"),
    (r"decoder/block_(\d+)/attn_norm", r"model.layers.\1.input_layernorm"),
    (r"decoder/block_(\d+)/mlp_norm", r"model.layers.\1.post_attention_layernorm"),
    (r"decoder/norm", r"model.norm"),
    (r"decoder/lm_head", r"lm_head"),
)
_SCANNED_PREFIX = f"decoder/{SCANNED}/"
# Parameters held directly by the vision tower module.
_VISION_LEAVES = {
    "vision_tower/cls": r"{v}embeddings.class_embedding",
    "vision_tower/pos_embed": r"{v}embeddings.position_embedding.weight",
}


CLS = Layout(lambda a: a.reshape(1, 1, -1), lambda s: tuple(s)[2:])  # [D] -> [1, 1, D]


def _hf_name(path: str, ndim: int, vision_prefix: str) -> tuple[str, Layout]:
    if path in _VISION_LEAVES:
        layout = CLS if path.endswith("/cls") else SAME
        return _VISION_LEAVES[path].replace("{v}", vision_prefix), layout
    modules = [(pattern, template.replace("{v}", vision_prefix)) for pattern, template in _MODULES]
    found = tensor_map.table_name(path, ndim, modules)
    if found is not None:
        return found
    raise CheckpointError(f"parameter {path} has no known Hugging Face counterpart")


def hf_targets(abstract: dict, vision_prefix: str = LLAVA_VISION_PREFIX) -> dict[str, Target]:
    """``{HF tensor name: Target}`` for every leaf of the LLaVA params tree ``abstract``."""
    targets = {}
    for path, shape in leaf_paths(abstract):
        if path.startswith(_SCANNED_PREFIX):  # one HF tensor per layer, named as if unrolled
            for i in range(shape[0]):
                unrolled = f"decoder/block_{i}/{path[len(_SCANNED_PREFIX) :]}"
                name, layout = _hf_name(unrolled, len(shape) - 1, vision_prefix)
                targets[name] = Target(path, shape[1:], layout, layer=i, depth=shape[0])
            continue
        name, layout = _hf_name(path, len(shape), vision_prefix)
        targets[name] = Target(path, shape, layout)
    return targets


def is_ignored(name: str) -> bool:
    return any(re.search(pattern, name) for pattern in IGNORED)


def _missing_hint(missing: list[str]) -> str:
    if all(".vision_model." in f".{n}" for n in missing):
        return (
            "; the CLIP vision tower is not there: give the folder of "
            "openai/clip-vit-large-patch14-336 as the vision source (--vision-hf-dir)"
        )
    return ""


def check_tensor_names(
    targets: Mapping[str, Target],
    shapes: Mapping[str, tuple[int, ...]],
    where: str,
    skip: Callable[[str], bool] | None = None,
) -> None:
    """CheckpointError for missing tensors, tensors nobody uses, or a wrong shape; reads nothing.

    ``where`` names the source in messages; tensors matching ``IGNORED`` or ``skip(name)`` may go
    unused.
    """
    tensor_map.check_tensor_names(
        targets, shapes, where, lambda n: is_ignored(n) or bool(skip and skip(n)), _missing_hint
    )


def convert_hf_llava(
    abstract: dict,
    source: TensorSource,
    *,
    vision_prefix: str = LLAVA_VISION_PREFIX,
    skip: Callable[[str], bool] | None = None,
    where: str = "Hugging Face weights",
    dtype=np.float32,
) -> dict:
    """The LLaVA params tree (nested dicts of ``dtype`` numpy arrays) from HF-named tensors.

    ``abstract``: the tree of ``init_llava`` (arrays or ``ShapeDtypeStruct``s; only shapes are
    used); ``skip(name)``: more tensors that may go unused (see ``check_tensor_names``). Names and
    shapes are all checked before the first tensor is read; then tensors are read one at a time,
    so the peak memory is the result plus one tensor.
    """
    targets = hf_targets(abstract, vision_prefix)
    check_tensor_names(targets, source.shapes(), where, skip)
    return tensor_map.unflatten(tensor_map.read_targets(targets, source, dtype))


def _expected_settings(config: LlavaConfig) -> dict[str, object]:
    """The LLaVA/Mistral ``config.json`` keys that shapes cannot check, with our values."""
    return {
        "rope_theta": config.decoder.rope_theta,
        "rms_norm_eps": config.decoder.rms_eps,
        "hidden_act": "silu",  # SwiGLU
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": config.vision_layer,
        "mm_vision_select_feature": "patch",  # [CLS] dropped
    }


def _expected_vision_settings(config: LlavaConfig) -> dict[str, object]:
    return {
        "hidden_act": config.vision.mlp_activation,
        "layer_norm_eps": config.vision.layer_norm_eps,
    }


def check_hf_config(
    hf_config: Mapping, config: LlavaConfig, where: str, *, vision: bool = False
) -> None:
    """CheckpointError if an HF ``config.json`` states a setting that differs from ``config``.

    Only keys the file states are checked (a missing key means HF's default, which we do not
    guess). ``vision=True``: a CLIP ``config.json`` (its ``vision_config``, or the whole file for
    a ``CLIPVisionConfig``).
    """
    if vision:
        hf_config = hf_config.get("vision_config", hf_config)
    expected = _expected_vision_settings(config) if vision else _expected_settings(config)
    check_settings(hf_config, expected, where)
