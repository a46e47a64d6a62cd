"""Configs: conversion from ConfigDict, unknown keys, bad values, the shipped configs load."""

import numpy as np
import pytest

from mslora_jax.config import METHODS, ExperimentConfig, experiment_config
from mslora_jax.errors import CheckpointError, ConfigError
from mslora_jax.train.methods import get_method
from tests.helpers import load_config_file, random_backbone_experiment, smoke_dict


def test_demo_config_converts():
    cfg = experiment_config(load_config_file("demo.py"))
    assert isinstance(cfg, ExperimentConfig)
    assert len({t.modality for t in cfg.stream}) >= 2
    assert cfg.methods == METHODS  # the paper's six, then the four baselines


def test_unknown_key_is_named():
    cfg = load_config_file("demo.py")
    cfg.lora.rnak = 3
    with pytest.raises(ConfigError, match=r"config\.lora\.rnak"):
        experiment_config(cfg)


def test_unknown_method_modality_and_task():
    cfg = load_config_file("demo.py")
    cfg.methods = ("mslora", "icarl")
    with pytest.raises(ConfigError, match="unknown method 'icarl'"):
        experiment_config(cfg)
    with pytest.raises(ConfigError, match="unknown method 'icarl'"):
        get_method("icarl")
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


def test_cr_distance_is_checked_and_defines_results():
    """regularizer.cr_distance: released by default, a bad value named; a non-default one is part
    of the fingerprint, while a workdir written before the key (no such key) still matches."""
    from mslora_jax.run.experiment import fingerprint
    from mslora_jax.train.checkpoints import check_same_config

    cfg = load_config_file("demo.py")
    assert experiment_config(cfg).regularizer.cr_distance == "released"
    cfg.regularizer.cr_distance = "frobenius"
    with pytest.raises(ConfigError, match=r"regularizer\.cr_distance='frobenius' is unknown"):
        experiment_config(cfg)
    cfg.regularizer.cr_distance = "delta_w"
    assert experiment_config(cfg).regularizer.cr_distance == "delta_w"
    released = experiment_config(load_config_file("demo.py"))
    old = fingerprint(released)
    assert "cr_distance" not in old["regularizer"]  # what a workdir written before the key holds
    check_same_config(old, fingerprint(released), "workdir")
    assert fingerprint(experiment_config(cfg))["regularizer"]["cr_distance"] == "delta_w"
    with pytest.raises(CheckpointError, match=r"regularizer\.cr_distance: None -> 'delta_w'"):
        check_same_config(old, fingerprint(experiment_config(cfg)), "workdir")


def test_unknown_primary_metric_is_named():
    cfg = load_config_file("demo_generative.py")
    cfg.stream[1]["primary_metric"] = "bleu"
    with pytest.raises(ConfigError, match="task 'rad_a': primary_metric='bleu' is unknown"):
        experiment_config(cfg)


def test_input_pipeline_knobs():
    train = experiment_config(load_config_file("demo.py")).train
    assert (train.input_prefetch, train.input_workers, train.image_cache_mb) == (None,) * 3
    assert train.input_options() == {}  # the pipelines' own defaults
    cfg = load_config_file("demo.py")
    cfg.train.input_workers, cfg.train.input_prefetch = 2, 0
    assert experiment_config(cfg).train.input_options() == {"num_workers": 2, "prefetch": 0}
    for key, bad in (("input_workers", -1), ("input_prefetch", "2"), ("image_cache_mb", True)):
        cfg = load_config_file("demo.py").to_dict()
        cfg["train"][key] = bad
        with pytest.raises(ConfigError, match=rf"train\.{key} must be an integer >= 0"):
            experiment_config(cfg)


@pytest.mark.parametrize("bad", [-1, True, "24", 2.5])
def test_bad_task_batch_size_is_named(bad):
    cfg = load_config_file("demo.py")
    cfg.stream[1]["batch_size"] = bad
    with pytest.raises(ConfigError, match=r"task 'rad_a': batch_size=.* must be an integer >= 1"):
        experiment_config(cfg)


def test_task_batch_size_must_divide_into_micro_batches():
    cfg = load_config_file("demo.py")
    cfg.train.grad_accum_steps = 4
    cfg.stream[1]["batch_size"] = 6
    with pytest.raises(
        ConfigError, match=r"task 'rad_a': batch_size=6 .* train\.grad_accum_steps=4"
    ):
        experiment_config(cfg)
    cfg.stream[1]["batch_size"] = 8
    assert experiment_config(cfg).stream[1].batch_size == 8


def test_stage_batch_size_per_task_and_joint():
    cfg = load_config_file("demo.py")
    cfg.train.batch_size = 32
    cfg.stream[0]["batch_size"] = 16
    cfg.stream[1]["batch_size"] = 0  # 0 and None: train.batch_size
    parsed = experiment_config(cfg)
    assert parsed.stream[2].batch_size is None
    assert [parsed.stage_batch_size([i]) for i in range(3)] == [16, 32, 32]
    assert parsed.stage_batch_size([1, 2]) == 32  # tasks agree
    assert parsed.stage_batch_size(range(len(parsed.stream))) == 32  # disagree: train's
    for task in cfg.stream:
        task["batch_size"] = 8
    assert experiment_config(cfg).stage_batch_size(range(len(cfg.stream))) == 8


def test_per_task_batch_size_sets_steps_batches_and_mesh_check():
    # Smoke stream: 3 tasks of 256 training images, train.batch_size 32.
    overrides = {"train.steps_per_task": 0, "train.epochs": 1.0}
    stream = smoke_dict()["stream"]
    stream[1]["batch_size"] = 16
    stream[2]["epochs"] = 2.0
    exp = random_backbone_experiment(**overrides, stream=stream)
    assert [exp.num_steps([i]) for i in range(3)] == [8, 16, 16]  # ceil(epochs * 256 / batch)
    assert exp.num_steps([0, 1, 2]) == 8 + 8 + 16  # joint: train.batch_size for every task
    assert next(exp.train_batches([1], 1, seed=0))["image"].shape[0] == 16
    assert next(exp.train_batches([0], 1, seed=0))["image"].shape[0] == 32
    # joint: each task contributes what its own stage reads (epochs x its examples), however
    # the tasks' sizes differ, so task 2's two epochs are honoured.
    assert exp.stage_mixture([0, 1, 2]) == {"draws": [256, 256, 512], "sizes": [256] * 3}
    assert exp.stage_mixture([1]) == {}
    labels = np.concatenate(
        [b["label"] for b in exp.train_batches([0, 1, 2], exp.num_steps([0, 1, 2]), seed=0)]
    )
    per_task = np.searchsorted(np.cumsum(exp.table.sizes), labels, side="right")
    np.testing.assert_array_equal(np.bincount(per_task, minlength=3), [256, 256, 512])
    stream[1]["batch_size"] = 12  # 12 rows over the 8 batch shards of 8 devices
    with pytest.raises(ConfigError, match=r"task 'rad_a': batch_size=12: rows per micro-batch"):
        random_backbone_experiment(num_devices=8, **overrides, stream=stream)


def test_paper_config_matches_the_released_scripts():
    cfg = experiment_config(load_config_file("paper_8task.py"))
    sizes = {t.name: t.batch_size for t in cfg.stream}
    assert sizes == {
        "pathvqa": 24,
        "slake-vqarad": 24,
        "derm": 24,
        "PCAM": 24,
        "CXP": 24,
        "HAM": 16,
        "nmi": 16,
        "iu-x-ray": 16,
    }
    llava = cfg.llava
    assert llava.max_len == 2048 and llava.max_new_tokens == 100  # model_max_length, eval
    # The longest training sequence and the longest prompt plus answer fit the decoder.
    num_patches = llava.model_config().num_patches
    assert llava.decoder.max_len >= llava.max_len + num_patches - 1 + llava.max_new_tokens
    assert cfg.train.grad_clip_norm == 1.0 and cfg.train.weight_decay == 0.0
    assert cfg.lora.dropout == 0.0 and llava.dtype == "bfloat16" and llava.remat


def test_joint_refuses_per_task_learning_rates_by_name():
    cfg = load_config_file("demo.py")
    cfg.stream[1]["learning_rate"] = 1e-4
    with pytest.raises(ConfigError, match=r"method 'joint' .* different learning_rate"):
        experiment_config(cfg)
    cfg.methods = ("each", "mslora_cr")  # without joint every task keeps its own rate
    assert experiment_config(cfg).stream[1].learning_rate == 1e-4
    cfg.methods = ("joint",)
    for task in cfg.stream:  # one common per-task rate is honoured
        task["learning_rate"] = 1e-4
    assert experiment_config(cfg).stream[0].learning_rate == 1e-4
