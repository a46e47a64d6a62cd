"""A train step with a momentum (EMA) teacher, as STML and MS-UGCML train: the teacher is a
moving average of the trainable leaves only (the LoRA adapter and the heads; the frozen
backbone is shared, never copied), read by the loss without gradients, updated after each step.

``EmaState`` wraps the shared trainer's ``TrainState`` (``train.step``) with the teacher, and the
step is the shared one (``make_train_step``: gradients of the trainable part only, gradient
accumulation, the context's schedule) followed by ``teacher <- m * teacher + (1 - m) * student``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import optax

from mslora_jax.train.step import TrainState, init_train_state, make_train_step

MOMENTUM = 0.999

# loss_fn(trainable, teacher, context, batch, rng) -> (loss, metrics)
TeacherLossFn = Callable[[Any, Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class EmaState:
    train: TrainState
    teacher: Any


def init_ema_state(trainable, optimizer: optax.GradientTransformation, rng) -> EmaState:
    """The student's train state, and a teacher starting as the student."""
    teacher = jax.tree.map(lambda x: x, trainable)  # its own tree (arrays are immutable)
    return EmaState(init_train_state(trainable, optimizer, rng), teacher)


def ema(teacher, student, momentum: float):
    """``momentum * teacher + (1 - momentum) * student``, leaf by leaf."""
    return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher, student)


def make_ema_step(
    loss_fn: TeacherLossFn,
    optimizer: optax.GradientTransformation,
    momentum: float = MOMENTUM,
    grad_accum_steps: int = 1,
):
    """``step(state, context, batch) -> (state, metrics)``; the teacher gets no gradient."""

    def step(state: EmaState, context, batch: dict):
        teacher = jax.lax.stop_gradient(state.teacher)
        student_loss = lambda trainable, ctx, b, rng: loss_fn(trainable, teacher, ctx, b, rng)
        inner = make_train_step(student_loss, optimizer, grad_accum_steps)
        train, metrics = inner(state.train, context, batch)
        return EmaState(train, ema(state.teacher, train.trainable, momentum)), metrics

    return step
