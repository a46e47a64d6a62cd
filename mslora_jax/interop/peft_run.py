"""A run's adapters as PEFT folders (``mslora-jax export-peft``) and PEFT folders as adapters
of a config's backbone (``mslora-jax import-peft``).

Export reads a workdir's finished stages (``checkpoints/<method>/<stage>``, as ``inspect``
does): a task's own adapter, or with ``merged`` the sum of the adapters the method's forward
uses for that task after its stage (tasks 1..k for MSLoRA), exported as one LoRA of the summed
rank (``peft.merged_adapter``: exact).

Names: the LLaVA(-Med) backbone's come from ``hf_llava.hf_module_name`` (LLaVA-Med's
``LlavaMistralForCausalLM``: ``model.layers.{i}.self_attn.q_proj``, ...); the dual encoder's
from the CLIPModel table (``hf_clip.clip_module_name``).
"""

from __future__ import annotations

import os
from pathlib import Path

from mslora_jax.config import ExperimentConfig
from mslora_jax.errors import CheckpointError
from mslora_jax.interop.hf_clip import clip_module_name
from mslora_jax.interop.hf_llava import hf_module_name
from mslora_jax.interop.peft import NameMap, merged_adapter, read_peft_adapter, write_peft_adapter
from mslora_jax.io_utils import read_json
from mslora_jax.lora.adapter import LoraAdapter
from mslora_jax.run.dry_run import abstract_backbone
from mslora_jax.train.checkpoints import load_stage_adapters, read_workdir_config
from mslora_jax.train.methods import get_method, task_slots

# PEFT's task_type per model kind: the LLaVA decoder is a causal LM; a CLIPModel has no PEFT
# task (PeftModel wraps it as it is).
_TASK_TYPES = {"llava": "CAUSAL_LM", "dual_encoder": None}


def name_map_for(config: ExperimentConfig) -> NameMap:
    """The HF module names of ``config``'s backbone."""
    if config.model_kind == "llava":
        return hf_module_name
    if config.model.text_tower == "bert":  # CLIP's names would misname the BERT text tower
        raise CheckpointError(
            'model.text_tower="bert": a dual encoder with a BERT text tower is no single Hugging '
            "Face model, so its adapters have no PEFT module names"
        )
    return clip_module_name


def _base_model_name(config: ExperimentConfig) -> str | None:
    """The HF model a loaded backbone was converted from (its meta.json), else None."""
    meta_file = Path(config.backbone.path) / "meta.json"
    if config.backbone.source != "load" or not meta_file.exists():
        return None
    info = read_json(meta_file, "backbone").get("info", {})
    return info.get("hf_config", {}).get("_name_or_path") or info.get("hf_dir")


def _stage_of(config: ExperimentConfig, stages: list[tuple[dict, dict]], task: str) -> int:
    """The stage that trained ``task`` (a stream task's name or id, or a stage's own task name,
    e.g. "joint")."""
    names = [meta["task"] for meta, _ in stages]
    if task in names:
        return names.index(task)
    name = config.stream[config.task_index(task)].name
    if name not in names:
        raise CheckpointError(f"the method has no finished stage for task {name!r} (has {names})")
    return names.index(name)


def run_adapter(
    workdir: os.PathLike | str, method: str, task: str, *, merged: bool = False
) -> tuple[LoraAdapter, dict]:
    """(adapter, sidecar info) of ``task``'s stage of ``method`` in run ``workdir``.

    ``merged``: the sum of every adapter the method's forward uses for the task after that
    stage, as one exact LoRA; else the stage's own adapter."""
    workdir = Path(workdir).absolute()
    config = read_workdir_config(workdir)
    stages = load_stage_adapters(workdir, method)
    stage = _stage_of(config, stages, task)
    meta, params = stages[stage]
    info = {"method": method, "stage": stage, "slot": meta["slot"], "model_kind": config.model_kind}
    own = LoraAdapter.from_metadata(params, meta)
    if not merged:
        return own, info
    # Each slot as it was after ``stage`` (a slot per modality goes on training later).
    slots = {
        meta["slot"]: LoraAdapter.from_metadata(params, meta)
        for meta, params in stages[: stage + 1]
    }
    modalities = [t.modality for t in config.stream]
    used = get_method(method, task_slots(config.lora.granularity, modalities)).eval_slots(stage)
    parts = [slots[s] for s in used]
    info = {**info, "merged": [{"slot": s, "task": slots[s].task} for s in used]}
    return merged_adapter(parts, task=own.task, modality=own.modality), info


def export_run_adapter(
    workdir: os.PathLike | str,
    method: str,
    task: str,
    out: os.PathLike | str,
    *,
    merged: bool = False,
) -> LoraAdapter:
    """Write ``task``'s adapter of ``method`` (see ``run_adapter``) as the PEFT folder ``out``."""
    config = read_workdir_config(Path(workdir).absolute())
    adapter, info = run_adapter(workdir, method, task, merged=merged)
    write_peft_adapter(
        out,
        adapter,
        name_map_for(config),
        task_type=_TASK_TYPES[config.model_kind],
        base_model_name_or_path=_base_model_name(config),
        info=info,
    )
    return adapter


def import_peft_adapter(
    config: ExperimentConfig,
    folder: os.PathLike | str,
    *,
    task: str | None = None,
    modality: str | None = None,
) -> LoraAdapter:
    """The adapter of PEFT folder ``folder`` for ``config``'s backbone (names and shapes
    checked; see ``peft.read_peft_adapter``)."""
    return read_peft_adapter(
        folder, abstract_backbone(config), name_map_for(config), task=task, modality=modality
    )
