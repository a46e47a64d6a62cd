"""Write a run's frozen LLaVA backbone from released Hugging Face weights (LLaVA-Med v1.5).

The folder written is what ``backbone.source="load"`` with ``backbone.path`` reads: orbax
``params`` plus ``meta.json`` whose ``model`` is the LLaVA architecture (the json the run
compares, ``families.llava.setup.llava_model_json``), with provenance naming the HF folders.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mslora_jax.config import ExperimentConfig
from mslora_jax.errors import ConfigError
from mslora_jax.families.llava.setup import llava_model_json
from mslora_jax.interop.backbone_folder import (
    read_hf_config,
    save_backbone_atomically,
)
from mslora_jax.interop.hf_llava import (
    CLIP_VISION_PREFIX,
    LLAVA_VISION_PREFIX,
    check_hf_config,
    check_hf_run_settings,
    convert_hf_llava,
)
from mslora_jax.interop.safetensors_folder import MergedSource, SafetensorsFolder
from mslora_jax.io_utils import check_new_folder
from mslora_jax.models.llava import init_llava

log = logging.getLogger(__name__)

# config.json keys kept in meta.json for the record (what the weights say about themselves).
_RECORDED_KEYS = ("_name_or_path", "architectures", "mm_vision_tower", "sliding_window")
# Copied from the LLaVA folder into the backbone folder when present: configs/paper_8task.py
# reads its tokenizer from there.
_COPIED_FILES = ("tokenizer.json",)


def convert_llava_backbone(
    config: ExperimentConfig,
    hf_dir: os.PathLike | str,
    out: os.PathLike | str,
    vision_hf_dir: os.PathLike | str | None = None,
) -> int:
    """Convert the HF folder(s) into a backbone folder ``out``; returns the parameter count.

    ``hf_dir``: the LLaVA(-Med) folder (decoder, projector and possibly the CLIP tower);
    ``vision_hf_dir``: a CLIP folder to take the tower from instead (the LLaVA folder's own copy
    of the tower, if any, is then ignored, as LLaVA itself reloads the tower from CLIP).
    ``tokenizer.json``, if the LLaVA folder has one, is copied next to the weights.
    ``out`` must not exist or be empty; it is written under a temporary name next to it and
    renamed at the end, so a failure leaves nothing half-written there.
    """
    if config.model_kind != "llava":
        raise ConfigError(
            f'converting LLaVA weights needs model_kind="llava", not {config.model_kind!r}'
        )
    out = Path(out).absolute()
    check_new_folder(out)  # before any work: a taken --out fails fast
    hf_dir = Path(hf_dir).absolute()
    model_cfg = config.llava.model_config()
    llava_source = SafetensorsFolder(hf_dir)
    hf_config = read_hf_config(hf_dir)
    check_hf_config(hf_config, model_cfg, str(hf_dir / "config.json"))
    check_hf_run_settings(hf_config, config.llava, str(hf_dir / "config.json"))
    if vision_hf_dir is None:
        source, prefix, where, skip = llava_source, LLAVA_VISION_PREFIX, str(hf_dir), None
    else:
        vision_hf_dir = Path(vision_hf_dir).absolute()
        vision_source = SafetensorsFolder(vision_hf_dir)
        vision_config = read_hf_config(vision_hf_dir)
        check_hf_config(vision_config, model_cfg, str(vision_hf_dir / "config.json"), vision=True)
        source = MergedSource([llava_source, vision_source])
        prefix, where = CLIP_VISION_PREFIX, f"{hf_dir} + {vision_hf_dir}"

        def skip(name: str) -> bool:  # LLaVA's own copy of the tower, superseded
            return name.startswith("model.vision_tower.")

    abstract = jax.eval_shape(functools.partial(init_llava, model_cfg), jax.random.PRNGKey(0))
    # Stored in llava.dtype (bfloat16: half the host memory and disk of float32).
    dtype = jnp.dtype(config.llava.dtype)
    params = convert_hf_llava(
        abstract, source, vision_prefix=prefix, skip=skip, where=where, dtype=dtype
    )
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    folders = {
        "hf_dir": str(hf_dir),
        "vision_hf_dir": None if vision_hf_dir is None else str(vision_hf_dir),
        "vision_prefix": prefix,
    }
    recorded = {k: hf_config[k] for k in _RECORDED_KEYS if k in hf_config}
    copied = [hf_dir / name for name in _COPIED_FILES if (hf_dir / name).is_file()]
    info = {
        "source": "huggingface",
        **folders,
        "num_params": count,
        "hf_config": recorded,
        "copied_files": [f.name for f in copied],
    }
    meta = {
        "model": llava_model_json(config),
        "provenance": {"source": "huggingface", **folders},
        "info": info,
    }
    save_backbone_atomically(out, params, meta, copied)
    log.info("wrote %s (%d parameters converted from %s)", out, count, where)
    return count
