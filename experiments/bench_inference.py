"""Benchmark: evaluation cost with T adapters merged into the kernels vs unadapted vs stacked.

    python experiments/bench_inference.py --config configs/demo.py [--tasks 8] [--repeats 20]
    python experiments/bench_inference.py --config configs/demo_generative.py [--tasks 8]

Prints one JSON object; asserts nothing. The backbone is random (``backbone.source="random"``)
and every one of the ``--tasks`` slots holds an adapter with random nonzero A and B, so the
merged kernels really differ from the backbone's. On one fixed device batch, timed in the same
run (interleaved, median of ``--repeats``, after a compiling call each):

- ``unadapted``: ``{"params": exp.base_params}``;
- ``merged``: ``{"params": exp.inference_params(slots, all)}``, what evaluation now runs (the
  one-off merge is timed too, ``merge_s``);
- ``stacked``: ``{"params": exp.base_params, "lora": exp.stack(slots)}``, every slot weighted.

Dual encoder configs: ``exp.predict_fn`` (both towers: the class prompts and the test images),
images/s. LLaVA configs: greedy generation (``llava_generate``, KV cache, no stop token so every
row generates ``llava.max_new_tokens``), tokens/s. Ratios are times over the unadapted time; the
target is merged within 5% of unadapted. A stream with fewer than ``--tasks`` tasks is extended
by repeating its entries under new names (synthetic ones with new seeds).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mslora_jax.config import ExperimentConfig, experiment_config
from mslora_jax.models.generate import llava_generate
from mslora_jax.parallel.mesh import process_rows, replicate, to_global_batch
from mslora_jax.parallel.sharded_jit import ShardedOutputs, sharding_context
from mslora_jax.run.experiment import random_backbone_experiment
from mslora_jax.train.stream_experiment import StreamExperiment

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config.")
_TASKS = flags.DEFINE_integer("tasks", 8, "Adapters (tasks of the stream), all active.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per variant.")
_BATCH = flags.DEFINE_integer("batch", 0, "Images or prompts per call; 0: eval batch size.")
_PROMPT = flags.DEFINE_integer("prompt_len", 0, "LLaVA text tokens per prompt; 0: max_len.")
_WORKDIR = flags.DEFINE_string("workdir", "", "LLaVA only: data/tokenizer folder; default: temp.")


def with_tasks(config: ExperimentConfig, count: int) -> ExperimentConfig:
    """``config`` whose stream has ``count`` tasks: cut, or extended with renamed copies."""
    stream = list(config.stream[:count])
    for i in range(len(stream), count):
        task, copy = config.stream[i % len(config.stream)], i // len(config.stream)
        # A copy of a file-backed task reads its original's folder.
        folder = task.folder if task.source == "synthetic" else (task.folder or task.name)
        stream.append(
            dataclasses.replace(
                task, name=f"{task.name}_copy{copy}", seed=task.seed + 7919 * copy, folder=folder
            )
        )
    return dataclasses.replace(config, stream=tuple(stream))


def perturbed(adapter: dict, key: jax.Array) -> dict:
    """Nonzero A and B (a fresh adapter's B is zero: merging it would change nothing)."""
    leaves, tree = jax.tree.flatten(adapter)
    keys = jax.random.split(key, len(leaves))
    return tree.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


def forward_fn(exp: StreamExperiment, rows: int) -> tuple[Callable, int, str]:
    """``(fn(variables) -> device output, items per call, unit)`` on one fixed device batch."""
    config, mesh, weights = exp.config, exp.mesh, exp.weights(list(range(exp.num_tasks)))
    if config.model_kind == "llava":
        from mslora_jax.families.llava.experiment import pixels

        cfg = config.llava.model_config()
        length = _PROMPT.value or config.llava.max_len
        rng = np.random.default_rng(0)
        size = cfg.vision.image_size
        host = {
            "image": rng.integers(0, 256, (rows, size, size, 3), np.uint8),
            "input_ids": rng.integers(5, cfg.decoder.vocab_size, (rows, length), np.int32),
            "attention_mask": np.ones((rows, length), bool),
        }
        host["input_ids"][:, 1] = cfg.image_token_id  # ids >= 5 never hit it elsewhere
        batch = to_global_batch(mesh, process_rows(mesh, host))
        images = pixels(config, batch["image"])

        def generate(variables):
            with sharding_context(exp.rules):
                out = llava_generate(
                    exp.model,
                    variables,
                    images,
                    batch["input_ids"],
                    batch["attention_mask"],
                    weights,
                    max_new_tokens=exp.max_new_tokens,
                    return_logits=False,
                )
            return out.tokens

        return generate, rows * exp.max_new_tokens, "tokens"
    images = np.concatenate([t.test_images for t in exp.tasks])[:rows]
    if len(images) < rows:
        raise app.UsageError(f"--batch {rows}: the stream has only {len(images)} test images")
    images = to_global_batch(mesh, process_rows(mesh, {"image": images}))["image"]
    tokens, valid = replicate(mesh, exp.table.task_tokens(0, exp.max_classes))
    return (
        lambda variables: exp.predict_fn(variables, weights, images, tokens, valid),
        rows,
        "images",
    )


def timed(fn: Callable, *args) -> float:
    """Seconds of one call, run to completion."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    del argv
    base = experiment_config(_CONFIG.value)
    config = with_tasks(base, _TASKS.value)
    with tempfile.TemporaryDirectory() as tmp:
        exp = random_backbone_experiment(config, Path(_WORKDIR.value or tmp))
    rows = _BATCH.value or exp.eval_batch_size
    noisy = ShardedOutputs(perturbed, exp.rules)  # born sharded like the fresh adapters
    slots = {
        i: noisy(exp.fresh_adapter(i), jax.random.PRNGKey(100 + i)) for i in range(exp.num_tasks)
    }
    active = list(slots)
    merge_first = timed(exp.inference_params, slots, active)
    merge_s = float(np.median([timed(exp.inference_params, slots, active) for _ in range(3)]))
    variants = {
        "unadapted": {"params": exp.base_params},
        "merged": {"params": exp.inference_params(slots, active)},
        "stacked": {"params": exp.base_params, "lora": exp.stack(slots)},
    }
    fn, items, unit = forward_fn(exp, rows)
    outputs = {name: np.asarray(fn(v)) for name, v in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(_REPEATS.value):  # interleaved, order rotated: drifting load hits all alike
        for name in names[r % 3 :] + names[: r % 3]:
            times[name].append(timed(fn, variants[name]))
    median = {name: float(np.median(t)) for name, t in times.items()}
    same = lambda a, b: round(float(np.mean(outputs[a] == outputs[b])), 4)
    print(
        json.dumps(
            {
                "platform": jax.devices()[0].platform,
                "device_kind": jax.devices()[0].device_kind,
                "devices": exp.mesh.size,
                "model_kind": config.model_kind,
                "num_tasks": exp.num_tasks,
                "stream": f"{len(base.stream)} config tasks"
                + (f", repeated to {exp.num_tasks}" if exp.num_tasks > len(base.stream) else ""),
                "batch": rows,
                "unit": unit,
                "repeats": _REPEATS.value,
                **{f"{name}_s": round(s, 6) for name, s in median.items()},
                **{f"{name}_{unit}_per_s": round(items / s, 1) for name, s in median.items()},
                "merged_over_unadapted": round(median["merged"] / median["unadapted"], 4),
                "stacked_over_unadapted": round(median["stacked"] / median["unadapted"], 4),
                "merged_within_5pct": median["merged"] <= 1.05 * median["unadapted"],
                "merge_s": round(merge_s, 6),
                "merge_first_s_incl_compile": round(merge_first, 3),
                "output_agreement": {
                    "merged_vs_stacked": same("merged", "stacked"),
                    "merged_vs_unadapted": same("merged", "unadapted"),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    app.run(main)
