"""Typed, frozen library options, converted from an ``ml_collections.ConfigDict`` at the edge.

Experiment files (``configs/*.py``) return a ConfigDict so users can copy, edit and override them
from the command line. The library itself only ever sees these dataclasses, which reject unknown
keys and bad values with an error naming the key.

Import from here (``from mslora_jax.config import ExperimentConfig``); the settings live in one
module per group:

- ``experiment``: ``ExperimentConfig`` (the whole run, and the checks across groups) and the
  method names (``METHODS``, ``PAPER_METHODS``, ``BASELINE_METHODS``, ``DUAL_ENCODER_ONLY``),
  ``MODEL_KINDS``;
- ``tasks``: ``TaskConfig`` (``TASK_SOURCES``) and ``synthetic_task``/``synthetic_base_tasks``
  for config files;
- ``lora``: ``LoraConfig`` (``FOLD_MODES``, ``GRANULARITIES``) and ``RegularizerConfig``;
- ``training``: ``TrainConfig``, ``CheckpointConfig``, ``PretrainConfig``, ``BackboneConfig``
  (``BACKBONE_SOURCES``), ``MeshConfig``, ``EvalConfig``;
- ``retrieval``: ``RetrievalConfig`` (``INDEX_POLICIES``, ``GALLERIES``, ``DIRECTIONS``), the
  continual retrieval protocol a run adds after training;
- ``llava``: ``LlavaSettings`` (``DTYPES``), the generative model's settings;
- ``convert``: ``experiment_config``, ``from_mapping`` and ``to_json_dict``, the edge between
  config files and these dataclasses.

The modules import only lower layers (``models``, ``eval``, ``losses``, ``data.chat_template``,
``errors``), so ``data`` and everything above may import this package.
"""

from mslora_jax.config.convert import experiment_config, from_mapping, to_json_dict
from mslora_jax.config.experiment import (
    BASELINE_METHODS,
    DUAL_ENCODER_ONLY,
    METHODS,
    MODEL_KINDS,
    PAPER_METHODS,
    ExperimentConfig,
)
from mslora_jax.config.llava import DTYPES, LlavaSettings
from mslora_jax.config.lora import FOLD_MODES, GRANULARITIES, LoraConfig, RegularizerConfig
from mslora_jax.config.retrieval import (
    CAPTION_DIRECTIONS,
    DIRECTIONS,
    GALLERIES,
    INDEX_POLICIES,
    LABEL_DIRECTIONS,
    RetrievalConfig,
)
from mslora_jax.config.tasks import (
    TASK_SOURCES,
    TaskConfig,
    synthetic_base_tasks,
    synthetic_task,
)
from mslora_jax.config.training import (
    BACKBONE_SOURCES,
    BackboneConfig,
    CheckpointConfig,
    EvalConfig,
    MeshConfig,
    PretrainConfig,
    TrainConfig,
)

__all__ = [
    "BACKBONE_SOURCES",
    "BASELINE_METHODS",
    "DTYPES",
    "DUAL_ENCODER_ONLY",
    "FOLD_MODES",
    "GRANULARITIES",
    "METHODS",
    "MODEL_KINDS",
    "PAPER_METHODS",
    "TASK_SOURCES",
    "CAPTION_DIRECTIONS",
    "DIRECTIONS",
    "GALLERIES",
    "INDEX_POLICIES",
    "LABEL_DIRECTIONS",
    "BackboneConfig",
    "CheckpointConfig",
    "EvalConfig",
    "ExperimentConfig",
    "LlavaSettings",
    "LoraConfig",
    "MeshConfig",
    "PretrainConfig",
    "RegularizerConfig",
    "RetrievalConfig",
    "TaskConfig",
    "TrainConfig",
    "experiment_config",
    "from_mapping",
    "synthetic_base_tasks",
    "synthetic_task",
    "to_json_dict",
]
