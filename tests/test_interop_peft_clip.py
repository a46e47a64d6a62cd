"""PEFT adapters of the dual encoder: an exported adapter on both CLIP towers, loaded by
``peft.PeftModel`` onto transformers' ``CLIPModel`` with the same weights, gives our logits, and
imports back to the same tree.
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from mslora_jax.interop.hf_clip import clip_module_name  # noqa: E402
from mslora_jax.interop.peft import CONFIG_FILE, read_peft_adapter, write_peft_adapter  # noqa: E402
from mslora_jax.lora.adapter import stack_params  # noqa: E402
from mslora_jax.models.clip import DualEncoder  # noqa: E402
from tests.test_interop_clip import (  # noqa: E402
    MAX_LEN,
    _hf_clip,
    _load,
    _our_tokens,
    _save,
    _tokenizer,
)
from tests.test_interop_peft import random_adapter  # noqa: E402


def test_clip_adapter_under_peft_gives_our_logits_and_imports_back(tmp_path):
    from mslora_jax.interop.clip import convert_clip_backbone  # the clip branch's converter

    tokenizer = _tokenizer()
    hf_model = _hf_clip(tokenizer)
    hf_dir = _save(hf_model, tokenizer, tmp_path / "hf")
    convert_clip_backbone(hf_dir, tmp_path / "backbone", max_text_len=MAX_LEN)
    model_cfg, params = _load(tmp_path / "backbone")
    name_map = clip_module_name
    # Every LoRA-capable layer of both towers: attention q, k, v, out and MLP fc1, fc2.
    adapter = random_adapter(params, [r"^(image|text)/"], rank=3, alpha=6.0, seed=1)
    out = write_peft_adapter(tmp_path / "peft", adapter, name_map)
    modules = json.loads((out / CONFIG_FILE).read_text())["target_modules"]
    assert "vision_model.encoder.layers.1.self_attn.out_proj" in modules
    assert "text_model.encoder.layers.0.mlp.fc1" in modules
    assert len(modules) == 6 * 2 * 2  # 6 layers per block, 2 blocks, 2 towers

    tokens = _our_tokens(tmp_path / "backbone")
    pixels = np.random.default_rng(2).normal(size=(3, 3, 16, 16)).astype(np.float32)  # NCHW

    def ours(lora):
        variables = {"params": params, **({"lora": stack_params([lora.params])} if lora else {})}
        weights = jnp.asarray([adapter.scaling]) if lora else None
        image, text, scale = DualEncoder(model_cfg).apply(
            variables, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(tokens), weights
        )
        return np.exp(float(scale)) * np.asarray(image) @ np.asarray(text).T

    with torch.no_grad():
        inputs = {"input_ids": torch.from_numpy(np.asarray(tokens)).long()}
        base = hf_model(**inputs, pixel_values=torch.from_numpy(pixels)).logits_per_image.numpy()
        wrapped = peft.PeftModel.from_pretrained(hf_model, str(out))
        got = wrapped(**inputs, pixel_values=torch.from_numpy(pixels)).logits_per_image.numpy()
    want = ours(adapter)
    assert np.abs(ours(None) - base).max() < 1e-4
    assert np.abs(want - base).max() > 0.1  # the adapter changes the logits noticeably
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()

    back = read_peft_adapter(out, params, name_map)
    assert back.metadata() == adapter.metadata()
    np.testing.assert_equal(back.params, adapter.params)
