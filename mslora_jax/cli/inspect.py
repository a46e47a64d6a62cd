"""Summarise the adapters a run saved: which task, modality, size, norms and similarities."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from mslora_jax.errors import CheckpointError
from mslora_jax.lora.compare import cr_similarity
from mslora_jax.train.checkpoints import load_stage_adapters, read_workdir_config


def _norm(leaves, name: str) -> float:
    """Frobenius norm over every ``name`` tensor (lora_a or lora_b) of an adapter."""
    return float(np.sqrt(sum(np.sum(x**2) for p, x in leaves if str(p[-1].key) == name)))


def inspect_adapters(workdir: str | Path, method: str, task: str | None = None) -> str:
    config = read_workdir_config(workdir)
    stages = load_stage_adapters(workdir, method)
    if task is not None:
        index = config.task_index(task)
        stages = [s for s in stages if s[0]["task"] == config.stream[index].name]
        if not stages:
            raise CheckpointError(f"method {method!r} has no finished stage for task {task!r}")
    lines = [
        "| stage task | modality | slot | rank | alpha | params | ||A|| | ||B|| |",
        "|---" * 8 + "|",
    ]
    for meta, params in stages:
        leaves = jax.tree_util.tree_leaves_with_path(params)
        count = sum(x.size for _, x in leaves)
        lines.append(
            f"| {meta['task']} | {meta['modality']} | {meta.get('slot', '')} | {meta['rank']} | "
            f"{meta['alpha']} | "
            f"{count} | {_norm(leaves, 'lora_a'):.3f} | {_norm(leaves, 'lora_b'):.3f} |"
        )
    if len(stages) > 1:
        distance = config.regularizer.cr_distance
        scaling = stages[0][0]["alpha"] / stages[0][0]["rank"]  # one lora config per run
        lines.append(f"\nCR similarity s between adapters ({distance} distance; 1 = identical):")
        names = [m["task"] for m, _ in stages]
        lines.append("| | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for name, (_, a) in zip(names, stages):
            sims = [f"{cr_similarity(a, b, distance, scaling):.3f}" for _, b in stages]
            lines.append(f"| {name} | " + " | ".join(sims) + " |")
    return "\n".join(lines)
