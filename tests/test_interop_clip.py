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

from mslora_jax.data.prompt_tokenizer import (  # noqa: E402
    encode_prompts,
    load_prompt_tokenizer,
)
from mslora_jax.interop.clip import convert_clip_backbone  # noqa: E402
from mslora_jax.models.clip import DualEncoder, ModelConfig, init_backbone  # noqa: E402
from mslora_jax.train.checkpoints import load_backbone  # noqa: E402

WORDS = ("a", "image", "of", "pathology", "radiology", "dermatology", "photo", "x")
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
