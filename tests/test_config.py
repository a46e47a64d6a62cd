"""Configs: conversion from ConfigDict, unknown keys, bad values, the shipped configs load."""

import pytest

from mslora_jax.config import ExperimentConfig, experiment_config
from mslora_jax.errors import ConfigError
from mslora_jax.train.methods import get_method
from tests.helpers import load_config_file


def test_demo_config_converts():
    cfg = experiment_config(load_config_file("demo.py"))
    assert isinstance(cfg, ExperimentConfig)
    assert len({t.modality for t in cfg.stream}) >= 2
    assert set(cfg.methods) == {"each", "seq", "mslora", "mslora_cr", "mslora_cr_ortho", "joint"}


def test_unknown_key_is_named():
    cfg = load_config_file("demo.py")
    cfg.lora.rnak = 3
    with pytest.raises(ConfigError, match=r"config\.lora\.rnak"):
        experiment_config(cfg)


def test_unknown_method_modality_and_task():
    cfg = load_config_file("demo.py")
    cfg.methods = ("mslora", "ewc")
    with pytest.raises(ConfigError, match="unknown method 'ewc'"):
        experiment_config(cfg)
    with pytest.raises(ConfigError, match="unknown method 'ewc'"):
        get_method("ewc")
    cfg = load_config_file("demo.py")
    cfg.stream[0]["modality"] = "ophthalmology"
    with pytest.raises(ConfigError, match="unknown modality 'ophthalmology'"):
        experiment_config(cfg)
    parsed = experiment_config(load_config_file("demo.py"))
    assert parsed.task_index("rad_a") == 1 and parsed.task_index("2") == 2
    with pytest.raises(ConfigError, match="unknown task name 'nope'"):
        parsed.task_index("nope")
    with pytest.raises(ConfigError, match="task id 9 is out of range"):
        parsed.task_index(9)


def test_bad_values_and_types():
    cfg = load_config_file("demo.py")
    cfg.lora.rank = 0
    with pytest.raises(ConfigError, match="lora.rank"):
        experiment_config(cfg)
    cfg = load_config_file("demo.py").to_dict()  # ConfigDict itself refuses the wrong type
    cfg["train"]["batch_size"] = "64"
    with pytest.raises(ConfigError, match="config.train.batch_size must be int"):
        experiment_config(cfg)
    cfg = load_config_file("demo.py")
    cfg.stream[1]["name"] = cfg.stream[0]["name"]
    with pytest.raises(ConfigError, match="unique"):
        experiment_config(cfg)


def test_unknown_primary_metric_is_named():
    cfg = load_config_file("demo_generative.py")
    cfg.stream[1]["primary_metric"] = "bleu"
    with pytest.raises(ConfigError, match="task 'rad_a': primary_metric='bleu' is unknown"):
        experiment_config(cfg)
