"""A run's pictures from its workdir: adapter similarity and per-stage loss curves per method.

``write_pictures(workdir)`` reads only what a run leaves behind (config.json, the stage
checkpoints, logs/train.jsonl), so the end of ``mslora-jax run``, ``mslora-jax inspect --plots``
and a notebook draw the same pictures::

    plots/adapter_similarity_<method>.png   methods with per-task adapters (not seq, joint)
    plots/loss_<method>.png                 every method with logged training steps

The drawing is ``report.pictures``; the similarities are ``lora.compare``'s. In a
multi-process run every process calls ``write_pictures`` (orbax's restore waits for all
processes, as its save does), and process 0 alone draws and writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mslora_jax.config import METHODS, ExperimentConfig
from mslora_jax.io_utils import atomic_savefig
from mslora_jax.lora.compare import cr_similarity_matrix, delta_w_cosine_matrix
from mslora_jax.parallel.distributed import is_primary
from mslora_jax.report.pictures import plot_adapter_similarity, plot_loss_curves
from mslora_jax.report.training_log import read_step_records
from mslora_jax.train.checkpoints import load_stage_adapters, read_workdir_config
from mslora_jax.train.methods import get_method

PLOTS_DIR = "plots"


def final_slot_adapters(workdir: str | os.PathLike, method: str) -> list[dict]:
    """Each adapter slot's final adapter (its last finished stage's), in slot order, as
    ``{"slot", "tasks" (trained into it, stream order), "modality", "params", "scaling"}``.
    With a slot per task that is one adapter per finished task; with ``lora.granularity =
    "modality"``, one per modality, continued by each of its tasks."""
    slots: dict[int, dict] = {}
    for stage, (meta, params) in enumerate(load_stage_adapters(workdir, method)):
        slot = int(meta.get("slot", stage))  # older checkpoints: a slot per stage
        tasks = slots.get(slot, {}).get("tasks", []) + [meta["task"]]
        slots[slot] = {"slot": slot, "tasks": tasks, "modality": meta["modality"],
                       "params": params, "scaling": meta["alpha"] / meta["rank"]}  # fmt: skip
    return [slots[s] for s in sorted(slots)]


def write_pictures(
    workdir: str | os.PathLike, methods: list[str] | tuple[str, ...] | None = None
) -> dict[str, Path]:
    """Draw the pictures of ``methods`` (default: every method with checkpoints in
    ``workdir``) into ``workdir/plots``; returns the paths written, keyed by file name.

    A method with a shared adapter (seq, joint), or with fewer than two finished adapters, has
    no similarity picture; a method without logged steps has no loss picture. Every process of
    a run calls it; off process 0 it only reads the checkpoints and returns nothing."""
    workdir = Path(workdir)
    config = read_workdir_config(workdir)
    if methods is None:
        methods = [m for m in METHODS if (workdir / "checkpoints" / m).is_dir()]
    records = read_step_records(workdir / "logs")
    written: dict[str, Path] = {}

    def save(fig, name: str) -> None:
        path = workdir / PLOTS_DIR / name
        atomic_savefig(fig, path, dpi=150)
        written[name] = path

    for method in methods:
        if get_method(method).per_task_adapters:
            slots = final_slot_adapters(workdir, method)  # every process: orbax's barriers
            if len(slots) >= 2 and is_primary():
                save(_similarity_figure(config, method, slots), f"adapter_similarity_{method}.png")
        if records.get(method) and is_primary():
            save(plot_loss_curves(records[method], title=method), f"loss_{method}.png")
    return written


def _similarity_figure(config: ExperimentConfig, method: str, slots: list[dict]):
    distance = config.regularizer.cr_distance
    params = [s["params"] for s in slots]
    similarity = cr_similarity_matrix(params, distance, slots[0]["scaling"])
    per_task = config.lora.granularity == "task"
    labels = [s["tasks"][0] if per_task else "+".join(s["tasks"]) for s in slots]
    what = "task adapters" if per_task else "modality adapters"
    return plot_adapter_similarity(
        labels,
        [s["modality"] for s in slots],
        np.asarray(similarity),
        delta_w_cosine_matrix(params),
        title=f"{method}: similarity of the {what}",
        similarity_label=f"CR similarity mean exp(-d), {distance} distance",
        modality_first=config.modalities,
    )
