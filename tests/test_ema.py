"""The EMA-teacher step: the student steps as the shared step does, the teacher follows the
moving average and receives no gradient."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mslora_jax.objects.ema import init_ema_state, make_ema_step
from mslora_jax.train.step import init_train_state, make_train_step


@flax.struct.dataclass
class Context:
    target: jax.Array

    def schedule(self, step):
        return jnp.float32(0.1)


def test_the_teacher_is_the_moving_average_of_the_student():
    optimizer = optax.sgd(1.0)

    def loss_fn(trainable, teacher, context, batch, rng):
        del rng
        # The teacher pulls the student (a pseudo-label); it must not be trained through.
        loss = jnp.sum((trainable["w"] - context.target) ** 2) + jnp.sum(
            (trainable["w"] - teacher["w"]) ** 2
        )
        return loss, {}

    start = {"w": jnp.array([1.0, -2.0])}
    context = Context(jnp.array([0.5, 0.5]))
    state = init_ema_state(start, optimizer, jax.random.PRNGKey(0))
    step = jax.jit(make_ema_step(loss_fn, optimizer, momentum=0.9))
    # Reference: the shared step with the teacher held fixed, then the average by hand.
    teacher = np.array([1.0, -2.0])
    student = init_train_state(start, optimizer, jax.random.PRNGKey(0))
    for _ in range(3):
        fixed = {"w": jnp.asarray(teacher, jnp.float32)}
        reference = make_train_step(
            lambda tr, ctx, b, r, fixed=fixed: loss_fn(tr, fixed, ctx, b, r), optimizer
        )
        student, _ = reference(student, context, {})
        teacher = 0.9 * teacher + 0.1 * np.asarray(student.trainable["w"])
        state, _ = step(state, context, {})
        np.testing.assert_allclose(state.train.trainable["w"], student.trainable["w"], rtol=1e-6)
        np.testing.assert_allclose(state.teacher["w"], teacher, rtol=1e-6)
    assert int(state.train.step) == 3
