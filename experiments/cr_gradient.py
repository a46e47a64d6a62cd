"""How strongly each CR distance pulls and pushes the trained adapter, against the task loss.

    python experiments/cr_gradient.py [--config configs/smoke.py] [--ranks 4,16,64] [--width 256]

Prints a table; asserts nothing. For each LoRA rank and each ``regularizer.cr_distance`` it gives
the norm of the (unweighted) CR gradient with respect to the trained adapter, over its A
factors and over its B factors, beside the task loss's gradient norms. Setting: the config's
stream (default: the smoke stream, pathology / radiology / pathology) on a seeded random dual
encoder whose towers are ``--width`` wide (so rank 64 is below every layer's size), alpha =
``--scaling`` * rank (1: the paper's rank 64, alpha 64), at the last stage:

- the earlier adapters are "trained-like": their fresh kaiming-uniform A and a random B
  (normal * ``--earlier_b``), so their delta W is nonzero;
- the trained adapter is either ``fresh`` (the stage's initial adapter: kaiming A, B = 0, what
  training starts from) or ``mid`` (that A, B normal * ``--active_b``);
- ``pull``: CR against the earlier task of the same modality alone (``1 - s``); ``push``: against
  the earlier task of the other modality alone (``s``); ``s`` is the similarity, the mean exp(-d);
- the task loss: the experiment's own (CLIP InfoNCE over the backbone and the earlier adapters,
  folded as training folds them) on one training batch of the stage's task.

Also printed: the mean over layers of ``||A_c - A_i||_F`` to the pulled earlier adapter (two
independent kaiming-uniform A's: about sqrt(2r/3)). The loss trains ``alpha_cr`` (0.1) times CR,
so compare 0.1 * the CR norms with the task's.
"""

from __future__ import annotations

import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mslora_jax.config import ExperimentConfig, experiment_config
from mslora_jax.losses.regularizers import (
    CR_DISTANCES,
    adapter_similarities,
    contrastive_regularizer,
)
from mslora_jax.models.lora_dense import LORA_A, LORA_B
from mslora_jax.run.experiment import random_backbone_experiment
from mslora_jax.train.methods import get_method
from mslora_jax.train.stream import stage_context
from mslora_jax.train.stream_experiment import StreamExperiment

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smoke.py", "Experiment config.")
_RANKS = flags.DEFINE_list("ranks", ["4", "16", "64"], "LoRA ranks.")
_WIDTH = flags.DEFINE_integer("width", 256, "Width of both towers (MLPs twice that); 0: config's.")
_SCALING = flags.DEFINE_float("scaling", 1.0, "alpha / rank.")
_EARLIER_B = flags.DEFINE_float("earlier_b", 0.01, "Std of the earlier adapters' B.")
_ACTIVE_B = flags.DEFINE_float("active_b", 0.01, "Std of the mid-training adapter's B.")


def with_rank(config: ExperimentConfig, rank: int, scaling: float, width: int) -> ExperimentConfig:
    """``config`` at LoRA ``rank`` (alpha = scaling * rank), towers ``width`` wide if > 0."""
    lora = dataclasses.replace(config.lora, rank=rank, alpha=scaling * rank)
    model = config.model
    if width:
        model = dataclasses.replace(
            model, width=width, text_width=width, mlp_dim=2 * width, text_mlp_dim=2 * width
        )
    return dataclasses.replace(config, lora=lora, model=model, progress=False)


def with_random_b(adapter: dict, key: jax.Array, std: float) -> dict:
    """``adapter`` with every B drawn from normal * ``std`` (A unchanged)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapter)
    keys = jax.random.split(key, len(leaves))
    new = [
        std * jax.random.normal(k, x.shape, x.dtype) if path[-1].key == LORA_B else x
        for (path, x), k in zip(leaves, keys)
    ]
    return tree.unflatten(new)


def factor_norms(grads: dict) -> tuple[float, float]:
    """(norm over every A, norm over every B) of a gradient of the adapter tree."""
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    sq = {
        name: sum(float(jnp.sum(x**2)) for p, x in leaves if p[-1].key == name)
        for name in (LORA_A, LORA_B)
    }
    return float(np.sqrt(sq[LORA_A])), float(np.sqrt(sq[LORA_B]))


def mean_a_distance(active: dict, other: dict) -> float:
    """Mean over the adapted layers of ``||A_active - A_other||_F``."""
    leaves = jax.tree_util.tree_leaves_with_path(jax.tree.map(lambda x, y: x - y, active, other))
    norms = [float(jnp.linalg.norm(x)) for p, x in leaves if p[-1].key == LORA_A]
    return float(np.mean(norms))


def stage_setting(exp: StreamExperiment) -> tuple[int, int, int, dict]:
    """(stage, same-modality earlier slot, other-modality earlier slot, earlier adapters)."""
    tasks = exp.tasks
    for stage in range(len(tasks)):
        earlier = range(stage)
        same = [i for i in earlier if tasks[i].modality == tasks[stage].modality]
        other = [i for i in earlier if tasks[i].modality != tasks[stage].modality]
        if same and other:
            slots = {
                i: with_random_b(
                    exp.fresh_adapter(i), jax.random.PRNGKey(100 + i), _EARLIER_B.value
                )
                for i in earlier
            }
            return stage, same[-1], other[-1], slots
    raise ValueError("the stream needs a task preceded by tasks of its own and another modality")


def rank_rows(config: ExperimentConfig, rank: int, workdir: str) -> list[list[str]]:
    config = with_rank(config, rank, _SCALING.value, _WIDTH.value)
    exp = random_backbone_experiment(config, workdir)
    stage, same_slot, other_slot, slots = stage_setting(exp)
    method = get_method("mslora_cr")
    context = stage_context(exp, method, stage, slots, [stage])
    # The task loss alone: both regularizer weights 0.
    task_context = context.replace(alpha_cr=jnp.float32(0.0), beta_ortho=jnp.float32(0.0))
    batch = next(iter(exp.train_batches([stage], 1, seed=0)))
    task_grad = jax.jit(
        jax.grad(lambda t: exp.loss_fn(t, task_context, batch, jax.random.PRNGKey(0))[0])
    )
    fresh = exp.fresh_adapter(stage)
    actives = {"fresh": fresh, "mid": with_random_b(fresh, jax.random.PRNGKey(7), _ACTIVE_B.value)}
    slot_range = jnp.arange(exp.num_tasks)
    pulled = jax.tree.map(lambda x: x[same_slot], context.lora_stack)
    rows = []
    for name, active in actives.items():
        task_a, task_b = factor_norms(task_grad({"lora": active})["lora"])
        d_a = mean_a_distance(active, pulled)
        for distance in CR_DISTANCES:
            row = [str(rank), name, f"{d_a:.2f}", f"{task_a:.2e}", f"{task_b:.2e}", distance]
            for slot in (same_slot, other_slot):
                mask = slot_range == slot
                grad = jax.grad(contrastive_regularizer)(
                    active, context.lora_stack, mask, context.same_modality, distance, exp.scaling
                )
                s = adapter_similarities(active, context.lora_stack, distance, exp.scaling)[slot]
                cr_a, cr_b = factor_norms(grad)
                row += [f"{float(s):.3g}", f"{cr_a:.2e}", f"{cr_b:.2e}"]
            rows.append(row)
    return rows


def main(argv):
    del argv
    config = experiment_config(_CONFIG.value)
    header = [
        "rank",
        "active",
        "mean ‖A_c − A_i‖",
        "‖∇A task‖",
        "‖∇B task‖",
        "cr_distance",
        "s pull",
        "‖∇A CR‖ pull",
        "‖∇B CR‖ pull",
        "s push",
        "‖∇A CR‖ push",
        "‖∇B CR‖ push",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as workdir:
        for rank in map(int, _RANKS.value):
            for row in rank_rows(config, rank, workdir):
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    app.run(main)
