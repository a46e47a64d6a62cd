"""The adapter objective every model family trains: its task loss plus the MSLoRA-CR
regularizers (paper: total = task + alpha_cr * CR + beta_ortho * ortho) and, for a baseline, its
extra term.

A family supplies only ``task_loss`` (and, for LwF/Mod-X, ``distill``); the regularizers see
adapter trees alone.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from mslora_jax.losses.continual import ewc_penalty, olora_penalty
from mslora_jax.losses.regularizers import (
    CR_DISTANCES,
    contrastive_regularizer,
    orthogonality_with_active,
)
from mslora_jax.models.lora_dense import LORA_A, LORA_ACTIVE, LORA_COLLECTION, LORA_WEIGHT
from mslora_jax.train.optim import Schedule


@flax.struct.dataclass
class AdapterContext:
    """What the adapter loss reads but does not train. Masks are ``[T]`` over adapter slots."""

    # The frozen backbone as the forward sees it: with the stage's frozen adapters' weighted
    # deltas merged into their kernels when the loss folds them (``folded=True``).
    base_params: dict
    lora_stack: dict  # every slot's adapter params, stacked; the regularizers read it
    frozen_ortho: jax.Array  # [T] each slot's orthogonality terms, fixed for the stage
    active_slot: jax.Array  # int32 scalar
    forward_weights: jax.Array  # [T] task mask * (alpha / rank): which adapters the forward sums
    earlier_mask: jax.Array  # [T] bool: slots the CR loss compares against
    same_modality: jax.Array  # [T] bool: pull (True) or push (False)
    ortho_mask: jax.Array  # [T] bool: slots whose (A, B) enter the orthogonality loss
    alpha_cr: jax.Array  # f32 weight (0 disables); multiplies exp(w) when weights are learned
    beta_ortho: jax.Array
    class_tokens: jax.Array | None  # [C, L] class prompts (dual encoder); None otherwise
    schedule: Schedule
    # A baseline's term (``Method.term``; None for the paper's methods): its weight (0 where
    # there is nothing to compare with yet), O-LoRA's [T] earlier slots, the adapter as the
    # stage began (EWC's theta*, LwF's and Mod-X's previous model), EWC's diagonal Fisher (a
    # tree like the adapter) and LwF's current-task class prompts ([C_max, L] and [C_max] valid).
    term_weight: jax.Array | None = None
    term_mask: jax.Array | None = None
    anchor: dict | None = None
    fisher: dict | None = None
    task_tokens: jax.Array | None = None
    task_valid: jax.Array | None = None


def with_layer_weight(adapter: dict, weight: jax.Array) -> dict:
    """The ``lora_active`` collection: each adapted layer's ``{lora_a, lora_b}`` plus ``weight``
    (its forward weight, task mask times alpha / rank), with the factors' leading axes (a
    scanned decoder's layer axis, which ``nn.scan`` slices every variable along)."""
    if LORA_A in adapter:
        lead = adapter[LORA_A].shape[:-2]
        return {**adapter, LORA_WEIGHT: jnp.broadcast_to(weight, lead)}
    return {k: with_layer_weight(v, weight) for k, v in adapter.items()}


# task_loss(variables, trainable, context, batch, rng) -> scalar; ``variables`` holds the frozen
# backbone ("params"), the frozen adapter stack ("lora") and the trained adapter ("lora_active");
# ``context.forward_weights`` there weighs the stack's slots (the trained slot's weight is 0).
TaskLossFn = Callable[[dict, dict, "AdapterContext", dict, jax.Array], jax.Array]
# distill(variables, teacher_variables, trainable, context, batch) -> scalar: LwF's or Mod-X's
# term between the trained model (``variables``) and the stage's starting one (``teacher_...``).
DistillFn = Callable[[dict, dict, dict, "AdapterContext", dict], jax.Array]
TERMS = ("olora", "ewc", "lwf", "modx")


def regularized_adapter_loss(
    task_loss: TaskLossFn,
    folded: bool = False,
    cr_distance: str = "released",
    scaling: float = 1.0,
    term: str | None = None,
    distill: DistillFn | None = None,
):
    """Loss of the active task's adapter: ``task + w_cr * CR + w_ortho * ortho`` (plus, for a
    baseline, ``context.term_weight * term``).

    ``trainable`` is ``{"lora": params}`` plus, when learned, ``logit_scale``, ``log_alpha_cr``
    and ``log_beta_ortho``. Any model plugs in through ``task_loss``; the regularizers only see
    adapter trees.

    ``folded``: ``context.base_params`` already holds the frozen slots' weighted deltas (see
    ``StreamExperiment.inference_params``), so the forward is the backbone plus one low-rank
    product per layer, whatever the number of tasks; otherwise it sums the ``[T, ...]`` stack.

    ``cr_distance`` (``regularizer.cr_distance``) and ``scaling`` (alpha / rank, read by
    ``delta_w``) choose the CR distance; Python values, not context fields, because the
    distance picks the program (see ``losses.regularizers.adapter_similarities``).

    ``term`` (``Method.term``): a baseline's extra term, in the program only when asked for, so
    the paper's methods compile what they did before. ``lwf`` and ``modx`` read the model's
    outputs through ``distill``; the teacher is the forward with ``context.anchor`` in place of
    the trained adapter (under stop-gradient).
    """
    if cr_distance not in CR_DISTANCES:
        raise ValueError(f"unknown CR distance {cr_distance!r}; expected one of {CR_DISTANCES}")
    if term is not None and term not in TERMS:
        raise ValueError(f"unknown baseline term {term!r}; expected one of {TERMS}")
    if term in ("lwf", "modx") and distill is None:
        raise ValueError(f"the {term!r} term needs the model's distillation function")

    def loss_fn(trainable, context: AdapterContext, batch, rng):
        active = trainable["lora"]
        # The forward sums the frozen slots (no gradient, the active slot's weight set to 0),
        # merged or stacked, plus the trainable adapter as its own low-rank product: the same
        # model as inserting it into its slot, but the backward pass never forms a [T, ...]
        # stack gradient.
        frozen = jax.lax.stop_gradient(context.lora_stack)
        weight = context.forward_weights[context.active_slot]
        variables = {
            "params": context.base_params,
            LORA_ACTIVE: with_layer_weight(active, weight),
        }
        if not folded:
            variables[LORA_COLLECTION] = frozen
        forward = context.replace(
            forward_weights=context.forward_weights.at[context.active_slot].set(0.0)
        )
        task = task_loss(variables, trainable, forward, batch, rng)
        cr = contrastive_regularizer(
            active,
            context.lora_stack,
            context.earlier_mask,
            context.same_modality,
            cr_distance,
            scaling,
        )
        ortho = orthogonality_with_active(
            context.frozen_ortho, active, context.ortho_mask, context.active_slot
        )
        w_cr = context.alpha_cr * jnp.exp(trainable.get("log_alpha_cr", 0.0))
        w_ortho = context.beta_ortho * jnp.exp(trainable.get("log_beta_ortho", 0.0))
        total = task + w_cr * cr + w_ortho * ortho
        metrics = {"task_loss": task, "cr": cr, "ortho": ortho}
        if term is None:
            return total, metrics
        if term == "olora":
            extra = olora_penalty(active, context.lora_stack, context.term_mask)
        elif term == "ewc":
            extra = ewc_penalty(active, context.anchor, context.fisher)
        else:
            teacher = jax.lax.stop_gradient(context.anchor)
            teacher_vars = {**variables, LORA_ACTIVE: with_layer_weight(teacher, weight)}
            extra = distill(variables, teacher_vars, trainable, forward, batch)
        return total + context.term_weight * extra, {**metrics, term: extra}

    return loss_fn
