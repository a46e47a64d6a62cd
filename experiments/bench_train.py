"""Benchmark: adapter train-step and evaluation throughput for a config (default: the demo).

Prints figures; asserts nothing. The backbone is random (speed does not depend on its values).

    python experiments/bench_train.py [--config configs/demo.py] [--steps 200]
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mslora_jax.config import experiment_config
from mslora_jax.families.dual_encoder.setup import random_experiment
from mslora_jax.parallel.mesh import make_mesh
from mslora_jax.train.methods import get_method
from mslora_jax.train.stream import train_stage

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 200, "Train steps per measured stage.")
_METHOD = flags.DEFINE_string("method", "mslora_cr_ortho", "Method whose stage is timed.")


def main(argv):
    del argv
    config = experiment_config(_CONFIG.value)
    train = dataclasses.replace(config.train, steps_per_task=_STEPS.value)
    config = dataclasses.replace(config, progress=False, train=train)
    mesh = make_mesh(config.num_devices)
    exp = random_experiment(config, None, mesh)
    method = get_method(_METHOD.value)
    stage = min(1, exp.num_tasks - 1)
    slots = {0: exp.fresh_adapter(0)}
    t0 = time.perf_counter()
    train_stage(exp, method, 0, {})  # compiles
    compile_and_first = time.perf_counter() - t0
    _, info = train_stage(exp, method, stage, slots)
    timing = info["timing"]
    steps_per_s = timing["timed_steps"] / timing["seconds"]
    test_images = sum(len(t.test_labels) for t in exp.tasks)
    exp.accuracy(slots, [0], 0)  # compile predict
    t0 = time.perf_counter()
    for task in range(exp.num_tasks):
        exp.accuracy(slots, [0, 1], task)
    eval_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "platform": jax.devices()[0].platform,
                "devices": mesh.size,
                "method": method.name,
                "batch_size": config.train.batch_size,
                "train_steps_per_s": round(steps_per_s, 2),
                "train_images_per_s": round(steps_per_s * config.train.batch_size, 1),
                "first_stage_s_incl_compile": round(compile_and_first, 2),
                "eval_images_per_s": round(test_images / eval_s, 1),
                "lora_params_per_task": int(
                    sum(np.prod(x.shape) for x in jax.tree.leaves(slots[0]))
                ),
                "backbone_params": int(
                    sum(np.prod(x.shape) for x in jax.tree.leaves(exp.base_params))
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    app.run(main)
