"""Write a dual-encoder backbone folder from a released Hugging Face CLIP (``openai/clip-vit-*``).

The folder is what ``backbone.source="load"`` with ``backbone.path`` reads: orbax ``params``,
``meta.json`` whose ``model`` is the ``ModelConfig`` derived from the CLIP ``config.json`` (a run
whose ``model`` differs is refused, naming the keys; ``configs/clip_demo.py`` takes it from
there), and ``tokenizer.json``, CLIP's BPE tokenizer with its padding id recorded (the run's
class prompts are encoded with it, ``data.prompt_tokenizer``).

With ``text_hf_dir`` (a Hugging Face BERT or sentence-transformers folder) the text tower is that
BERT instead of CLIP's (``model.text_tower="bert"``, the BiomedCLIP-style pairing): the vision
tower, ``visual_projection`` and ``logit_scale`` come from the CLIP folder, the BERT encoder and
its ``tokenizer.json`` (WordPiece, padded with id 0) from the BERT folder, and the text projection
``text/proj``, which a BERT folder has no counterpart for, is ``hf_bert.initial_projection``
(identity when CLIP's ``projection_dim`` is BERT's hidden size, else seeded random
semi-orthogonal; the backbone is frozen, so a run trains adapters around it).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path

import jax
import numpy as np

from mslora_jax.data.prompt_tokenizer import TOKENIZER_FILE, encode_prompts, load_prompt_tokenizer
from mslora_jax.errors import CheckpointError, DataError
from mslora_jax.interop.backbone_folder import (
    read_hf_config,
    save_backbone_atomically,
)
from mslora_jax.interop.hf_bert import (
    bert_tokenizer_json,
    convert_hf_bert,
    initial_projection,
    read_bert_config,
)
from mslora_jax.interop.hf_clip import (
    CLIP_NAMES,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SUBS,
    check_model_config,
    model_config_from_hf,
)
from mslora_jax.interop.hf_names import convert_tensors
from mslora_jax.interop.safetensors_folder import SafetensorsFolder
from mslora_jax.io_utils import check_new_folder, read_json
from mslora_jax.models.bert import BertTextConfig
from mslora_jax.models.clip import ModelConfig, bert_text_fields, eos_positions, init_backbone

log = logging.getLogger(__name__)

_RECORDED_KEYS = ("_name_or_path", "architectures", "transformers_version")
DEFAULT_PAD_TOKEN = "<|endoftext|>"  # CLIPTokenizer's pad_token when tokenizer_config.json has none


def _pixel_stats(hf_dir: Path) -> tuple[tuple, tuple]:
    """image_mean/std of ``preprocessor_config.json`` if there is one, else OpenAI CLIP's."""
    path = hf_dir / "preprocessor_config.json"
    if not path.exists():
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    config = read_json(path, "Hugging Face image processor config")
    try:
        return tuple(config["image_mean"]), tuple(config["image_std"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: no readable image_mean/image_std ({e!r})") from e


def _pad_token(hf_dir: Path) -> str:
    path = hf_dir / "tokenizer_config.json"
    if not path.exists():
        return DEFAULT_PAD_TOKEN
    token = read_json(path, "Hugging Face tokenizer config").get("pad_token", DEFAULT_PAD_TOKEN)
    return token["content"] if isinstance(token, dict) else token or DEFAULT_PAD_TOKEN


def backbone_tokenizer_json(hf_dir: Path, model: ModelConfig) -> str:
    """The backbone's ``tokenizer.json``: the HF folder's, with padding set to the pad token of
    its ``tokenizer_config.json`` (CLIP pads with ``<|endoftext|>``) and truncation off.

    CheckpointError if the file is missing, does not fit the vocabulary, or does not end a
    prompt with the token the text tower pools at (``model.text_eos_id``).
    """
    path = hf_dir / TOKENIZER_FILE
    try:
        tokenizer, _ = load_prompt_tokenizer(path, model.vocab_size)
    except DataError as e:
        raise CheckpointError(f"{e} (the CLIP folder's tokenizer is needed)") from None
    pad_token = _pad_token(hf_dir)
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise CheckpointError(f"{path}: the pad token {pad_token!r} is not in the vocabulary")
    sample = "a photo"
    ids = encode_prompts(tokenizer, [sample], max_len=model.text_positions, pad_id=pad_id)
    length = len(tokenizer.encode(sample).ids)
    pooled = int(eos_positions(ids, model.text_eos_id)[0])
    if pooled != length - 1:
        raise CheckpointError(
            f"{path}: the text tower pools {sample!r} at position {pooled}, not at its last token "
            f"({length - 1}): config.json's eos_token_id={model.text_eos_id} does not match this "
            "tokenizer's end-of-text token"
        )
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tokenizer.to_str(pretty=True)


# The CLIP tensors a backbone with a BERT text tower does not use (its text tower is BERT's).
_CLIP_TEXT = ("text_model.", "text_projection.")
# The prompts' padded length of a BERT text tower by default (CLIP's context length), at most
# its position table's rows.
DEFAULT_BERT_TEXT_LEN = 77


def with_bert_text(
    clip: ModelConfig, bert: BertTextConfig, max_text_len: int | None
) -> ModelConfig:
    """``clip``'s model config with the BERT text tower ``bert`` in place of CLIP's."""
    if max_text_len is None:
        max_text_len = min(DEFAULT_BERT_TEXT_LEN, bert.max_positions)
    return dataclasses.replace(clip, **bert_text_fields(bert), max_text_len=max_text_len)


def convert_clip_backbone(
    hf_dir: os.PathLike | str,
    out: os.PathLike | str,
    *,
    max_text_len: int | None = None,
    model: ModelConfig | None = None,
    text_hf_dir: os.PathLike | str | None = None,
) -> tuple[int, ModelConfig]:
    """Convert the HF CLIP folder ``hf_dir`` into the backbone folder ``out``.

    Returns (parameter count, the backbone's ``ModelConfig``). ``max_text_len``: the prompts'
    padded length (default: CLIP's 77 positions). ``model``: a run's model config to check
    against the weights (CheckpointError naming the differing keys). ``text_hf_dir``: a BERT
    folder whose encoder is the text tower instead (module docstring). Weights (safetensors,
    sharded or not) are read one tensor at a time after every name and shape is checked.
    ``out`` must not exist or be empty; it is written under a temporary name and renamed.
    """
    out = Path(out).absolute()
    check_new_folder(out)  # before any work: a taken --out fails fast
    hf_dir = Path(hf_dir).absolute()
    source = SafetensorsFolder(hf_dir)  # before config.json: "not a folder" comes first
    hf_config = read_hf_config(hf_dir, required=True)
    where = str(hf_dir / "config.json")
    mean, std = _pixel_stats(hf_dir)
    if model is not None and max_text_len is None:
        max_text_len = model.max_text_len
    derived = model_config_from_hf(
        hf_config,
        where,
        max_text_len=None if text_hf_dir else max_text_len,  # CLIP's own text length otherwise
        image_mean=mean,
        image_std=std,
    )
    provenance = {"source": "huggingface", "hf_dir": str(hf_dir), "architecture": "CLIPModel"}
    if text_hf_dir is not None:
        text_hf_dir = Path(text_hf_dir).absolute()
        bert = read_bert_config(text_hf_dir, embed_dim=derived.embed_dim)
        derived = with_bert_text(derived, bert, max_text_len)
        provenance["text_hf_dir"] = str(text_hf_dir)
    if model is not None:
        check_model_config(derived, model, f"{hf_dir} (from {where})")
    abstract = jax.eval_shape(functools.partial(init_backbone, derived), jax.random.PRNGKey(0))
    if text_hf_dir is None:
        tokenizer_json = backbone_tokenizer_json(hf_dir, derived)
        params = convert_tensors(abstract, source, CLIP_NAMES, subs=SUBS, where=str(hf_dir))
    else:
        tokenizer_json = bert_tokenizer_json(text_hf_dir, derived.vocab_size)
        image = {key: value for key, value in abstract.items() if key != "text"}
        params = convert_tensors(
            image,
            source,
            CLIP_NAMES,
            subs=SUBS,
            skip=lambda name: name.startswith(_CLIP_TEXT),
            where=str(hf_dir),
        )
        proj = initial_projection(derived.text_width, derived.embed_dim)
        params["text"] = convert_hf_bert(
            abstract["text"],
            SafetensorsFolder(text_hf_dir),
            initial={"proj": {"kernel": proj}},
            where=str(text_hf_dir),
        )
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    info = {
        **provenance,
        "num_params": count,
        "hf_config": {k: hf_config[k] for k in _RECORDED_KEYS if k in hf_config},
    }
    meta = {"model": dataclasses.asdict(derived), "provenance": provenance, "info": info}
    save_backbone_atomically(out, params, meta, texts={TOKENIZER_FILE: tokenizer_json})
    log.info("wrote %s (%d parameters converted from %s)", out, count, hf_dir)
    return count, derived
