"""One train step for any objective: ``train_step(state, context, batch) -> (state, metrics)``.

``state`` holds only what is trained (and its optimizer state); ``context`` holds everything the
loss reads but never updates (frozen backbone, earlier adapters, masks, schedule). Gradients are
taken with respect to ``state.trainable`` alone, so frozen parameters get neither gradients nor
optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mslora_jax.train.optim import scale_by_lr

# loss_fn(trainable, context, batch, rng) -> (loss, metrics)
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


def init_train_state(trainable, optimizer: optax.GradientTransformation, rng) -> TrainState:
    return TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        rng=rng,
    )


def micro_batches(batch: dict, count: int) -> dict:
    """``[B, ...]`` leaves -> ``[count, B / count, ...]``.

    Micro-batch j holds rows j, j + count, j + 2 count, ...: a batch sharded over devices along
    B then gives every device an equal share of every micro-batch.
    """

    def split(x):
        return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def accumulated_grads(loss_fn: LossFn, trainable, context, batch: dict, rng, count: int):
    """``((loss, metrics), grads)`` averaged over ``count`` micro-batches (``lax.scan``: the
    activations of one micro-batch at a time)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(grad_sum, inputs):
        micro, key = inputs
        (loss, metrics), grads = grad_fn(trainable, context, micro, key)
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    keys = jax.random.split(rng, count)
    grad_sum, (losses, metrics) = jax.lax.scan(body, zeros, (micro_batches(batch, count), keys))
    mean = lambda x: jnp.mean(x, axis=0)
    grads = jax.tree.map(lambda g: g / count, grad_sum)
    return (mean(losses), jax.tree.map(mean, metrics)), grads


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    grad_accum_steps: int = 1,
    micro_batch_size: int = 0,
):
    """The (un-jitted) train step; ``context.schedule(step)`` gives the learning rate.

    ``grad_accum_steps > 1`` averages the gradients of that many micro-batches of each batch
    (see ``accumulated_grads``) before the one optimizer update; ``micro_batch_size > 0``
    instead splits each batch into micro-batches of that many rows (the count follows the
    batch's shape, so batches of different sizes share the code).
    """

    def train_step(state: TrainState, context, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        count = grad_accum_steps
        if micro_batch_size:
            count = jax.tree.leaves(batch)[0].shape[0] // micro_batch_size
        if count == 1:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, metrics), grads = grad_fn(state.trainable, context, batch, step_rng)
        else:
            (loss, metrics), grads = accumulated_grads(
                loss_fn, state.trainable, context, batch, step_rng, count
            )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        lr = context.schedule(state.step)
        trainable = optax.apply_updates(state.trainable, scale_by_lr(updates, lr))
        new_state = TrainState(state.step + 1, trainable, opt_state, rng)
        metrics = {**metrics, "loss": loss, "lr": lr, "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    return train_step
