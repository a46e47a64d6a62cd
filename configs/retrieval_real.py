"""Continual retrieval on the real-data stream (configs/real_medmnist.py), label level: after
every stage of every method, test images and class prompts query a database of training images
of the tasks seen so far, under every index policy (docs/retrieval.md).

    mslora-jax run --config configs/retrieval_real.py:/work/shared/data/real --workdir out/rr
    mslora-jax sweep --config configs/retrieval_real.py:/work/shared/data/real --seeds 0,1,2 \\
        --workdir out/rr_sweep

The paper's six methods; the database holds 1000 training images per task and each task asks
300 test images (seeded draws, the same for every method).
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


def get_config(data_dir: str = "") -> ml_collections.ConfigDict:
    if not data_dir:
        raise ValueError(
            "configs/retrieval_real.py needs the data folder after a colon: "
            "--config configs/retrieval_real.py:/path/to/folder"
        )
    c = _config_module("real_medmnist").get_config(data_dir)
    c.methods = ("each", "seq", "mslora", "mslora_cr", "mslora_cr_ortho", "joint")
    c.retrieval = dict(enabled=True, gallery_per_task=1000, queries_per_task=300)
    return c
