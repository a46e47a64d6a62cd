"""Shared test utilities: the smoke config with overrides, and a small experiment."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import ml_collections

from mslora_jax.config import ExperimentConfig, experiment_config
from mslora_jax.data.registry import load_tasks
from mslora_jax.parallel.mesh import make_mesh
from mslora_jax.train.pretrain import init_backbone_sharded
from mslora_jax.train.stream import Experiment, build_experiment

ROOT = Path(__file__).resolve().parents[1]


def load_config_file(name: str, *args: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def smoke_dict(**overrides) -> dict:
    """configs/smoke.py as a plain dict, with dotted overrides ("train.steps_per_task": 5)."""
    cfg = load_config_file("smoke.py").to_dict()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        node[leaf] = value
    return cfg


def smoke_config(**overrides) -> ExperimentConfig:
    return experiment_config(smoke_dict(**overrides))


def random_backbone_experiment(num_devices: int = 1, **overrides) -> Experiment:
    """An Experiment on the smoke stream with a seeded random (not pretrained) backbone."""
    config = smoke_config(**{"backbone.source": "random", **overrides})
    mesh = make_mesh(num_devices)
    params = init_backbone_sharded(config.model, mesh, jax.random.PRNGKey(0))
    return build_experiment(config, load_tasks(config, config.stream), mesh, params)
