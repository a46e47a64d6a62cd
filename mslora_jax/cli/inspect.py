"""Summarise the adapters a run saved: which task, modality, size, norms and similarities."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from mslora_jax.config import ExperimentConfig, from_mapping
from mslora_jax.errors import CheckpointError
from mslora_jax.io_utils import read_json
from mslora_jax.losses.regularizers import adapter_similarities
from mslora_jax.train.checkpoints import read_tree_on_one_device
from mslora_jax.train.methods import get_method


def load_stage_adapters(workdir: str | Path, method: str) -> list[tuple[dict, dict]]:
    """(meta, adapter params as numpy) of every finished stage of ``method``, in stage order."""
    get_method(method)
    directory = Path(workdir).absolute() / "checkpoints" / method
    if not directory.exists():
        raise CheckpointError(f"no checkpoints for method {method!r} under {directory}")
    manager = ocp.CheckpointManager(directory)
    out = []
    for stage in sorted(manager.all_steps()):
        try:
            meta = manager.restore(stage, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            # Onto one device: a workdir written by a multi-device or multi-process run works.
            adapter = read_tree_on_one_device(directory / str(stage) / "adapter")
        except Exception as e:
            raise CheckpointError(f"checkpoint {directory / str(stage)} is unreadable: {e}") from e
        out.append((meta["meta"], adapter))
    return out


def _similarity(a: dict, b: dict, distance: str = "released", scaling: float = 1.0) -> float:
    """The CR similarity s of the run's ``regularizer.cr_distance`` (released: the mean over
    matrices of exp(-||P_a - P_b||_F), a scanned layer's ``[layers, m, n]`` factor counting as
    its ``layers`` matrices, as in the CR loss)."""
    if distance == "released":
        diffs = jax.tree.map(
            lambda x, y: np.exp(-np.linalg.norm(x - y, axis=(-2, -1))).ravel(), a, b
        )
        return float(np.mean(np.concatenate(jax.tree.leaves(diffs))))
    stacked = jax.tree.map(lambda x: x[None], b)
    return float(adapter_similarities(a, stacked, distance, scaling)[0])


def _norm(leaves, name: str) -> float:
    """Frobenius norm over every ``name`` tensor (lora_a or lora_b) of an adapter."""
    return float(np.sqrt(sum(np.sum(x**2) for p, x in leaves if str(p[-1].key) == name)))


def inspect_adapters(workdir: str | Path, method: str, task: str | None = None) -> str:
    config = from_mapping(ExperimentConfig, read_json(Path(workdir) / "config.json", "workdir"))
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
            sims = [f"{_similarity(a, b, distance, scaling):.3f}" for _, b in stages]
            lines.append(f"| {name} | " + " | ".join(sims) + " |")
    return "\n".join(lines)
