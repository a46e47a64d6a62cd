"""Map Hugging Face LLaVA(-Med) weights onto the parameter tree of ``models.llava.Llava``.

The conversion is ``interop.hf_names``'s, driven by the target tree (``jax.eval_shape`` of
``init_llava``) with the table ``LLAVA_NAMES``: ``_MODULES`` (module path -> HF module) and the
tower's own leaves. Any tensor left over that is not on the ``IGNORED`` list is an error, as is a
missing one, so a config that does not match the weights cannot load silently.

HF names as released (``LlavaMistralForCausalLM``): ``model.embed_tokens``, ``model.layers.{i}``
(``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``), ``model.norm``, ``lm_head``, ``model.mm_projector.{0,2}`` and, if
saved with the model, the CLIP tower under ``LLAVA_VISION_PREFIX``; OpenAI's own CLIP folder
(``openai/clip-vit-large-patch14-336``) has the tower under ``CLIP_VISION_PREFIX``.

A scanned decoder's leaf ``decoder/blocks/...`` ``[depth, ...]`` is filled from
``model.layers.{i}`` for every i. q and k need no permutation: ``attention.apply_rope`` uses HF's
"rotate half" pairing (checked by tests/test_interop_llava_med.py against HF's formulas).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from mslora_jax.config import LlavaSettings
from mslora_jax.errors import CheckpointError
from mslora_jax.interop.hf_names import (
    CLS,
    SAME,
    NameTable,
    check_settings,
    convert_tensors,
    module_name,
)
from mslora_jax.interop.safetensors_folder import TensorSource
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

# CLIP's vision tower below a flax module ``{t}`` (``vision_tower`` here, ``image`` in the dual
# encoder), as (flax module path, HF module name); ``{v}`` is the tower's HF prefix.
VISION_MODULES = (
    (r"{t}/patch_embed", r"{v}embeddings.patch_embedding"),
    (r"{t}/ln_pre", r"{v}pre_layrnorm"),  # sic: HF's spelling
    (r"{t}/encoder/block_(\d+)/attn/(q|k|v|out)", r"{v}encoder.layers.\1.self_attn.\2_proj"),
    (r"{t}/encoder/block_(\d+)/ln_attn", r"{v}encoder.layers.\1.layer_norm1"),
    (r"{t}/encoder/block_(\d+)/ln_mlp", r"{v}encoder.layers.\1.layer_norm2"),
    (r"{t}/encoder/block_(\d+)/mlp/(fc1|fc2)", r"{v}encoder.layers.\1.mlp.\2"),
    # Our encoder's final LayerNorm is CLIP's post_layernorm (a per-token LayerNorm, so applying
    # it to every token or, as HF does, to the pooled [CLS] only is the same map). LLaVA reads an
    # earlier hidden state and never uses it, but the tree has it, so it is filled faithfully.
    (r"{t}/encoder/ln_final", r"{v}post_layernorm"),
)


def vision_tower_names(flax_tower: str) -> tuple[tuple, dict]:
    """(module rules, leaves) of CLIP's vision tower at flax module ``flax_tower``; templates
    keep ``{v}`` for the HF prefix."""
    modules = tuple((p.replace("{t}", flax_tower), t) for p, t in VISION_MODULES)
    leaves = {
        f"{flax_tower}/cls": (r"{v}embeddings.class_embedding", CLS),
        f"{flax_tower}/pos_embed": (r"{v}embeddings.position_embedding.weight", SAME),
    }
    return modules, leaves


_VISION_MODULES, _VISION_LEAVES = vision_tower_names("vision_tower")
_MODULES = _VISION_MODULES + (
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


def _missing_tower_hint(missing: list[str]) -> str:
    if all(".vision_model." in f".{n}" for n in missing):
        return (
            "; the CLIP vision tower is not there: give the folder of "
            "openai/clip-vit-large-patch14-336 as the vision source (--vision-hf-dir)"
        )
    return ""


LLAVA_NAMES = NameTable(
    modules=_MODULES,
    leaves=_VISION_LEAVES,
    ignored=IGNORED,
    scanned=(f"decoder/{SCANNED}/", "decoder/block_{i}/"),
    missing_hint=_missing_tower_hint,
)


def hf_module_name(module: str, vision_prefix: str = LLAVA_VISION_PREFIX) -> str:
    """The HF module name of a flax module path in the unrolled layout (``decoder/block_3/attn/q``
    -> ``model.layers.3.self_attn.q_proj``), e.g. a PEFT adapter's module; CheckpointError if
    the path has none (``LLAVA_NAMES`` is the one table for weights and adapters alike)."""
    return module_name(module, LLAVA_NAMES, {"v": vision_prefix})


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
    used); ``skip(name)``: more tensors that may go unused (see ``hf_names.check_tensor_names``).
    Names and shapes are all checked before the first tensor is read; then tensors are read one
    at a time, so the peak memory is the result plus one tensor.
    """
    return convert_tensors(
        abstract,
        source,
        LLAVA_NAMES,
        subs={"v": vision_prefix},
        skip=skip,
        where=where,
        dtype=dtype,
    )


_UNSTATED = object()  # a config.json key that is absent (None is a stated value)


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


def check_hf_run_settings(hf_config: Mapping, settings: LlavaSettings, where: str) -> None:
    """CheckpointError naming each LLaVA ``config.json`` field that contradicts the run settings.

    These are fields no tensor shape reveals, about how the weights were meant to be run:
    ``mm_use_im_start_end`` (image tokens wrapped in ``<im_start>``/``<im_end>``, which the
    conversation templates here never add), ``image_aspect_ratio`` (``"pad"`` is
    ``llava.pad_to_square=True``; ``"anyres"`` tiling is not implemented), ``tie_word_embeddings``
    (the decoder here has its own ``lm_head``) and ``sliding_window`` (the decoder here attends
    to the whole sequence: the same map only while a run's sequences fit in the window). Keys
    the file does not state are not checked.
    """
    problems = []
    if hf_config.get("mm_use_im_start_end"):
        problems.append(
            "mm_use_im_start_end=True, but the conversation templates here put no "
            "<im_start>/<im_end> tokens around the image (LLaVA-Med v1.5 has False)"
        )
    aspect = hf_config.get("image_aspect_ratio", _UNSTATED)
    if aspect == "anyres":
        problems.append('image_aspect_ratio="anyres" (image tiling) is not implemented here')
    elif aspect == "pad" and not settings.pad_to_square:
        problems.append('image_aspect_ratio="pad" but llava.pad_to_square=False')
    elif aspect is not _UNSTATED and aspect != "pad" and settings.pad_to_square:
        problems.append(f"image_aspect_ratio={aspect!r} but llava.pad_to_square=True")
    if hf_config.get("tie_word_embeddings"):
        problems.append(
            "tie_word_embeddings=True, but the decoder here has its own lm_head (no tying)"
        )
    window = hf_config.get("sliding_window")
    # The longest sequence a run feeds the decoder: a full text sequence with the image's
    # patches spliced in, plus the generated answer.
    longest = settings.max_len + settings.model_config().num_patches - 1 + settings.max_new_tokens
    if window is not None and window < longest:
        problems.append(
            f"sliding_window={window} is shorter than the longest sequence of this run "
            f"({longest} tokens: llava.max_len + image patches - 1 + llava.max_new_tokens), but "
            "the decoder here attends to the whole sequence"
        )
    if problems:
        raise CheckpointError(f"{where}: {'; '.join(problems)}")
