"""The retrieval demo: the embedded synthetic stream (configs/demo.py) with a caption per image,
every method, and the continual retrieval protocol under every index policy. No downloads.

    mslora-jax run --config configs/retrieval_demo.py --workdir out/retrieval_demo

Each image's caption names its modality, class and four of the latent factors that render it
(mslora_jax/data/synthetic_captions.py); the backbone is pretrained on captioned base tasks, and
every stage trains on image-caption pairs. After training, each method's encoder after every
stage indexes 256 training images and 128 test images (with their captions) per task; results
go to results.json/.md (a ``retrieval`` key), retrieval_matrices.png and retrieval_gallery.png
(docs/retrieval.md).
"""

import importlib.util
from pathlib import Path

import ml_collections

from mslora_jax.config import synthetic_base_tasks


def _config_module(name: str):
    """A sibling configs/*.py file as a module (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ml_collections.ConfigDict:
    c = _config_module("demo").get_config()
    for task in c.stream:
        task["captions"] = True
    c.base_tasks = synthetic_base_tasks(captions=True)
    c.model.max_text_len = 12  # captions are 11 words, plus [CLS]
    c.train.steps_per_task = 120  # the demo's 150 less a fifth: the captions cost text encodings
    c.retrieval = dict(enabled=True, gallery_per_task=256, queries_per_task=128)
    return c
