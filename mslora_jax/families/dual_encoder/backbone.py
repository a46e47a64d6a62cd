"""The dual encoder's frozen backbone: random init born sharded, full pretraining on the base
tasks (CLIP InfoNCE against class prompts), or a saved one (``train.backbone``)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import jax
from jax.sharding import Mesh

from mslora_jax.config import ExperimentConfig
from mslora_jax.data.pipeline import train_batches
from mslora_jax.data.prompt_tokenizer import prompt_encoder
from mslora_jax.data.registry import class_table, load_tasks, union_train_split
from mslora_jax.eval.evaluate import evaluate_accuracy, make_predict_fn
from mslora_jax.families.dual_encoder.objectives import pretrain_loss
from mslora_jax.losses.contrastive import sharded_clip_loss
from mslora_jax.models.clip import DualEncoder, ModelConfig, init_backbone
from mslora_jax.parallel.mesh import check_divisible, process_row_range, round_up_to_batch_shards
from mslora_jax.parallel.rules import ShardingRules
from mslora_jax.parallel.sharded_jit import born_sharded
from mslora_jax.train.backbone import obtain_frozen_backbone, pretrain_provenance, train_all_params

log = logging.getLogger(__name__)


def init_backbone_sharded(model_config: ModelConfig, mesh: Mesh, rng) -> dict:
    """Random dual-encoder params, born sharded on the mesh by the sharding rules."""
    rules = ShardingRules(mesh, "dual_encoder")
    return born_sharded(lambda key: init_backbone(model_config, key), rules, rng)


def pretrain_backbone(config: ExperimentConfig, mesh: Mesh, rng) -> tuple[dict, dict]:
    """Fully train a fresh backbone on ``config.base_tasks``; returns (params, info)."""
    cfg = config.pretrain
    tasks = load_tasks(config, config.base_tasks)
    table = class_table(tasks, config.prompt_template, prompt_encoder(config))
    images, labels = union_train_split(tasks, table, range(len(tasks)))
    check_divisible(cfg.batch_size, mesh, "pretrain.batch_size")
    model = DualEncoder(config.model)
    init_key, state_key = jax.random.split(rng)
    rules = ShardingRules(mesh, "dual_encoder")
    params = init_backbone_sharded(config.model, mesh, init_key)
    batches = train_batches(
        images,
        labels,
        batch_size=cfg.batch_size,
        num_steps=cfg.steps,
        seed=config.seed,
        rows=process_row_range(mesh, cfg.batch_size),
    )
    state, stats = train_all_params(
        config,
        rules,
        params,
        pretrain_loss(model, sharded_clip_loss(mesh)),
        batches,
        state_key,
        class_tokens=table.tokens,
        desc="pretrain",
    )
    predict = make_predict_fn(model)
    accs = {}
    for i, task in enumerate(tasks):
        tokens, valid = table.task_tokens(i, max(table.sizes))
        accs[task.name] = evaluate_accuracy(
            predict,
            mesh,
            state.trainable,
            None,
            None,
            task.test_images,
            task.test_labels,
            tokens,
            valid,
            round_up_to_batch_shards(config.train.eval_batch_size, mesh),
        )
    info = {
        "steps": cfg.steps,
        "final_loss": stats.final_metrics.get("loss"),
        "steps_per_s": stats.steps_per_s,
        "base_task_acc": accs,
    }
    loss = info["final_loss"]
    log.info("pretrained the backbone: %d steps, final loss %s", cfg.steps,
             "–" if loss is None else f"{loss:.4f}")  # fmt: skip
    log.debug("pretrained backbone: %s", info)
    return state.trainable, info


def obtain_backbone(config: ExperimentConfig, workdir: Path, mesh: Mesh) -> tuple[dict, dict]:
    """The dual encoder's frozen backbone (see ``obtain_frozen_backbone``)."""
    init = functools.partial(init_backbone, config.model)
    rules = ShardingRules(mesh, "dual_encoder")
    return obtain_frozen_backbone(
        config,
        workdir,
        # A saved backbone is restored straight into its shardings (each host reads its shards).
        abstract=rules.abstract(jax.eval_shape(init, jax.random.PRNGKey(0))),
        model_json=dataclasses.asdict(config.model),
        provenance=pretrain_provenance(config, prompt_template=config.prompt_template),
        init_fn=lambda rng: init_backbone_sharded(config.model, mesh, rng),
        pretrain_fn=lambda rng: pretrain_backbone(config, mesh, rng),
    )
