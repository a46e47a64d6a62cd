"""Benchmark: does the input pipeline keep ahead of the train step? Batches/s next to steps/s.

    python experiments/bench_input.py --config configs/demo.py [--steps 50] [--batches 200] \
        [--workers 2] [--method mslora_cr_ortho]
    python experiments/bench_input.py --config configs/demo_generative.py

For the last stage of ``--method`` (as ``bench_step.py``, on a random backbone: nothing
downloads or pretrains; a generative config writes its synthetic VQA tasks, PNG files, to a
temporary folder, so its images are decoded as a real run's are), it times:

- the compiled train step on one fixed device-resident batch (median of ``--steps``): steps/s;
- the stage's input pipeline on this host, read ``--batches`` times in several ways: on demand
  in this thread (``prefetch=0``), ahead in a background thread (``prefetch=2``, the default)
  and in ``--workers`` processes; VQA also without its image cache (``image_cache_mb=0``: every
  image decoded every time, as in a first epoch or with data larger than the cache). Batches/s
  counts from the first batch (the start, which spawns the workers, is reported apart);
- the same step fed by the training pipeline, as ``train.loop.run_steps`` feeds it (host batch
  -> ``to_global_batch`` -> step, nothing waited on between steps): steps/s.

Prints one JSON object and a summary line whose ratios (pipeline batches/s / step steps/s) say
how far ahead the pipeline runs; the fed rate matching the fixed-batch rate says the step never
waits for input. Asserts nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mslora_jax.config import experiment_config
from mslora_jax.data.pipeline import train_batches
from mslora_jax.data.registry import union_train_split
from mslora_jax.data.vqa_pipeline import vqa_train_batches
from mslora_jax.parallel.mesh import process_row_range, to_global_batch
from mslora_jax.run.experiment import random_backbone_experiment
from mslora_jax.train.methods import get_method
from mslora_jax.train.stream import stage_context
from mslora_jax.train.stream_experiment import StreamExperiment

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config.")
_METHOD = flags.DEFINE_string("method", "mslora_cr_ortho", "Method whose last stage is timed.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed train steps (after 3 warm-up steps).")
_BATCHES = flags.DEFINE_integer("batches", 200, "Batches read from each pipeline variant.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Worker processes of the worker variant.")
_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices of the mesh; 0 = all.")


def stage_pipeline(exp: StreamExperiment, task_indices: list[int], num_steps: int, **options):
    """The stage's training batches as ``exp.train_batches`` builds them, with reading options."""
    batch_size = exp.config.stage_batch_size(task_indices)
    common = dict(
        batch_size=batch_size,
        num_steps=num_steps,
        seed=0,
        rows=process_row_range(exp.mesh, batch_size),
    )
    if exp.config.model_kind != "llava":
        images, labels = union_train_split(exp.tasks, exp.table, task_indices)
        return train_batches(images, labels, **common, **options)
    llava = exp.config.llava
    return vqa_train_batches(
        [e for i in task_indices for e in exp.tasks[i].examples],
        exp.tokenizer,
        image_size=llava.vision.image_size,
        max_len=exp.max_len,
        template=exp.template,
        image_token_id=llava.image_token_id,
        pad_to_square=llava.pad_to_square,
        **common,
        **options,
    )


def time_pipeline(batches, count: int) -> dict:
    """Seconds to the first batch, then batches/s over the rest."""
    start = time.perf_counter()
    next(batches)
    first = time.perf_counter()
    for _ in range(count - 1):
        next(batches)
    end = time.perf_counter()
    batches.close()
    return {
        "start_s": round(first - start, 3),
        "batches_per_s": round((count - 1) / (end - first), 1),
    }


def main(argv: list[str]) -> None:
    del argv
    config = experiment_config(_CONFIG.value)
    if _DEVICES.value is not None:
        config = dataclasses.replace(config, num_devices=_DEVICES.value)
    with tempfile.TemporaryDirectory() as tmp:  # a generative run's images live here
        exp = random_backbone_experiment(config, Path(tmp))
        method = get_method(_METHOD.value)
        stage = method.num_stages(exp.num_tasks) - 1
        task_indices = list(range(exp.num_tasks)) if method.joint else [stage]
        slots = {method.slot(s): exp.fresh_adapter(s) for s in range(stage)}
        state = exp.init_state(method, exp.fresh_adapter(stage), jax.random.PRNGKey(1))
        context = exp.rules.place(stage_context(exp, method, stage, slots, task_indices))
        host_batch = next(iter(exp.train_batches(task_indices, 1, seed=0)))

        # The step on a fixed device-resident batch.
        batch = to_global_batch(exp.mesh, host_batch)
        step, state, context = exp.train_step.bind(state, context, batch)
        for _ in range(3):
            state, _ = step(state, context, batch)
        jax.block_until_ready(state)
        times = []
        for _ in range(_STEPS.value):
            t0 = time.perf_counter()
            state, _ = step(state, context, batch)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        step_per_s = 1.0 / float(np.median(times))

        # The pipeline alone, read several ways.
        variants = {"on_demand": dict(prefetch=0), "prefetch_2": dict(prefetch=2)}
        if _WORKERS.value:
            variants[f"workers_{_WORKERS.value}"] = dict(prefetch=2, num_workers=_WORKERS.value)
        if config.model_kind == "llava":
            variants = {
                **variants,
                **{f"{k}_no_cache": {**v, "image_cache_mb": 0} for k, v in variants.items()},
            }
        pipelines = {
            name: time_pipeline(
                stage_pipeline(exp, task_indices, _BATCHES.value, **options), _BATCHES.value
            )
            for name, options in variants.items()
        }

        # The step fed by a pipeline, as run_steps feeds it: on demand, read ahead (training's
        # default), and the fixed host batch (the transfer alone, no batch building).
        def fed(state, batches):  # the state is donated to every step: thread it through
            state, _ = step(state, context, to_global_batch(exp.mesh, next(batches)))
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            for host in batches:
                state, _ = step(state, context, to_global_batch(exp.mesh, host))
            jax.block_until_ready(state)
            return state, round(_STEPS.value / (time.perf_counter() - t0), 1)

        count, fed_per_s = _STEPS.value + 1, {}
        state, fed_per_s["fixed_host_batch"] = fed(state, iter([host_batch] * count))
        for name in ("on_demand", "prefetch_2"):
            batches = stage_pipeline(exp, task_indices, count, **variants[name])
            state, fed_per_s[name] = fed(state, batches)

    rows = len(host_batch["image"]) * jax.process_count()
    device = exp.mesh.devices.flat[0]
    result = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": exp.mesh.size,
        "host_cpus": len(os.sched_getaffinity(0)),
        "model_kind": config.model_kind,
        "method": method.name,
        "stage": stage,
        "batch_size": rows,
        "train_step_per_s": round(step_per_s, 1),
        "train_step_fed_per_s": fed_per_s,
        "pipeline": pipelines,
        "pipeline_over_step": {
            name: round(p["batches_per_s"] / step_per_s, 2) for name, p in pipelines.items()
        },
    }
    print(json.dumps(result, indent=2))
    ratios = ", ".join(
        f"{name} {p['batches_per_s']:.0f}/s ({p['batches_per_s'] / step_per_s:.1f}x)"
        for name, p in pipelines.items()
    )
    fed_text = ", ".join(f"{k} {v:.1f}" for k, v in fed_per_s.items())
    print(
        f"{config.model_kind} batch {rows} on {exp.mesh.size} {device.platform}: train step "
        f"{step_per_s:.1f} steps/s; input pipeline {ratios}; step fed by {fed_text} steps/s"
    )


if __name__ == "__main__":
    app.run(main)
