"""Converting Hugging Face LLaVA(-Med) weights: the converted model against a NumPy reference of
HF's LLaVA forward, the safetensors reader (sharded, bf16/fp16, a separate CLIP folder), errors,
and the CLI's folder loaded by a run's ``backbone.source="load"``."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from mslora_jax.config import experiment_config
from mslora_jax.errors import CheckpointError
from mslora_jax.families.llava.setup import llava_model_json, prepare_generative
from mslora_jax.interop.hf_llava import (
    CLIP_VISION_PREFIX,
    LLAVA_VISION_PREFIX,
    check_hf_config,
    check_hf_run_settings,
    convert_hf_llava,
)
from mslora_jax.interop.llava_med import convert_llava_backbone
from mslora_jax.interop.safetensors_folder import MergedSource, SafetensorsFolder
from mslora_jax.models.decoder import DecoderConfig
from mslora_jax.models.llava import Llava, LlavaConfig, init_llava
from mslora_jax.parallel.mesh import make_mesh
from mslora_jax.train.checkpoints import abstract_like, load_backbone
from tests.helpers import TINY_CLIP_VIT, clip_vision_hidden_states, load_config_file, softmax
from tests.test_run import _cli

IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX
VISION = TINY_CLIP_VIT
DECODER = DecoderConfig(  # Mistral-style, grouped-query attention; a small theta so every
    # rotary frequency turns noticeably over a few positions
    vocab_size=64,
    width=32,
    depth=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=48,
    max_len=64,
    rope_theta=100.0,
    rms_eps=1e-5,
)
CONFIG = LlavaConfig(vision=VISION, decoder=DECODER, image_token_id=IMAGE)  # 4 patches
# Tensors a real checkpoint holds that the model does not use.
EXTRA_CLIP = ("text_model.embeddings.token_embedding.weight", "logit_scale")


# ---------------------------------------------------------------- HF-named weights and files


def hf_weights(
    config: LlavaConfig, seed: int = 0, *, vision_prefix: str | None = LLAVA_VISION_PREFIX
) -> dict[str, np.ndarray]:
    """Random float32 weights under the released HF names (tower omitted if no prefix)."""
    rng = np.random.default_rng(seed)
    vis, dec = config.vision, config.decoder
    shapes = {}

    def linear(name: str, out: int, inp: int, bias: bool = True):
        shapes[f"{name}.weight"] = ("linear", (out, inp))
        if bias:
            shapes[f"{name}.bias"] = ("bias", (out,))

    def norm(name: str, width: int, bias: bool = True):
        shapes[f"{name}.weight"] = ("scale", (width,))
        if bias:
            shapes[f"{name}.bias"] = ("bias", (width,))

    if vision_prefix is not None:
        v, p, d = vision_prefix, vis.patch_size, vis.width
        num_pos = 1 + (vis.image_size // p) ** 2
        shapes[f"{v}embeddings.class_embedding"] = ("embed", (d,))
        shapes[f"{v}embeddings.patch_embedding.weight"] = ("linear", (d, 3, p, p))
        shapes[f"{v}embeddings.position_embedding.weight"] = ("embed", (num_pos, d))
        shapes[f"{v}embeddings.position_ids"] = ("index", (1, num_pos))  # a buffer, ignored
        norm(f"{v}pre_layrnorm", d)
        for i in range(vis.depth):
            layer = f"{v}encoder.layers.{i}."
            for name in ("q", "k", "v", "out"):
                linear(f"{layer}self_attn.{name}_proj", d, d)
            norm(f"{layer}layer_norm1", d)
            norm(f"{layer}layer_norm2", d)
            linear(f"{layer}mlp.fc1", vis.mlp_dim, d)
            linear(f"{layer}mlp.fc2", d, vis.mlp_dim)
        norm(f"{v}post_layernorm", d)
    w, kv, head = dec.width, dec.num_kv_heads, dec.head_dim
    linear("model.mm_projector.0", w, vis.width)
    linear("model.mm_projector.2", w, w)
    shapes["model.embed_tokens.weight"] = ("embed", (dec.vocab_size, w))
    for i in range(dec.depth):
        layer = f"model.layers.{i}."
        linear(f"{layer}self_attn.q_proj", w, w, bias=False)
        linear(f"{layer}self_attn.k_proj", kv * head, w, bias=False)
        linear(f"{layer}self_attn.v_proj", kv * head, w, bias=False)
        linear(f"{layer}self_attn.o_proj", w, w, bias=False)
        linear(f"{layer}mlp.gate_proj", dec.mlp_dim, w, bias=False)
        linear(f"{layer}mlp.up_proj", dec.mlp_dim, w, bias=False)
        linear(f"{layer}mlp.down_proj", w, dec.mlp_dim, bias=False)
        norm(f"{layer}input_layernorm", w, bias=False)
        norm(f"{layer}post_attention_layernorm", w, bias=False)
    norm("model.norm", w, bias=False)
    shapes["lm_head.weight"] = ("linear", (dec.vocab_size, w))

    def sample(kind: str, shape: tuple[int, ...]) -> np.ndarray:
        if kind == "linear":  # unit-variance outputs: torch weights are [out, in, ...]
            return rng.normal(size=shape) / math.sqrt(np.prod(shape[1:]))
        if kind == "scale":
            return 1.0 + 0.1 * rng.normal(size=shape)
        if kind == "index":
            return np.arange(np.prod(shape)).reshape(shape)
        return (0.1 if kind == "bias" else 1.0) * rng.normal(size=shape)

    return {name: sample(*spec).astype(np.float32) for name, spec in shapes.items()}


class DictSource:
    """An in-memory ``TensorSource``."""

    def __init__(self, tensors):
        self.tensors = tensors

    def shapes(self):
        return {name: value.shape for name, value in self.tensors.items()}

    def read(self, name):
        return np.asarray(self.tensors[name], np.float32)

    def describe(self, name):
        return "memory"


def write_sharded(directory, tensors: dict, num_shards: int = 2) -> None:
    """``model-0000i-of-0000n.safetensors`` shards and their index, as ``save_pretrained``."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(num_shards):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i::num_shards]}
        save_file(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def abstract(config: LlavaConfig = CONFIG):
    return jax.eval_shape(lambda key: init_llava(config, key), jax.random.PRNGKey(0))


# ---------------------------------------------------------------- HF's LLaVA forward in NumPy


def _rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def mistral_logits(w, embeds: np.ndarray, dec: DecoderConfig) -> np.ndarray:
    """HF ``MistralForCausalLM`` on one unpadded sequence of input embeddings ``[L, D]``."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    length, heads, kv_heads, dh = len(embeds), dec.num_heads, dec.num_kv_heads, dec.head_dim
    # Rotary embedding: inv_freq over even dims, emb = cat(freqs, freqs), rotate_half.
    inv_freq = 1.0 / dec.rope_theta ** (np.arange(0, dh, 2) / dh)
    freqs = np.outer(np.arange(length), inv_freq)
    cos, sin = np.cos(np.concatenate([freqs] * 2, -1)), np.sin(np.concatenate([freqs] * 2, -1))

    def rotate_half(t):
        return np.concatenate([-t[..., dh // 2 :], t[..., : dh // 2]], axis=-1)

    def rope(t):  # [H, L, dh]
        return t * cos + rotate_half(t) * sin

    causal = np.triu(np.full((length, length), -np.inf), k=1)
    x = np.asarray(embeds, np.float64)
    for i in range(dec.depth):
        layer = f"model.layers.{i}."
        h = _rms_norm(x, w[layer + "input_layernorm.weight"], dec.rms_eps)

        def proj(name, n, h=h, layer=layer):  # -> [n, L, dh]
            return (h @ w[f"{layer}self_attn.{name}_proj.weight"].T).reshape(length, n, dh)

        q = rope(proj("q", heads).transpose(1, 0, 2))
        k = rope(proj("k", kv_heads).transpose(1, 0, 2))
        v = proj("v", kv_heads).transpose(1, 0, 2)
        # repeat_kv: kv head j serves query heads j * n_rep ... (j + 1) * n_rep - 1.
        k, v = np.repeat(k, heads // kv_heads, axis=0), np.repeat(v, heads // kv_heads, axis=0)
        attn = softmax(q @ k.transpose(0, 2, 1) / math.sqrt(dh) + causal)
        out = (attn @ v).transpose(1, 0, 2).reshape(length, heads * dh)
        x = x + out @ w[layer + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, w[layer + "post_attention_layernorm.weight"], dec.rms_eps)
        gate = h @ w[layer + "mlp.gate_proj.weight"].T
        up = h @ w[layer + "mlp.up_proj.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[layer + "mlp.down_proj.weight"].T
    return _rms_norm(x, w["model.norm.weight"], dec.rms_eps) @ w["lm_head.weight"].T


def llava_logits(w, image: np.ndarray, ids: list[int], config: LlavaConfig) -> np.ndarray:
    """HF LLaVA (``LlavaMistralForCausalLM``) on one image ``[H, W, 3]`` and its token ids."""
    pixel_values = image.transpose(2, 0, 1)[None]  # torch's [1, 3, H, W]
    hidden = clip_vision_hidden_states(
        w,
        LLAVA_VISION_PREFIX,
        pixel_values,
        num_heads=config.vision.num_heads,
        eps=config.vision.layer_norm_eps,
    )
    feats = hidden[config.vision_layer][0, 1:]  # select_feature "patch": no [CLS]
    w64 = {k: np.asarray(v, np.float64) for k, v in w.items() if k.startswith("model.mm_")}
    h = feats @ w64["model.mm_projector.0.weight"].T + w64["model.mm_projector.0.bias"]
    h = 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))  # nn.GELU(): exact
    h = h @ w64["model.mm_projector.2.weight"].T + w64["model.mm_projector.2.bias"]
    # prepare_inputs_labels_for_multimodal: text before, image features, text after.
    where = ids.index(IMAGE)
    table = np.asarray(w["model.embed_tokens.weight"], np.float64)
    embeds = np.concatenate([table[ids[:where]], h, table[ids[where + 1 :]]])
    return mistral_logits(w, embeds, config.decoder)


# ---------------------------------------------------------------- tests


def test_converted_llava_matches_hf_reference(tmp_path):
    weights = hf_weights(CONFIG, seed=0)
    # A buffer older checkpoints saved (it restates rope_theta): ignored.
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    save_file(weights, tmp_path / "model.safetensors")
    params = convert_hf_llava(abstract(), SafetensorsFolder(tmp_path))
    assert jax.tree.structure(params) == jax.tree.structure(abstract())

    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    rows = [[1, IMAGE, 5, 6, 7, 8], [9, 10, 11, IMAGE, 12]]  # row 1 is right-padded
    ids = np.zeros((2, 6), np.int32)
    mask = np.zeros((2, 6), bool)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = row, True
    got = np.asarray(Llava(CONFIG).apply({"params": params}, images, ids, mask))
    num_patches = CONFIG.num_patches
    for b, row in enumerate(rows):
        want = llava_logits(weights, images[b], row, CONFIG)
        real = len(row) + num_patches - 1
        np.testing.assert_allclose(got[b, :real], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_sharded_bf16_folder_and_separate_clip_folder(tmp_path):
    # Values a bf16 file holds exactly, so every way of storing them converts to the same tree.
    weights = hf_weights(CONFIG, seed=2, vision_prefix=None)
    weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}
    stored = {  # bf16 weights, fp16 norms (exact: values near 1), one float32 tensor
        k: v.astype(np.float16) if "norm" in k else v for k, v in weights.items()
    }
    stored["lm_head.weight"] = weights["lm_head.weight"].astype(np.float32)
    # LLaVA's own copy of the tower (here: different values) is superseded by the CLIP folder.
    stale = hf_weights(CONFIG, seed=3)
    stored.update({k: v for k, v in stale.items() if k.startswith(LLAVA_VISION_PREFIX)})
    write_sharded(tmp_path / "llava", stored)
    clip = hf_weights(CONFIG, seed=4, vision_prefix=CLIP_VISION_PREFIX)
    clip = {k: v for k, v in clip.items() if k.startswith(CLIP_VISION_PREFIX)}
    clip.update({name: np.ones((2, 2), np.float32) for name in EXTRA_CLIP})
    (tmp_path / "clip").mkdir()
    save_file(clip, tmp_path / "clip" / "model.safetensors")

    llava_folder = SafetensorsFolder(tmp_path / "llava")
    assert llava_folder.read("model.norm.weight").dtype == np.float32
    source = MergedSource([llava_folder, SafetensorsFolder(tmp_path / "clip")])
    got = convert_hf_llava(
        abstract(),
        source,
        vision_prefix=CLIP_VISION_PREFIX,
        skip=lambda n: n.startswith("model.vision_tower."),  # EXTRA_CLIP: ignored anyway
    )
    # The same values from memory, all float32, tower under LLaVA's prefix.
    tower = {LLAVA_VISION_PREFIX + k.removeprefix(CLIP_VISION_PREFIX): v for k, v in clip.items()}
    want = convert_hf_llava(abstract(), DictSource({**weights, **tower}))
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda w: w.pop("model.layers.1.mlp.up_proj.weight"),
            r"1 tensor\(s\) missing: model\.layers\.1\.mlp\.up_proj\.weight",
        ),
        (
            lambda w: [w.pop(k) for k in list(w) if k.startswith(LLAVA_VISION_PREFIX)],
            r"tensor\(s\) missing: .*in all\).*--vision-hf-dir",
        ),
        (
            lambda w: w.update({"model.layers.2.mlp.up_proj.weight": np.zeros((48, 32))}),
            r"no place for: model\.layers\.2\.mlp\.up_proj\.weight",
        ),
        (
            lambda w: w.update(
                {"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}
            ),
            r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \[32, 32\], expected "
            r"\[16, 32\] for decoder/blocks/attn/k/kernel\[0\]",
        ),
    ],
    ids=["missing", "no-tower", "unexpected", "shape"],
)
def test_bad_weights_are_named(edit, message):
    weights = hf_weights(CONFIG)
    edit(weights)
    with pytest.raises(CheckpointError, match=message):
        convert_hf_llava(abstract(), DictSource(weights), where="memory")


def test_config_that_does_not_match_the_weights():
    # A tower with a patch-embedding bias (this repo's default ViT) is not OpenAI's CLIP.
    other = LlavaConfig(
        vision=dataclasses.replace(VISION, patch_bias=True),
        decoder=DECODER,
        image_token_id=IMAGE,
    )
    with pytest.raises(CheckpointError, match=r"missing: .*patch_embedding\.bias"):
        convert_hf_llava(abstract(other), DictSource(hf_weights(CONFIG)))
    # Settings shapes cannot show are checked against config.json.
    good = {"rope_theta": 100.0, "rms_norm_eps": 1e-5, "mm_vision_select_layer": -2}
    check_hf_config(good, CONFIG, "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json: rope_theta=1000000\.0 but .* 100\.0"):
        check_hf_config({**good, "rope_theta": 1e6}, CONFIG, "config.json")
    clip = {"vision_config": {"hidden_act": "gelu", "layer_norm_eps": 1e-5}}
    with pytest.raises(CheckpointError, match="hidden_act='gelu' but the config has 'quick_gelu'"):
        check_hf_config(clip, CONFIG, "clip/config.json", vision=True)


def test_unreadable_folders(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index"):
        SafetensorsFolder(tmp_path)
    write_sharded(tmp_path / "sharded", {"a": np.zeros(2, np.float32), "b": np.zeros(2)})
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard.* that do not exist"):
        SafetensorsFolder(tmp_path / "sharded")
    (tmp_path / "ints").mkdir()
    save_file({"ids": np.arange(3)}, tmp_path / "ints" / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'ids' has dtype I64"):
        SafetensorsFolder(tmp_path / "ints").read("ids")


def _tiny_run_config(data_root):
    """configs/demo_generative.py shrunk, with a CLIP-layout tower, loading its backbone."""
    cfg = load_config_file("demo_generative.py").to_dict()
    cfg["llava"]["vision"] = dataclasses.asdict(VISION)
    # CLIP's normalization, as LLaVA-Med's run needs: tuples, which meta.json stores as lists.
    cfg["llava"]["image_mean"] = (0.48145466, 0.4578275, 0.40821073)
    cfg["llava"]["image_std"] = (0.26862954, 0.26130258, 0.27577711)
    cfg["stream"] = [{**cfg["stream"][0], "num_train": 16, "num_test": 4}]
    cfg["base_tasks"] = []
    cfg["backbone"] = {"source": "load", "path": str(data_root / "backbone")}
    cfg["num_devices"] = 1
    cfg["progress"] = False
    return cfg


def test_cli_converts_and_a_run_loads_the_backbone(tmp_path, monkeypatch):
    cfg = _tiny_run_config(tmp_path)
    config = experiment_config(cfg)
    model_cfg = config.llava.model_config()
    weights = hf_weights(model_cfg, seed=5)
    (tmp_path / "hf").mkdir()
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"mm_vision_select_layer": -2}))
    (tmp_path / "hf" / "tokenizer.json").write_text('{"copied": true}')
    config_file = tmp_path / "tiny.py"
    config_file.write_text(
        "import json\nimport ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict(json.loads({json.dumps(cfg)!r}))\n"
    )
    out = tmp_path / "backbone"
    args = ("convert-llava-med", "--config", str(config_file), "--hf-dir", str(tmp_path / "hf"))
    proc = _cli(*args)  # --out defaults to the config's backbone.path
    assert proc.returncode == 0, proc.stderr[-2000:]
    count = sum(v.size for k, v in weights.items() if not k.endswith("position_ids"))
    assert f"converted {count:,} parameters into {out}" in proc.stdout
    assert json.loads((out / "meta.json").read_text())["info"]["hf_dir"] == str(tmp_path / "hf")
    assert json.loads((out / "tokenizer.json").read_text()) == {"copied": True}

    # The run's own loading path (prepare_generative -> obtain_frozen_backbone) accepts it.
    experiment, info = prepare_generative(config, tmp_path / "work", make_mesh(1))
    assert info["source"] == "huggingface" and info["num_params"] == count
    want = convert_hf_llava(abstract(model_cfg), DictSource(weights))
    jax.tree.map(np.testing.assert_array_equal, experiment.base_params, want)

    # A second conversion refuses to overwrite the folder, and leaves it as it was.
    proc = _cli(*args)
    assert proc.returncode == 2 and "already exists and is not empty" in proc.stderr


@pytest.mark.parametrize(
    "fields, pad_to_square, message",
    [
        ({"mm_use_im_start_end": True}, False, "mm_use_im_start_end=True, but"),
        ({"image_aspect_ratio": "pad"}, False, 'image_aspect_ratio="pad" but llava.pad_to_squa'),
        ({"image_aspect_ratio": "square"}, True, "image_aspect_ratio='square' but llava.pad_to"),
        ({"image_aspect_ratio": "anyres"}, False, '"anyres" \\(image tiling\\) is not implemented'),
        ({"tie_word_embeddings": True}, False, "tie_word_embeddings=True, but"),
        ({"sliding_window": 8}, False, "sliding_window=8 is shorter than the longest sequence"),
    ],
)
def test_contradicting_run_settings_are_refused_by_name(tmp_path, fields, pad_to_square, message):
    cfg = _tiny_run_config(tmp_path)
    cfg["llava"]["pad_to_square"] = pad_to_square
    config = experiment_config(cfg)
    (tmp_path / "hf").mkdir()
    save_file(hf_weights(config.llava.model_config()), tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(fields))
    with pytest.raises(CheckpointError, match=message):
        convert_llava_backbone(config, tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The settings LLaVA-Med v1.5 states, and a window no run sequence reaches, are accepted.
    longest = config.llava.max_len + CONFIG.num_patches - 1 + config.llava.max_new_tokens
    agreeing = {
        "mm_use_im_start_end": False,
        "image_aspect_ratio": "pad" if pad_to_square else "square",
        "tie_word_embeddings": False,
        "sliding_window": longest,
    }
    check_hf_run_settings(agreeing, config.llava, "config.json")
    check_hf_run_settings({"sliding_window": None}, config.llava, "config.json")


def test_failed_conversion_leaves_nothing(tmp_path):
    config = experiment_config(_tiny_run_config(tmp_path))
    weights = hf_weights(config.llava.model_config())
    weights.pop("lm_head.weight")
    (tmp_path / "hf").mkdir()
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing: lm_head.weight"):
        convert_llava_backbone(config, tmp_path / "hf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_backbone_from_a_llava_folder_and_a_clip_folder(tmp_path):
    config = experiment_config(_tiny_run_config(tmp_path))
    model_cfg = config.llava.model_config()
    llava = hf_weights(model_cfg, seed=6, vision_prefix=None)
    clip = hf_weights(model_cfg, seed=7, vision_prefix=CLIP_VISION_PREFIX)
    clip = {k: v for k, v in clip.items() if k.startswith(CLIP_VISION_PREFIX)}
    for name, tensors in (("hf", llava), ("clip", clip)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    clip_config = {"vision_config": {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}}
    (tmp_path / "clip" / "config.json").write_text(json.dumps(clip_config))
    (tmp_path / "out").mkdir()  # an empty folder may be written into
    count = convert_llava_backbone(config, tmp_path / "hf", tmp_path / "out", tmp_path / "clip")

    shapes = abstract(model_cfg)
    params, meta = load_backbone(
        tmp_path / "out", abstract_like(shapes, make_mesh(1)), llava_model_json(config)
    )
    assert meta["provenance"]["vision_hf_dir"] == str(tmp_path / "clip")
    assert count == sum(leaf.size for leaf in jax.tree.leaves(shapes))
    tower = {LLAVA_VISION_PREFIX + k.removeprefix(CLIP_VISION_PREFIX): v for k, v in clip.items()}
    want = convert_hf_llava(shapes, DictSource({**llava, **tower}))
    jax.tree.map(np.testing.assert_array_equal, params, want)


def test_bfloat16_config_converts_to_bfloat16(tmp_path):
    """llava.dtype="bfloat16": the folder holds bf16 (half the disk), and the run reads it."""
    cfg = _tiny_run_config(tmp_path)
    cfg["llava"]["dtype"] = "bfloat16"
    config = experiment_config(cfg)
    model_cfg = config.llava.model_config()
    weights = hf_weights(model_cfg, seed=8)
    (tmp_path / "hf").mkdir()
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    convert_llava_backbone(config, tmp_path / "hf", config.backbone.path)
    experiment, _ = prepare_generative(config, tmp_path / "work", make_mesh(1))
    want = convert_hf_llava(abstract(model_cfg), DictSource(weights))
    got = experiment.base_params
    assert {leaf.dtype for leaf in jax.tree.leaves(got)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(g, w.astype(jnp.bfloat16)), got, want)


def test_backbone_in_the_unrolled_layout_is_read_with_scan_layers_off_and_refused_otherwise(
    tmp_path,
):
    """A backbone saved before the scanned decoder (``block_{i}``, no ``scan_layers`` in its
    meta.json) is read by a config with ``scan_layers=False`` and refused, with the way to read
    it, by one with the default scanned layout."""
    from mslora_jax.train.checkpoints import save_backbone

    unrolled = dataclasses.replace(
        CONFIG, decoder=dataclasses.replace(CONFIG.decoder, scan_layers=False)
    )
    shapes = jax.eval_shape(lambda k: init_llava(unrolled, k), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)
    old_json = dataclasses.asdict(unrolled)
    del old_json["decoder"]["scan_layers"]  # as written before the key existed
    save_backbone(tmp_path / "old", params, {"model": old_json})
    abstract = lambda cfg: jax.eval_shape(lambda k: init_llava(cfg, k), jax.random.PRNGKey(0))
    loaded, _ = load_backbone(tmp_path / "old", abstract(unrolled), dataclasses.asdict(unrolled))
    assert "block_1" in loaded["decoder"]
    with pytest.raises(CheckpointError, match=r"scan_layers: None -> True.*scan_layers=False"):
        load_backbone(tmp_path / "old", abstract(CONFIG), dataclasses.asdict(CONFIG))
