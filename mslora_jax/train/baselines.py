"""What the baselines' loss terms read each stage (``Method.term``), and EWC's Fisher.

Every input is recomputed from the adapters a stage starts with, so a resumed run needs no
checkpoint items beyond the paper methods' own: the anchor is the stage's starting adapter and
EWC's Fisher of each earlier task is re-estimated, deterministically, from that task's saved
adapter (``run_method`` restores finished stages in order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mslora_jax.parallel.mesh import to_global_batch
from mslora_jax.parallel.sharded_jit import sharding_context


def term_weight(config, term: str, stage: int) -> float:
    """The weight of ``term`` at ``stage`` (``regularizer.*_lambda``): 0 at the first stage,
    which has no earlier task to keep."""
    return 0.0 if stage == 0 else getattr(config.regularizer, f"{term}_lambda")


def term_fields(exp, method, stage: int, slots: dict, start: dict, fisher: dict | None) -> dict:
    """The ``AdapterContext`` fields of ``method``'s term (``{}`` for the paper's methods).

    ``start``: the adapter the stage starts from (EWC's theta*, the teacher of LwF / Mod-X);
    ``fisher``: EWC's accumulated Fisher of the earlier tasks (None: zeros, the first stage).
    """
    if method.term is None:
        return {}
    fields = {"term_weight": jnp.float32(term_weight(exp.config, method.term, stage))}
    if method.term == "olora":
        fields["term_mask"] = exp.mask(method.olora_slots(stage))
    else:
        fields["anchor"] = start
    if method.term == "ewc":
        fields["fisher"] = fisher if fisher is not None else jax.tree.map(jnp.zeros_like, start)
    if method.term == "lwf":
        fields.update(exp.distill_inputs(stage))
    return fields


def _fisher_step(loss_fn):
    """``(sum, trainable, context, batch, rng) -> sum + g^2``, g the task loss's gradient with
    respect to the adapter on one batch."""

    def step(total, trainable, context, batch, rng):
        task = lambda t: loss_fn(t, context, batch, rng)[1]["task_loss"]
        grads = jax.grad(task)(trainable)["lora"]
        return jax.tree.map(lambda s, g: s + jnp.square(g), total, grads)

    return jax.jit(step, donate_argnums=(0,))


def diagonal_fisher(exp, trainable: dict, context, batches) -> dict:
    """EWC's diagonal Fisher at ``trainable``: the mean over ``batches`` of the squared
    gradient of the batch's task loss (``exp.loss_fn``'s ``task_loss``) per adapter entry."""
    if exp._fisher_fn is None:
        exp._fisher_fn = _fisher_step(exp.loss_fn)
    context = exp.rules.place(context)
    total = jax.tree.map(jnp.zeros_like, trainable["lora"])
    count = 0
    with sharding_context(exp.rules):
        for batch in batches:
            rng = jax.random.PRNGKey(count)
            total = exp._fisher_fn(total, trainable, context, to_global_batch(exp.mesh, batch), rng)
            count += 1
    return jax.tree.map(lambda s: s / count, total)


def add_fisher(total: dict | None, new: dict) -> dict:
    """EWC's Fisher over the tasks so far: the sum of each task's (a single penalty anchored at
    the latest adapter, as online EWC with gamma = 1)."""
    return new if total is None else jax.tree.map(jnp.add, total, new)
