"""Map a Hugging Face ``BertModel`` folder (safetensors) onto ``models.bert.BertTextEncoder``.

Table-driven (``interop.hf_names``, as ``hf_llava`` and ``hf_clip``): ``BERT_NAMES`` names the
HF tensor of every leaf of the tower's params tree; names and shapes are all checked before the
first tensor is read. HF names: ``embeddings.{word,position,token_type}_embeddings``,
``embeddings.LayerNorm``, ``encoder.layer.{i}.attention.self.{query,key,value}``,
``attention.output.dense``, ``attention.output.LayerNorm``, ``intermediate.dense``,
``output.dense``, ``output.LayerNorm``, ``pooler.dense``, all under a prefix ``{p}`` (``""``, or
``bert.`` in ``BertForMaskedLM``-style checkpoints such as PubMedBERT; ``find_prefix`` finds it
from where ``embeddings.word_embeddings.weight`` lies). Tensors outside the prefix (a masked-LM
head, ...) are not the text tower and go unused, as do the ``position_ids``/``token_type_ids``
buffers and ``pooler.dense`` unless pooling is ``"pooler"``; any other unused tensor under the
prefix, or a missing one, is an error.

The projection ``proj`` (``embed_dim``: a dual-encoder head, not part of ``BertModel``) is not in
the folder: it is taken from ``initial`` params, by default ``initial_projection`` (identity when
``embed_dim`` is the hidden size, so the tower's output is exactly the pooled BERT embedding, e.g.
sentence-transformers'; otherwise a seeded random semi-orthogonal matrix, which for ``embed_dim``
above the hidden size keeps every norm and cosine similarity of the pooled embeddings).

``config.json`` keys that shapes cannot check (heads, activation, LayerNorm epsilon, position
embedding type, padding id, ...) are compared with the config by ``check_hf_bert_config``. A
sentence-transformers folder (``modules.json``) states its pooling in ``1_Pooling/config.json``
(``sentence_transformers_pooling``); modules other than Transformer, Pooling and Normalize (a
``Dense`` head, ...) are refused rather than left out of the embedding.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from mslora_jax.data.prompt_tokenizer import TOKENIZER_FILE, load_prompt_tokenizer
from mslora_jax.errors import CheckpointError, DataError
from mslora_jax.interop.hf_names import (
    HF_ACTIVATIONS,
    NameTable,
    check_settings,
    convert_tensors,
)
from mslora_jax.interop.safetensors_folder import SafetensorsFolder, TensorSource
from mslora_jax.io_utils import read_json
from mslora_jax.models.bert import PAD_ID, BertTextConfig, init_bert

# (flax module path in the tower, HF module name); ``{p}`` is the encoder's prefix.
BERT_NAMES = NameTable(
    modules=(
        (r"token_embed", r"{p}embeddings.word_embeddings"),
        (r"position_embed", r"{p}embeddings.position_embeddings"),
        (r"type_embed", r"{p}embeddings.token_type_embeddings"),
        (r"ln_embed", r"{p}embeddings.LayerNorm"),
        (r"encoder/block_(\d+)/attn/q", r"{p}encoder.layer.\1.attention.self.query"),
        (r"encoder/block_(\d+)/attn/k", r"{p}encoder.layer.\1.attention.self.key"),
        (r"encoder/block_(\d+)/attn/v", r"{p}encoder.layer.\1.attention.self.value"),
        (r"encoder/block_(\d+)/attn/out", r"{p}encoder.layer.\1.attention.output.dense"),
        (r"encoder/block_(\d+)/ln_attn", r"{p}encoder.layer.\1.attention.output.LayerNorm"),
        (r"encoder/block_(\d+)/mlp/fc1", r"{p}encoder.layer.\1.intermediate.dense"),
        (r"encoder/block_(\d+)/mlp/fc2", r"{p}encoder.layer.\1.output.dense"),
        (r"encoder/block_(\d+)/ln_mlp", r"{p}encoder.layer.\1.output.LayerNorm"),
        (r"pooler", r"{p}pooler.dense"),
    ),
    ignored=(r"(^|\.)embeddings\.(position_ids|token_type_ids)$",),  # index buffers
)
_ANCHOR = "embeddings.word_embeddings.weight"
# sentence-transformers modules whose effect the tower (plus DualEncoder's L2 normalization)
# reproduces; any other module in modules.json would change the embedding.
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


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


def initial_projection(width: int, embed_dim: int, rng: jax.Array | None = None) -> np.ndarray:
    """The ``proj`` kernel ``[width, embed_dim]`` of a folder that has none (module docstring):
    the identity if the sizes are equal, else ``nn.initializers.orthogonal`` from ``rng``."""
    if width == embed_dim:
        return np.eye(width, dtype=np.float32)
    rng = jax.random.key(0) if rng is None else rng
    return np.asarray(nn.initializers.orthogonal()(rng, (width, embed_dim)), np.float32)


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

    ``abstract``: the tower's params tree (arrays or ``ShapeDtypeStruct``s; only shapes are
    used). ``prefix``: before every HF name (None: found by ``find_prefix``). A projection
    ``proj`` in ``abstract`` is not in a ``BertModel`` folder: it is taken from ``initial``
    (CheckpointError without it).
    """
    shapes = source.shapes()
    prefix = find_prefix(shapes) if prefix is None else prefix
    uses_pooler = "pooler" in abstract

    def may_skip(name: str) -> bool:  # not the tower's, or the pooler "pooler" pooling needs
        return not name.startswith(prefix) or (
            not uses_pooler and name.startswith(f"{prefix}pooler.")
        )

    tower = {key: value for key, value in abstract.items() if key != "proj"}
    tree = convert_tensors(
        tower, source, BERT_NAMES, subs={"p": prefix}, skip=may_skip, where=where, dtype=dtype
    )
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
    check_settings(hf_config, expected_settings(config), where)


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
    pooling modes we do not implement (max, mean_sqrt_len, several at once), and modules other
    than ``_ST_MODULES`` (a ``Dense`` head would change the embedding), are an error.
    """
    folder = Path(folder)
    if not (folder / "modules.json").exists():
        return None
    modules_json = folder / "modules.json"
    modules = read_json(modules_json, "sentence-transformers modules")
    types = [str(m.get("type", "")) for m in modules]
    other = [t for t in types if t.rsplit(".", 1)[-1] not in _ST_MODULES]
    if other:
        raise CheckpointError(
            f"{modules_json}: modules {other} are not supported (only {list(_ST_MODULES)})"
        )
    paths = [m.get("path", "") for m, t in zip(modules, types) if t.endswith(".Pooling")]
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


def read_bert_config(
    folder: os.PathLike | str, *, pooling: str | None = None, embed_dim: int | None = None
) -> BertTextConfig:
    """The ``BertTextConfig`` of an HF (or sentence-transformers) BERT folder.

    ``pooling``: None takes the sentence-transformers pooling if the folder states one, else
    ``"cls"`` (BERT's [CLS] token).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    hf_config = read_json(config_path, "Hugging Face BERT config")
    if pooling is None:
        pooling = sentence_transformers_pooling(folder) or "cls"
    return bert_config_from_hf(
        hf_config, pooling=pooling, embed_dim=embed_dim, where=str(config_path)
    )


def load_hf_bert(
    folder: os.PathLike | str,
    *,
    pooling: str | None = None,
    embed_dim: int | None = None,
    rng: jax.Array | None = None,
) -> tuple[BertTextConfig, dict]:
    """``(config, params)`` of the BERT text tower in an HF (or sentence-transformers) folder.

    ``pooling``: as ``read_bert_config``. With ``embed_dim`` the projection is
    ``initial_projection`` (random ones drawn from ``rng``).
    """
    config = read_bert_config(folder, pooling=pooling, embed_dim=embed_dim)
    source = SafetensorsFolder(Path(folder))
    abstract = jax.eval_shape(lambda: init_bert(config, jax.random.key(0)))
    initial = None
    if embed_dim is not None:
        initial = {"proj": {"kernel": initial_projection(config.width, embed_dim, rng)}}
    params = convert_hf_bert(abstract, source, initial=initial, where=str(folder))
    return config, params


def bert_tokenizer_json(folder: os.PathLike | str, vocab_size: int) -> str:
    """The backbone's ``tokenizer.json``: the BERT folder's, with padding set to id ``PAD_ID``.

    CheckpointError if the file is missing, does not fit ``vocab_size``, pads with another id
    (the tower masks ``tokens != PAD_ID``), or does not put special tokens ([CLS] ... [SEP])
    around a prompt, as BERT and sentence-transformers do.
    """
    path = Path(folder) / TOKENIZER_FILE
    try:
        tokenizer, pad_id = load_prompt_tokenizer(path, vocab_size)
    except DataError as e:
        raise CheckpointError(f"{e} (the BERT folder's fast tokenizer is needed)") from None
    pad_token = tokenizer.id_to_token(PAD_ID)
    if pad_id != PAD_ID or pad_token is None:
        raise CheckpointError(
            f"{path}: pads with id {pad_id} ({pad_token!r} is id {PAD_ID}); the BERT text tower "
            f"masks padding as id {PAD_ID}"
        )
    special = tokenizer.encode("a photo").special_tokens_mask
    if not (special[0] and special[-1]):
        raise CheckpointError(
            f"{path}: its post-processor does not add special tokens around a prompt (BERT's "
            "[CLS] ... [SEP]), which the tower was trained with"
        )
    tokenizer.enable_padding(pad_id=PAD_ID, pad_token=pad_token)
    return tokenizer.to_str(pretty=True)
