"""Model families: each one plugs a model into the continual trainer and into whole runs.

Into the trainer (``train/``) a family plugs through ``train.stream_experiment.
StreamExperiment``, which its experiment subclasses (task loss, batches, per-task metrics). Into
whole runs (``run/``) it plugs through a ``Family``: the three calls a run makes, top to bottom.

- ``dual_encoder/``: a CLIP-style dual encoder on image classification tasks.
- ``llava/``: the LLaVA-style generative model on VQA tasks (the paper's generative setting).

A new family is a new folder with a ``setup.py`` that defines ``FAMILY``, plus its
``config.model_kind`` name in ``FAMILY_MODULES``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from mslora_jax.config import ExperimentConfig
    from mslora_jax.train.stream_experiment import StreamExperiment

# config.model_kind -> the module whose FAMILY plugs that model in; imported only when a run
# asks for it (a dual-encoder run never imports the LLaVA family).
FAMILY_MODULES = {
    "dual_encoder": "mslora_jax.families.dual_encoder.setup",
    "llava": "mslora_jax.families.llava.setup",
}


@dataclasses.dataclass(frozen=True)
class Family:
    """The calls a whole run makes into a model family, in the order it makes them."""

    # Read and check every input from outside the workdir (data files, tokenizer); reads only,
    # so bad input fails before a workdir is claimed.
    read_inputs: Callable[[ExperimentConfig], Any]
    # Training examples per stream task (``config.stream`` order), of what read_inputs returned.
    train_sizes: Callable[[ExperimentConfig, Any], list[int]]
    # (experiment, backbone info): the family's own data, tokenizer and backbone setup in one call
    # (a pretrained backbone is saved once under the workdir).
    build_experiment: Callable[[ExperimentConfig, Path, Mesh, Any], tuple[StreamExperiment, dict]]
    # The experiment over a seeded random backbone, nothing read but the config (benchmarks).
    random_experiment: Callable[[ExperimentConfig, Path, Mesh], StreamExperiment]


def family_of(config: ExperimentConfig) -> Family:
    """The family that ``config.model_kind`` names (the config has checked the name)."""
    return importlib.import_module(FAMILY_MODULES[config.model_kind]).FAMILY
