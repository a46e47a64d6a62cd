"""Map a Hugging Face ``BertModel`` folder (safetensors) onto ``models.bert.BertTextEncoder``.

Table-driven as ``hf_llava`` (``tensor_map``): every leaf of the target tree names one HF tensor
by ``_MODULES``; names and shapes are all checked before the first tensor is read. HF names:
``embeddings.{word,position,token_type}_embeddings``, ``embeddings.LayerNorm``,
``encoder.layer.{i}.attention.self.{query,key,value}``, ``attention.output.dense``,
``attention.output.LayerNorm``, ``intermediate.dense``, ``output.dense``, ``output.LayerNorm``,
``pooler.dense``, all under an optional prefix (``bert.`` in ``BertForMaskedLM``-style
checkpoints such as PubMedBERT; found from where ``embeddings.word_embeddings.weight`` lies).
Tensors outside the prefix (a masked-LM head, ...) are not the text tower and go unused, as do
the ``position_ids``/``token_type_ids`` buffers and ``pooler.dense`` unless pooling is
``"pooler"``; any other unused tensor under the prefix, or a missing one, is an error.

``config.json`` keys that shapes cannot check (heads, activation, LayerNorm epsilon, position
embedding type, padding id, ...) are compared with the config by ``check_hf_bert_config``. A
sentence-transformers folder (``modules.json``) states its pooling in ``1_Pooling/config.json``
(``sentence_transformers_pooling``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from mslora_jax.errors import CheckpointError
from mslora_jax.interop import tensor_map
from mslora_jax.interop.safetensors_folder import SafetensorsFolder, TensorSource
from mslora_jax.io_utils import read_json
from mslora_jax.models.bert import PAD_ID, BertTextConfig, init_bert

# (flax module path, HF module name after the prefix). Matched in full.
_MODULES = (
    (r"token_embed", r"embeddings.word_embeddings"),
    (r"position_embed", r"embeddings.position_embeddings"),
    (r"type_embed", r"embeddings.token_type_embeddings"),
    (r"ln_embed", r"embeddings.LayerNorm"),
    (r"encoder/block_(\d+)/attn/q", r"encoder.layer.\1.attention.self.query"),
    (r"encoder/block_(\d+)/attn/k", r"encoder.layer.\1.attention.self.key"),
    (r"encoder/block_(\d+)/attn/v", r"encoder.layer.\1.attention.self.value"),
    (r"encoder/block_(\d+)/attn/out", r"encoder.layer.\1.attention.output.dense"),
    (r"encoder/block_(\d+)/ln_attn", r"encoder.layer.\1.attention.output.LayerNorm"),
    (r"encoder/block_(\d+)/mlp/fc1", r"encoder.layer.\1.intermediate.dense"),
    (r"encoder/block_(\d+)/mlp/fc2", r"encoder.layer.\1.output.dense"),
    (r"encoder/block_(\d+)/ln_mlp", r"encoder.layer.\1.output.LayerNorm"),
    (r"pooler", r"pooler.dense"),
)
_ANCHOR = "embeddings.word_embeddings.weight"
# Buffers (index tables, not weights), and the pooler, which only "pooler" pooling uses.
_BUFFERS = r"embeddings\.(position_ids|token_type_ids)$"
# HF's hidden_act -> ours (transformer.ACTIVATIONS).
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}


def find_prefix(names) -> str:
    """The prefix before ``embeddings.word_embeddings.weight`` ("" or e.g. ``"bert."``)."""
    found = sorted(
        n[: -len(_ANCHOR)]
        for n in names
        if n.endswith(_ANCHOR) and (n == _ANCHOR or n[: -len(_ANCHOR)].endswith("."))
    )
    if len(found) > 1:
        raise CheckpointError(
            f"several BERT encoders in one folder (prefixes {found}); give the prefix to use"
        )
    return found[0] if found else ""


def hf_bert_targets(abstract: Mapping, prefix: str = "") -> dict[str, tensor_map.Target]:
    """``{HF tensor name: Target}`` for the leaves of a ``BertTextEncoder`` params tree.

    The projection ``proj`` (a dual-encoder head, not part of ``BertModel``) has no counterpart
    and is left out.
    """
    escaped = prefix.replace("\\", "\\\\")  # the prefix goes into a regex template
    modules = [(pattern, escaped + template) for pattern, template in _MODULES]
    targets = {}
    for path, shape in tensor_map.leaf_paths(abstract):
        if path.startswith("proj/"):
            continue
        found = tensor_map.table_name(path, len(shape), modules)
        if found is None:
            raise CheckpointError(f"parameter {path} has no known Hugging Face BERT counterpart")
        name, layout = found
        targets[name] = tensor_map.Target(path, shape, layout)
    return targets


def convert_hf_bert(
    abstract: Mapping,
    source: TensorSource,
    *,
    prefix: str | None = None,
    initial: Mapping | None = None,
    where: str = "Hugging Face BERT weights",
    dtype=np.float32,
) -> dict:
    """The ``BertTextEncoder`` params tree (nested dicts of numpy arrays) from HF tensors.

    ``abstract``: the tree of ``init_bert`` (arrays or ``ShapeDtypeStruct``s; only shapes are
    used). ``prefix``: before every HF name (None: found by ``find_prefix``). A projection
    ``proj`` (``embed_dim`` set) is not in a ``BertModel`` folder: it is taken from ``initial``
    (e.g. freshly initialised params), and without ``initial`` that is an error.
    """
    shapes = source.shapes()
    prefix = find_prefix(shapes) if prefix is None else prefix
    targets = hf_bert_targets(abstract, prefix)
    pooler = re.escape(prefix) + r"pooler\."
    uses_pooler = any(name.startswith(f"{prefix}pooler.") for name in targets)

    def may_skip(name: str) -> bool:
        under = name[len(prefix) :]
        return (
            not name.startswith(prefix)
            or re.match(_BUFFERS, under) is not None
            or (not uses_pooler and re.match(pooler, name) is not None)
        )

    tensor_map.check_tensor_names(targets, shapes, where, may_skip)
    tree = tensor_map.unflatten(tensor_map.read_targets(targets, source, dtype))
    if "proj" in abstract:
        if initial is None or "proj" not in initial:
            raise CheckpointError(
                f"{where}: the config's projection proj (embed_dim) has no counterpart in a "
                "BertModel folder; pass initial params to take it from, or set embed_dim=None"
            )
        tree["proj"] = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), initial["proj"])
    return tree


def expected_settings(config: BertTextConfig) -> dict[str, object]:
    """The BERT ``config.json`` keys with our values (shapes check the sizes too)."""
    return {
        "model_type": "bert",  # RoBERTa-style models offset positions by the padding id
        "hidden_act": config.activation,  # after HF_ACTIVATIONS
        "layer_norm_eps": config.layer_norm_eps,
        "position_embedding_type": "absolute",
        "num_attention_heads": config.num_heads,
        "pad_token_id": PAD_ID,  # the padding mask is ``tokens != 0``
        "is_decoder": False,
        "add_cross_attention": False,
        "hidden_size": config.width,
        "num_hidden_layers": config.depth,
        "intermediate_size": config.mlp_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_positions,
        "type_vocab_size": config.type_vocab_size,
    }


def check_hf_bert_config(hf_config: Mapping, config: BertTextConfig, where: str) -> None:
    """CheckpointError naming every ``config.json`` setting that contradicts ``config``."""
    hf_config = dict(hf_config)
    if "hidden_act" in hf_config:  # in our names, so "gelu_new" matches "gelu_tanh"
        act = hf_config["hidden_act"]
        hf_config["hidden_act"] = HF_ACTIVATIONS.get(act, act)
    tensor_map.check_settings(hf_config, expected_settings(config), where)


def bert_config_from_hf(
    config_json: Mapping,
    *,
    pooling: str = "cls",
    embed_dim: int | None = None,
    where: str = "config.json",
) -> BertTextConfig:
    """Our config from a parsed BERT ``config.json`` (refusing settings we do not implement)."""
    try:
        act = config_json.get("hidden_act", "gelu")
        if act not in HF_ACTIVATIONS:
            raise CheckpointError(
                f"{where}: hidden_act={act!r} is not supported; expected one of "
                f"{sorted(HF_ACTIVATIONS)}"
            )
        config = BertTextConfig(
            vocab_size=config_json["vocab_size"],
            width=config_json["hidden_size"],
            depth=config_json["num_hidden_layers"],
            num_heads=config_json["num_attention_heads"],
            mlp_dim=config_json["intermediate_size"],
            max_positions=config_json.get("max_position_embeddings", 512),
            type_vocab_size=config_json.get("type_vocab_size", 2),
            layer_norm_eps=config_json.get("layer_norm_eps", 1e-12),
            activation=HF_ACTIVATIONS[act],
            pooling=pooling,
            embed_dim=embed_dim,
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: key {e.args[0]!r} missing") from e
    check_hf_bert_config(config_json, config, where)
    return config


def sentence_transformers_pooling(folder: os.PathLike | str) -> str | None:
    """The pooling a sentence-transformers folder states ("mean" or "cls"), None if none.

    Reads ``modules.json`` for the ``Pooling`` module's folder, then its ``config.json``;
    pooling modes we do not implement (max, mean_sqrt_len, several at once) are an error.
    """
    folder = Path(folder)
    if not (folder / "modules.json").exists():
        return None
    modules = read_json(folder / "modules.json", "sentence-transformers modules")
    paths = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    if not paths:
        return None
    path = folder / paths[0] / "config.json"
    modes = read_json(path, "sentence-transformers pooling")
    on = sorted(k for k, v in modes.items() if k.startswith("pooling_mode_") and v is True)
    known = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(on) != 1 or on[0] not in known:
        raise CheckpointError(
            f"{path}: pooling modes {on} are not supported; expected exactly one of {sorted(known)}"
        )
    return known[on[0]]


def load_hf_bert(
    folder: os.PathLike | str,
    *,
    pooling: str | None = None,
    embed_dim: int | None = None,
    rng: jax.Array | None = None,
) -> tuple[BertTextConfig, dict]:
    """``(config, params)`` of the BERT text tower in an HF (or sentence-transformers) folder.

    ``pooling``: None takes the sentence-transformers pooling if the folder states one, else
    ``"cls"``. With ``embed_dim`` the projection is initialised at random from ``rng``.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    hf_config = read_json(config_path, "Hugging Face BERT config")
    if pooling is None:
        pooling = sentence_transformers_pooling(folder) or "cls"
    config = bert_config_from_hf(
        hf_config, pooling=pooling, embed_dim=embed_dim, where=str(config_path)
    )
    source = SafetensorsFolder(folder)
    abstract = jax.eval_shape(lambda: init_bert(config, jax.random.key(0)))
    initial = None
    if embed_dim is not None:  # nn.Dense's initializer, for the projection alone
        kernel = nn.initializers.lecun_normal()(
            jax.random.key(0) if rng is None else rng, (config.width, embed_dim)
        )
        initial = {"proj": {"kernel": kernel}}
    params = convert_hf_bert(abstract, source, initial=initial, where=str(folder))
    return config, params
