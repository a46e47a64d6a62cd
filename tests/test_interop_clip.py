"""Converting Hugging Face CLIP into the dual encoder: logits against ``transformers.CLIPModel``
on a tiny random CLIP (both pooling rules), prompt ids against ``CLIPTokenizerFast``, sharded
folders, refused contradictions, and the CLI's folder used by a short run whose untrained
stage-0 accuracy is CLIPModel's."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from mslora_jax.cli import main as cli_main  # noqa: E402
from mslora_jax.config import experiment_config  # noqa: E402
from mslora_jax.data.prompt_tokenizer import (  # noqa: E402
    encode_prompts,
    load_prompt_tokenizer,
    prompt_encoder,
)
from mslora_jax.data.registry import load_tasks  # noqa: E402
from mslora_jax.data.tokenizer import prompt  # noqa: E402
from mslora_jax.errors import CheckpointError, ConfigError  # noqa: E402
from mslora_jax.interop.clip import convert_clip_backbone  # noqa: E402
from mslora_jax.interop.hf_clip import CLIP_NAMES, clip_module_name  # noqa: E402
from mslora_jax.interop.hf_names import hf_targets  # noqa: E402
from mslora_jax.models.clip import DualEncoder, ModelConfig, init_backbone  # noqa: E402
from mslora_jax.run.experiment import run_experiment  # noqa: E402
from mslora_jax.train.checkpoints import load_backbone  # noqa: E402
from tests.helpers import load_config_file  # noqa: E402

MAX_LEN = 12  # prompt length of the converted backbones (CLIP's table has POSITIONS rows)
POSITIONS = 32
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # a preprocessor_config.json's pixel statistics


def _tokenizer():
    """A tiny CLIP BPE: every byte (alone and word-final), a few merges, CLIP's two specials."""
    chars = list(bytes_to_unicode().values())
    merges = [("i", "m"), ("im", "a"), ("g", "e</w>"), ("ima", "ge</w>"), ("o", "f</w>")]
    merges += [("p", "a"), ("pa", "t"), ("h", "o"), ("r", "a")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return transformers.CLIPTokenizerFast(vocab=vocab, merges=merges)


def _hf_clip(tokenizer, *, eos_token_id=None, seed=0):
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=POSITIONS,
        eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    vision = dict(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=20)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # every weight random (LayerNorms included), logit_scale = log 12
        for name, param in model.named_parameters():
            param.add_(0.05 * torch.randn_like(param) + (0.02 if "layer_norm" in name else 0))
        model.logit_scale.fill_(float(np.log(12.0)))
    return model


def _save(model, tokenizer, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": MEAN, "image_std": STD})
    )
    return directory


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """{"eos"|"legacy": (HF model, its folder, its converted folder)} and the tokenizer."""
    tokenizer = _tokenizer()
    root = tmp_path_factory.mktemp("clip")
    out = {}
    for kind, eos in (("eos", None), ("legacy", 2)):
        model = _hf_clip(tokenizer, eos_token_id=eos)
        hf_dir = _save(model, tokenizer, root / f"hf_{kind}")
        converted = root / f"backbone_{kind}"
        convert_clip_backbone(hf_dir, converted, max_text_len=MAX_LEN)
        out[kind] = (model, hf_dir, converted)
    return out, tokenizer


def _load(converted):
    meta = json.loads((converted / "meta.json").read_text())
    model_cfg = ModelConfig(**meta["model"])
    abstract = jax.eval_shape(lambda: init_backbone(model_cfg, jax.random.PRNGKey(0)))
    params, _ = load_backbone(converted, abstract, meta["model"])
    return model_cfg, params


PROMPTS = [
    "a pathology image of x",  # 12 ids with its two special tokens: exactly MAX_LEN
    "An IMAGE of  X-ray!",  # lower-cased, spaces collapsed, punctuation split off
    "image of a photo",
    "image",
]


def _our_tokens(converted, prompts=PROMPTS):
    tokenizer, pad_id = load_prompt_tokenizer(converted / "tokenizer.json", 10_000)
    return encode_prompts(tokenizer, prompts, max_len=MAX_LEN, pad_id=pad_id)


@pytest.mark.parametrize("kind", ["eos", "legacy"])
def test_logits_match_transformers_clip(clip_folders, kind):
    folders, tokenizer = clip_folders
    hf_model, _, converted = folders[kind]
    model_cfg, params = _load(converted)
    eos = 2 if kind == "legacy" else tokenizer.eos_token_id
    assert (model_cfg.text_tower, model_cfg.text_eos_id) == ("clip", eos)
    tokens = _our_tokens(converted)
    hf_inputs = tokenizer(PROMPTS, padding="max_length", max_length=MAX_LEN, return_tensors="pt")
    np.testing.assert_array_equal(hf_inputs["input_ids"].numpy(), tokens)
    pixels = np.random.default_rng(1).normal(size=(3, 3, 16, 16)).astype(np.float32)  # NCHW

    image, text, scale = DualEncoder(model_cfg).apply(
        {"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(tokens)
    )
    ours = np.exp(float(scale)) * np.asarray(image) @ np.asarray(text).T
    with torch.no_grad():
        pixel_values = torch.from_numpy(pixels)
        want = hf_model(input_ids=hf_inputs["input_ids"], pixel_values=pixel_values)
        # With the padding mask CLIPProcessor passes: the same (padding follows end-of-text).
        masked = hf_model(**hf_inputs, pixel_values=pixel_values)
    want, masked = want.logits_per_image, masked.logits_per_image
    np.testing.assert_allclose(ours, want.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(masked.numpy(), want.numpy(), atol=1e-5)
    assert np.ptp(ours) > 0.5  # the prompts' logits really differ


def test_prompt_ids_match_clip_tokenizer_and_too_long_is_refused(clip_folders):
    folders, tokenizer = clip_folders
    converted = folders["eos"][2]
    ours = _our_tokens(converted)
    want = tokenizer(PROMPTS, padding="max_length", max_length=MAX_LEN)["input_ids"]
    np.testing.assert_array_equal(ours, np.array(want))
    assert ours[3].tolist() == [tokenizer.bos_token_id, want[3][1]] + [tokenizer.eos_token_id] * 10
    # HF truncates a long prompt to MAX_LEN (ending it with <|endoftext|>); we refuse it, as the
    # hashed tokenizer does: truncation could make two class prompts the same.
    long = "a pathology image of cat"
    hf_long = tokenizer([long], max_length=MAX_LEN, truncation=True)["input_ids"][0]
    assert len(hf_long) == MAX_LEN and hf_long[-1] == tokenizer.eos_token_id
    with pytest.raises(ConfigError, match="'a pathology image of cat' is 14 tokens .*allows 12"):
        _our_tokens(converted, [long])


def test_sharded_folder_converts_to_the_same_params(clip_folders, tmp_path):
    folders, tokenizer = clip_folders
    hf_model, _, converted = folders["eos"]
    sharded = _save(hf_model, tokenizer, tmp_path / "hf", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    convert_clip_backbone(sharded, tmp_path / "out", max_text_len=MAX_LEN)
    jax.tree.map(np.testing.assert_array_equal, _load(tmp_path / "out")[1], _load(converted)[1])


def test_module_names_cover_every_adapted_module(clip_folders):
    model_cfg, params = _load(clip_folders[0]["eos"][2])
    assert clip_module_name("image/encoder/block_0/attn/q") == (
        "vision_model.encoder.layers.0.self_attn.q_proj"
    )
    assert clip_module_name("text/encoder/block_1/mlp/fc2") == "text_model.encoder.layers.1.mlp.fc2"
    # Every converted tensor is one of HF CLIPModel's own parameters.
    hf_names = {n for n, _ in clip_folders[0]["eos"][0].named_parameters()}
    assert set(hf_targets(params, CLIP_NAMES, {"v": "vision_model."})) == hf_names


def _edit_config(hf_dir, tmp_path, **changes):
    """A copy of ``hf_dir`` whose config.json has ``changes`` ("text_config.x": value)."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(hf_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"text_config.hidden_act": "gelu"}, "text_config.hidden_act='gelu' but vision_config"),
        ({"vision_config.layer_norm_eps": 1e-6}, "layer_norm_eps=1e-05 but vision_config"),
        ({"text_config.hidden_act": "relu", "vision_config.hidden_act": "relu"}, "'relu'"),
        ({"text_config.num_hidden_layers": 3}, "missing: text_model.encoder.layers.2"),
        (
            {"projection_dim": 16},
            "visual_projection.weight has shape \\[20, 24\\], expected \\[16, 24\\]",
        ),
        ({"text_config.eos_token_id": 5}, "eos_token_id=5 does not match this tokenizer"),
    ],
)
def test_contradictions_are_refused_by_name(clip_folders, tmp_path, changes, match):
    edited = _edit_config(clip_folders[0]["eos"][1], tmp_path, **changes)
    with pytest.raises(CheckpointError, match=match):
        convert_clip_backbone(edited, tmp_path / "out", max_text_len=MAX_LEN)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["edited"]  # no temporary folder left


def test_a_run_model_that_differs_is_refused(clip_folders, tmp_path):
    folders, _ = clip_folders
    model_cfg = _load(folders["eos"][2])[0]
    wrong = ModelConfig(**{**model_cfg.__dict__, "text_num_heads": 2})
    with pytest.raises(CheckpointError, match="model.text_num_heads=2 but the weights need 4"):
        convert_clip_backbone(folders["eos"][1], tmp_path / "out", model=wrong)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        convert_clip_backbone(folders["eos"][1], tmp_path / "full")


def _hf_accuracy(hf_model, tokenizer, task, template, mean, std):
    """Zero-shot accuracy of transformers' CLIPModel on ``task``'s test images."""
    prompts = [prompt(template, task.modality, name) for name in task.class_names]
    inputs = tokenizer(prompts, padding=True, return_tensors="pt")
    pixels = (task.test_images.astype(np.float32) / 255.0 - np.array(mean)) / np.array(std)
    pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        logits = hf_model(**inputs, pixel_values=pixels).logits_per_image.numpy()
    return float(np.mean(logits.argmax(axis=1) == task.test_labels)), logits


def test_cli_converts_and_a_run_zero_shots_with_the_clip_text_tower(clip_folders, tmp_path):
    folders, tokenizer = clip_folders
    hf_model, _, _ = folders["eos"]
    sharded = _save(hf_model, tokenizer, tmp_path / "hf", max_shard_size="20KB")
    out = tmp_path / "backbone"
    cli_main.main(
        ["mslora-jax", "convert-clip", f"--hf-dir={sharded}", f"--out={out}", "--max-text-len=32"]
    )
    cfg = load_config_file("clip_demo.py", str(out))
    cfg.stream = cfg.stream[:1]
    for task in cfg.stream:
        task.update(num_classes=3, num_train=16, num_test=24)
    cfg.methods = ("mslora",)
    cfg.modalities = ("pathology",)
    cfg.num_devices = 1
    cfg.progress = False
    cfg.train.update(batch_size=8, steps_per_task=2, eval_batch_size=32)
    config = experiment_config(cfg)
    assert config.model.text_tower == "clip" and config.model.image_mean == MEAN

    results = run_experiment(config, tmp_path / "work")
    zero_shot = results["backbone"]["zero_shot_acc"]
    for task, ours in zip(load_tasks(config, config.stream), zero_shot, strict=True):
        want, logits = _hf_accuracy(hf_model, tokenizer, task, config.prompt_template, MEAN, STD)
        top2 = np.sort(logits, axis=1)[:, -2:]
        assert np.min(top2[:, 1] - top2[:, 0]) > 1e-3  # no near-tie that rounding could flip
        assert ours == pytest.approx(want, abs=1e-9)
    # The same class table as the run's: prompts through the backbone's tokenizer.json.
    encode = prompt_encoder(config)
    ids = encode(["a pathology image of x"])
    assert ids.shape == (1, 32) and ids[0, 0] == tokenizer.bos_token_id


def test_clip_text_tower_needs_its_backbone_folder(clip_folders):
    cfg = load_config_file("clip_demo.py", str(clip_folders[0]["eos"][2]))
    cfg.backbone = dict(source="random")
    with pytest.raises(ConfigError, match='needs backbone.source="load"'):
        prompt_encoder(experiment_config(cfg))


def test_real_data_config_runs_the_real_stream_on_the_converted_folder(clip_folders, tmp_path):
    converted = clip_folders[0]["eos"][2]
    cfg = load_config_file("clip_real_medmnist.py", f"{converted},{tmp_path}")
    real = load_config_file("real_medmnist.py", str(tmp_path))
    config = experiment_config(cfg)
    meta = json.loads((converted / "meta.json").read_text())
    assert config.model == ModelConfig(**meta["model"]) and config.model.text_tower == "clip"
    assert config.backbone.source == "load" and config.backbone.path == str(converted)
    assert [t.name for t in config.stream] == [t["name"] for t in real.stream]
    assert config.base_tasks == () and config.data_dir == str(tmp_path)
    with pytest.raises(ValueError, match="CLIP_DIR,DATA_DIR"):
        load_config_file("clip_real_medmnist.py", str(converted))
