"""The frozen backbone of a run, for any model family: random, restored, or fully pretrained
once on the base tasks and saved under ``workdir/backbone`` (``obtain_frozen_backbone``), and the
full-parameter training loop that pretraining uses (``train_all_params``).

A family supplies its model's init, abstract shapes and pretraining objective
(``families.dual_encoder.backbone``, ``families.llava.setup``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import flax.struct
import jax

from mslora_jax.config import ExperimentConfig, to_json_dict
from mslora_jax.errors import CheckpointError
from mslora_jax.parallel.rules import ShardingRules
from mslora_jax.parallel.sharded_jit import ShardedStep, born_sharded
from mslora_jax.train.checkpoints import describe_differences, load_backbone, save_backbone
from mslora_jax.train.loop import run_steps
from mslora_jax.train.optim import Schedule, make_optimizer
from mslora_jax.train.step import init_train_state, make_train_step

log = logging.getLogger(__name__)


@flax.struct.dataclass
class PretrainContext:
    class_tokens: jax.Array  # [C, L] prompt tokens of every base class
    schedule: Schedule


def train_all_params(
    config: ExperimentConfig,
    rules: ShardingRules,
    params,
    loss_fn,
    batches,
    rng,
    *,
    class_tokens,
    desc,
):
    """Full training (every backbone parameter) for ``config.pretrain.steps`` steps.

    ``loss_fn(params, context, batch, rng)`` reads ``context.class_tokens`` if it needs them.
    Parameters and Adam moments are sharded by ``rules``. Returns the final train state and loop
    stats.
    """
    cfg = config.pretrain
    optimizer = make_optimizer(cfg.weight_decay, grad_clip_norm=1.0)
    step = ShardedStep(make_train_step(loss_fn, optimizer), rules)
    init = lambda p, key: init_train_state(p, optimizer, key)
    state = born_sharded(init, rules, rules.place(params), rng)
    schedule = Schedule.create(cfg.learning_rate, cfg.steps, cfg.warmup_ratio)
    context = rules.place(PretrainContext(class_tokens, schedule))
    return run_steps(
        step,
        state,
        context,
        batches,
        rules.mesh,
        num_steps=cfg.steps,
        desc=desc,
        progress=config.progress,
    )


def obtain_frozen_backbone(
    config: ExperimentConfig,
    workdir: Path,
    *,
    abstract,
    model_json: dict,
    provenance: dict,
    init_fn: Callable[[jax.Array], dict],
    pretrain_fn: Callable[[jax.Array], tuple[dict, dict]],
) -> tuple[dict, dict]:
    """The frozen backbone of a run (any model), saved once under ``workdir/backbone``.

    ``random``: ``init_fn(rng)``; ``load``: restored from ``backbone.path``; ``pretrain``:
    restored from the workdir if a previous run saved one with the same ``provenance`` (how it
    was pretrained), otherwise ``pretrain_fn(rng) -> (params, info)`` and saved.
    """
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 10_000)
    if config.backbone.source == "load":
        params, meta = load_backbone(config.backbone.path, abstract, model_json)
        return params, meta.get("info", {})
    if config.backbone.source == "random":
        return init_fn(rng), {"source": "random"}
    directory = workdir / "backbone"
    if (directory / "meta.json").exists():
        params, meta = load_backbone(directory, abstract, model_json)
        # The config's own rule: a key added later, at its off default, matches its absence.
        differences = describe_differences(meta.get("provenance"), provenance, "provenance")
        if differences:
            raise CheckpointError(
                f"backbone {directory} was pretrained with different pretrain/base_tasks settings"
                f" ({'; '.join(differences[:3])}); use a new --workdir"
            )
        log.info("loaded the pretrained backbone from %s", directory)
        return params, meta.get("info", {})
    params, info = pretrain_fn(rng)
    info = {**info, "source": "pretrain"}
    save_backbone(directory, params, {"model": model_json, "provenance": provenance, "info": info})
    return params, info


def pretrain_provenance(config: ExperimentConfig, **extra) -> dict:
    """What a pretrained backbone depends on besides its model config."""
    cfg = to_json_dict(config)
    return {
        "pretrain": cfg["pretrain"],
        "base_tasks": cfg["base_tasks"],
        "seed": config.seed,
        **extra,
    }
