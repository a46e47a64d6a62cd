"""The real-data stream (configs/real_medmnist.py) on a released CLIP converted by
``mslora-jax convert-clip``: the argument is ``CLIP_DIR,DATA_DIR``.

    mslora-jax convert-clip --hf-dir /models/clip-vit-base-patch16 --out out/clip_b16
    mslora-jax run --config configs/clip_real_medmnist.py:out/clip_b16,/work/shared/data/real \\
        --workdir out/clip_real

The model config is the converted folder's (``meta.json``), the class prompts are encoded with
its tokenizer.json, and the 28 px MedMNIST images are resized to the tower's input size (224 for
the OpenAI ViTs). The first stage's evaluation before training is CLIP's zero-shot accuracy.
"""

import importlib.util
from pathlib import Path

import ml_collections


def _config_module(name: str):
    """A sibling configs/*.py file as a module (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    clip_dir, _, data_dir = arg.partition(",")
    if not clip_dir or not data_dir:
        raise ValueError(
            "configs/clip_real_medmnist.py needs the converted CLIP folder and the data folder: "
            "--config configs/clip_real_medmnist.py:CLIP_DIR,DATA_DIR"
        )
    real = _config_module("real_medmnist").get_config(data_dir)
    return _config_module("clip_demo").on_converted_clip(real, clip_dir)
