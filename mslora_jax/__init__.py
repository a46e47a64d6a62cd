"""mslora_jax: MSLoRA-CR (per-task LoRA + contrastive regularization) in JAX/Flax.

What a notebook reaches for first is importable from here (loaded on first use, so
``import mslora_jax`` stays cheap)::

    import mslora_jax as ml
    config = ml.experiment_config(...)            # a configs/*.py ConfigDict, or a plain dict
    results = ml.run_experiment(config, workdir)  # every method over the stream; resumes
    adapters = ml.load_stage_adapters(workdir, "mslora_cr_ortho")
    merged = ml.merge(base_params, [ml.LoraAdapter.from_metadata(...)])
    print(ml.inspect_adapters(workdir, "mslora_cr_ortho"))

Where each concern lives, from the top layer down (a layer imports only layers below it;
``tests/test_layers.py`` keeps it so):

- ``cli/``: the ``mslora-jax`` command line (argument parsing, then library calls).
- ``interop/``: readers and writers of outside formats (Hugging Face CLIP/BERT/LLaVA weights,
  PEFT adapters, the released checkpoints and answer files).
- ``run/``: whole runs: an experiment (every method over the stream, reports), seed sweeps, the
  dry run, ahead-of-time TPU sizing, pictures of a finished workdir.
- ``families/``: the model families, each plugged into the trainer through ``StreamExperiment``:
  ``dual_encoder/`` (CLIP-style, classification) and ``llava/`` (generative VQA).
- ``train/``: the continual trainer every family shares: the stream of stages, methods and
  baselines, the adapter objective, train step and loop, optimizer, checkpoints, preemption.
- ``data/``, ``eval/``, ``report/``, ``lora/``, ``losses/``, ``config/``: tasks and input
  pipelines, metrics and evaluation, result tables and plots, adapter trees (save, merge,
  compare), loss functions, typed settings.
- ``models/``, ``parallel/``: the Flax models; meshes, sharding rules, born-sharded jit.
"""

from __future__ import annotations

import importlib

from mslora_jax import _deprecated

__version__ = "0.1.0"

# name -> module that defines it
_FRONT_DOOR = {
    "experiment_config": "mslora_jax.config",
    "ExperimentConfig": "mslora_jax.config",
    "run_experiment": "mslora_jax.run.experiment",
    "run_sweep": "mslora_jax.run.sweep",
    "dry_run": "mslora_jax.run.dry_run",
    "write_pictures": "mslora_jax.run.pictures",
    "load_results": "mslora_jax.report.results",
    "format_markdown_table": "mslora_jax.report.results",
    "read_workdir_config": "mslora_jax.train.checkpoints",
    "load_stage_adapters": "mslora_jax.train.checkpoints",
    "LoraAdapter": "mslora_jax.lora.adapter",
    "save_adapter": "mslora_jax.lora.io",
    "load_adapter": "mslora_jax.lora.io",
    "merge": "mslora_jax.lora.merge",
    "unmerge": "mslora_jax.lora.merge",
    "cr_similarity_matrix": "mslora_jax.lora.compare",
    "inspect_adapters": "mslora_jax.cli.inspect",
}
__all__ = sorted(_FRONT_DOOR)

_deprecated.install()


def __getattr__(name: str):
    if name in _FRONT_DOOR:
        value = getattr(importlib.import_module(_FRONT_DOOR[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'mslora_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
