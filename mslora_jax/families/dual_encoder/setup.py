"""What a whole run calls into the dual-encoder family (``FAMILY``): read the stream's tasks,
then build the experiment over the run's frozen backbone."""

from __future__ import annotations

from pathlib import Path

import jax
from jax.sharding import Mesh

from mslora_jax.config import ExperimentConfig
from mslora_jax.data.prompt_tokenizer import prompt_encoder
from mslora_jax.data.registry import load_tasks
from mslora_jax.data.task import TaskData
from mslora_jax.families import Family
from mslora_jax.families.dual_encoder.backbone import init_backbone_sharded, obtain_backbone
from mslora_jax.families.dual_encoder.experiment import Experiment, build_experiment


def read_inputs(config: ExperimentConfig) -> list[TaskData]:
    """The stream's tasks, read and checked; also the backbone's tokenizer.json, if its text
    tower needs one (checked now, before the run claims a workdir)."""
    prompt_encoder(config)
    return load_tasks(config, config.stream)


def train_sizes(config: ExperimentConfig, tasks: list[TaskData]) -> list[int]:
    del config
    return [len(t.train_labels) for t in tasks]


def experiment(
    config: ExperimentConfig, workdir: Path, mesh: Mesh, tasks: list[TaskData]
) -> tuple[Experiment, dict]:
    """(experiment, backbone info); the backbone is pretrained once and saved in ``workdir``."""
    base_params, backbone_info = obtain_backbone(config, workdir, mesh)
    return build_experiment(config, tasks, mesh, base_params), backbone_info


def random_experiment(config: ExperimentConfig, workdir: Path | None, mesh: Mesh) -> Experiment:
    """The experiment over a seeded random backbone born sharded on ``mesh`` (benchmarks and
    tests: speed and shapes do not depend on the weights' values); ``workdir`` is unused, the
    dual encoder writes nothing before training."""
    del workdir
    params = init_backbone_sharded(config.model, mesh, jax.random.PRNGKey(0))
    return build_experiment(config, load_tasks(config, config.stream), mesh, params)


FAMILY = Family(
    read_inputs=read_inputs,
    train_sizes=train_sizes,
    build_experiment=experiment,
    random_experiment=random_experiment,
)
