"""Run a whole experiment: backbone, every method over the stream, results and reports.

In a multi-process run every process runs all of this (each computation spans all devices);
process 0 alone writes the one-per-run files (config.json, results, tables, plots, answers),
while checkpoints are written by all processes together (orbax).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import jax
from jax.sharding import Mesh

from mslora_jax.config import BackboneConfig, ExperimentConfig, to_json_dict
from mslora_jax.continual_retrieval.gallery import run_gallery
from mslora_jax.continual_retrieval.protocol import evaluate_run
from mslora_jax.errors import ConfigError
from mslora_jax.families import family_of
from mslora_jax.io_utils import atomic_savefig, atomic_write_json, atomic_write_text, read_json
from mslora_jax.parallel.distributed import is_primary
from mslora_jax.parallel.mesh import make_mesh
from mslora_jax.report.results import format_percent, validate_results, write_results
from mslora_jax.report.retrieval_gallery import plot_gallery
from mslora_jax.report.task_metrics import validate_task_metrics, write_task_metrics
from mslora_jax.report.training_log import TrainingLog
from mslora_jax.run.pictures import write_pictures
from mslora_jax.train.checkpoints import StageCheckpoints, check_same_config
from mslora_jax.train.methods import get_method
from mslora_jax.train.preemption import stop_on_sigterm
from mslora_jax.train.stream import run_method

log = logging.getLogger(__name__)

ZERO_SHOT_DIR = "frozen_backbone"  # answers/ folder of the model without adapters

# Run-time knobs: keys that may change between a run and its resumption without invalidating
# checkpoints (how the results are computed, or what the run shows, not what they are); every
# other key defines the results and a resume must match it (``fingerprint``). Dotted keys are
# nested. Two knobs change numbers (docs/command_line.md, "What a resume must match"): gradient
# accumulation (each micro-batch's loss is its own mean; the dual encoder's negatives are its
# micro-batch's) and the generation length (answers of stages evaluated after the change).
RESUMABLE_KEYS = (
    "methods",
    "progress",
    "num_devices",
    "mesh",
    "train.eval_batch_size",
    "train.grad_accum_steps",
    "train.micro_batch_size",
    "train.log_every_steps",
    "train.input_prefetch",
    "train.input_workers",
    "train.image_cache_mb",
    "checkpoint",
    "lora.fold_frozen",
    "llava.attention_chunk",
    "llava.attention_kernel",
    "llava.remat",
    "llava.max_new_tokens",
    "retrieval",  # evaluated after training from the stage checkpoints; trains nothing
)


# Keys that define results but were added after workdirs were written: left out of the
# fingerprint while at these defaults (what those workdirs ran), so such a workdir still resumes;
# any other value is recorded and must match.
LATER_KEYS = {
    "regularizer.cr_distance": "released",
    "lora.granularity": "task",
    "regularizer.olora_lambda": 0.5,
    "regularizer.ewc_lambda": 100.0,
    "regularizer.ewc_fisher_batches": 8,
    "regularizer.lwf_lambda": 1.0,
    "regularizer.lwf_temperature": 2.0,
    "regularizer.modx_lambda": 20.0,
    "eval.metrics": "clean",
}


def _pop(cfg: dict, key: str, only_if=None) -> None:
    """Remove the dotted ``key`` from the nested ``cfg`` (when its value is ``only_if``, if set).

    With ``only_if`` a section left empty goes too: a section added later (``eval``) is then
    absent, as in the workdirs written before it."""
    *parents, leaf = key.split(".")
    nodes = [cfg]
    for parent in parents:
        nodes.append(nodes[-1].get(parent, {}))
    if only_if is None or nodes[-1].get(leaf) == only_if:
        nodes[-1].pop(leaf, None)
    if only_if is not None:
        for depth in range(len(parents), 0, -1):  # nodes[depth] is the section parents[depth-1]
            if nodes[depth] == {} and parents[depth - 1] in nodes[depth - 1]:
                del nodes[depth - 1][parents[depth - 1]]


def fingerprint(config: ExperimentConfig) -> dict:
    """The part of the config that determines results (what a resume must match)."""
    cfg = to_json_dict(config)
    for key in RESUMABLE_KEYS:
        _pop(cfg, key)
    for key, default in LATER_KEYS.items():
        _pop(cfg, key, only_if=default)
    return cfg


def claim_workdir(config: ExperimentConfig, workdir: Path) -> None:
    """Record the config in ``workdir``, or check it matches the one recorded by a previous run.

    Every process checks; process 0 records (atomically, so a process that looks while it writes
    sees either no file or the whole one).
    """
    path = workdir / "config.json"
    if path.exists():
        check_same_config(read_json(path, "workdir"), fingerprint(config), f"workdir {workdir}")
    elif is_primary():
        atomic_write_json(path, fingerprint(config))


def run_experiment(config: ExperimentConfig, workdir: str | os.PathLike) -> dict:
    """Run (or resume) every configured method; write results.json, tables and plots (also
    ``plots/``: adapter similarity and loss curves per method, ``run.pictures``).

    Beside them, task_metrics.json/.md/.csv hold every metric of every task (see
    ``mslora_jax.report.task_metrics``); results.json holds each task's primary metric. A
    generative run also saves every final model's answers under ``answers/``.
    """
    workdir = Path(workdir)
    # Bad input (mesh, data, tokenizer file) fails before the workdir is created or claimed, so
    # the fixed config can still use it.
    mesh = make_mesh(config.num_devices, config.mesh.shape)
    inputs = read_inputs(config)
    workdir.mkdir(parents=True, exist_ok=True)
    claim_workdir(config, workdir)
    with stop_on_sigterm():  # SIGTERM: save at the next step and stop (train.preemption)
        return _run_experiment(config, workdir, mesh, inputs)


def read_inputs(config: ExperimentConfig):
    """What a run reads from outside its workdir, read and checked by the config's model family
    (it only reads): the dual encoder's stream tasks, or a generative run's VQA files and
    tokenizer file."""
    family = family_of(config)
    inputs = family.read_inputs(config)
    check_train_sizes(config, family.train_sizes(config, inputs))
    return inputs


def check_train_sizes(config: ExperimentConfig, sizes: list[int]) -> None:
    """ConfigError naming the task if a stage of ``config.methods`` has fewer training examples
    (``sizes``, per stream task) than its batch size: found now, not after the first compiles."""
    methods = [get_method(name) for name in config.methods]
    stages = [[i] for i in range(len(sizes))] if any(not m.joint for m in methods) else []
    if any(m.joint for m in methods):
        stages.append(list(range(len(sizes))))
    for indices in stages:
        count, batch_size = sum(sizes[i] for i in indices), config.stage_batch_size(indices)
        if count < batch_size:
            names = [config.stream[i].name for i in indices]
            what = f"task {names[0]!r}" if len(names) == 1 else f"the joint stage over {names}"
            raise ConfigError(
                f"{what} has {count} training examples, fewer than its batch size {batch_size} "
                "(train.batch_size, or the task's batch_size)"
            )


def _run_experiment(config: ExperimentConfig, workdir: Path, mesh: Mesh, inputs) -> dict:
    exp, backbone_info = family_of(config).build_experiment(config, workdir, mesh, inputs)
    tasks = exp.tasks
    zero_shot_metrics = [exp.task_metrics({}, [], t) for t in range(exp.num_tasks)]
    zero_shot = [exp.primary_value(m, t) for t, m in enumerate(zero_shot_metrics)]
    log.info("frozen backbone, no adapter: %s", " ".join(format_percent(x) for x in zero_shot))
    training_log = TrainingLog(workdir / "logs")
    try:
        outcomes = {
            name: run_method(
                exp,
                exp.method(name),
                StageCheckpoints(workdir / "checkpoints" / name),
                fingerprint(config),
                training_log,
                steps_dir=workdir / "steps" / name,
                zero_shot=zero_shot,
            )
            for name in config.methods
        }
    finally:
        training_log.close()
    methods = {name: outcome.summary for name, outcome in outcomes.items()}
    method_metrics = {name: outcome.task_metrics for name, outcome in outcomes.items()}
    results = {
        "tasks": [{"name": t.name, "modality": t.modality} for t in tasks],
        "methods": methods,
        "backbone": {
            **{k: v for k, v in backbone_info.items() if k != "base_task_acc"},
            "base_task_acc": backbone_info.get("base_task_acc", {}),
            "zero_shot_acc": zero_shot,
            **_router_info(exp),
            "num_devices": mesh.size,
            "platform": jax.devices()[0].platform,
        },
    }
    task_metrics = {
        "tasks": [
            {"name": t.name, "modality": t.modality, "primary_metric": exp.primary_metric(i)}
            for i, t in enumerate(tasks)
        ],
        "zero_shot": zero_shot_metrics,
        "methods": method_metrics,
        # Whose definitions the generative answer metrics follow (the dual encoder's accuracy is
        # the same under either).
        **({"answer_metrics": config.eval.metrics} if config.model_kind == "llava" else {}),
    }
    if config.retrieval.enabled:
        # After training, from the stage checkpoints: indexing and querying are decoupled from it.
        results["retrieval"] = evaluate_run(exp, workdir, config.methods, config.retrieval)
    # Both reports are validated before either is written, so bad numbers leave no half set;
    # every process validates, so all of them fail alike.
    validate_results(results)
    validate_task_metrics(task_metrics)
    if is_primary():
        write_results(workdir, results)
        write_task_metrics(workdir, task_metrics)
    if config.retrieval.enabled:
        title, rows = run_gallery(exp, workdir, config.methods, config.retrieval)
        if is_primary():
            atomic_savefig(plot_gallery(rows, title), workdir / "retrieval_gallery.png", dpi=150)
    # plots/: adapter similarity and loss curves; every process reads the checkpoints (orbax
    # restores wait for all of them), process 0 draws.
    write_pictures(workdir, config.methods)
    write_answers(
        exp,
        workdir / "answers",
        {ZERO_SHOT_DIR: ({}, None)}
        | {name: (outcome.adapters, exp.method(name)) for name, outcome in outcomes.items()},
    )
    return results


def _router_info(exp) -> dict:
    """The task-agnostic router's accuracy per task and mean (nothing for a model without)."""
    accuracy = exp.router_accuracy()
    if accuracy is None:
        return {}
    return {
        "router": "nearest class prototype of frozen image features",
        "router_acc": accuracy,
        "router_avg_acc": sum(accuracy) / len(accuracy),
    }


def write_answers(exp, directory: Path, runs: dict) -> None:
    """``directory/<method>/<task>.jsonl``: each final model's answer to every test question.

    ``runs`` maps a folder name to (adapters by slot, method); method None is the frozen
    backbone. Models without per-item answers (the dual encoder) write nothing. Every process
    generates (generation spans all devices); process 0 writes.
    """
    for name, (adapters, method) in runs.items():
        for task in range(exp.num_tasks):
            active = [] if method is None else method.eval_slots(task)
            records = exp.answer_records(adapters, active, task)
            if records is None:
                return
            if is_primary():
                lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                atomic_write_text(directory / name / f"{exp.tasks[task].name}.jsonl", lines)


def random_backbone_experiment(config: ExperimentConfig, workdir: str | os.PathLike):
    """The run's experiment over a seeded random backbone, with no pretraining and no base
    tasks: for benchmarks, whose figures do not depend on the weights' values. A generative
    config writes its synthetic task folders and tokenizer under ``workdir``."""
    config = dataclasses.replace(
        config, backbone=BackboneConfig(source="random"), base_tasks=(), progress=False
    )
    mesh = make_mesh(config.num_devices, config.mesh.shape)
    return family_of(config).random_experiment(config, Path(workdir), mesh)
