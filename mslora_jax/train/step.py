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


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation):
    """The (un-jitted) train step; ``context.schedule(step)`` gives the learning rate."""

    def train_step(state: TrainState, context, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(state.trainable, context, batch, step_rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        lr = context.schedule(state.step)
        trainable = optax.apply_updates(state.trainable, scale_by_lr(updates, lr))
        new_state = TrainState(state.step + 1, trainable, opt_state, rng)
        return new_state, {**metrics, "loss": loss, "lr": lr}

    return train_step
