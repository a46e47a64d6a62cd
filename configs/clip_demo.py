"""The demo stream (configs/demo.py) on a released CLIP converted by ``mslora-jax convert-clip``.

The argument is the converted folder: the model config is its ``meta.json``'s (so it matches the
weights), the text tower is CLIP's (or a BERT's) and the class prompts are encoded with its
tokenizer.json.

    mslora-jax convert-clip --hf-dir /models/clip-vit-base-patch32 --out out/clip_b32
    mslora-jax run --config configs/clip_demo.py:out/clip_b32 --workdir out/clip_demo

With a BERT text tower (``--text-hf-dir``: a BERT or sentence-transformers folder) the folder's
meta.json says ``text_tower="bert"`` and the prompts are encoded with that BERT's WordPiece:

    mslora-jax convert-clip --hf-dir /models/clip-vit-base-patch32 \
        --text-hf-dir /models/all-MiniLM-L6-v2 --out out/clip_minilm
    mslora-jax run --config configs/clip_demo.py:out/clip_minilm --workdir out/clip_minilm_demo
"""

import importlib.util
import json
from pathlib import Path

import ml_collections


def _demo_config() -> ml_collections.ConfigDict:
    """configs/demo.py's config (loaded by path: configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("demo", Path(__file__).with_name("demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def on_converted_clip(c: ml_collections.ConfigDict, clip_dir: str) -> ml_collections.ConfigDict:
    """``c`` with its backbone replaced by the converted CLIP folder ``clip_dir`` (also used by
    configs/clip_real_medmnist.py)."""
    meta = json.loads((Path(clip_dir) / "meta.json").read_text())
    c.model = meta["model"]
    c.backbone = dict(source="load", path=str(clip_dir))
    c.base_tasks = []  # nothing is pretrained: the backbone is CLIP
    c.prompt_template = "a {modality} image of {label}"
    # A ViT-B at 224 pixels: smaller batches than the tiny demo backbone's.
    c.train.batch_size = 32
    c.train.eval_batch_size = 64
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if not arg:
        raise ValueError("configs/clip_demo.py needs the converted CLIP folder: clip_demo.py:DIR")
    return on_converted_clip(_demo_config(), arg)
