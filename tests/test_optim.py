"""The data-driven schedule equals optax's warmup-cosine schedule."""

import jax.numpy as jnp
import numpy as np
import optax

from mslora_jax.train.optim import Schedule


def test_schedule_matches_optax():
    total, ratio, peak = 200, 0.03, 2e-4
    ours = Schedule.create(peak, total, ratio)
    ref = optax.warmup_cosine_decay_schedule(0.0, peak, int(ours.warmup_steps), total, 0.0)
    for step in [0, 1, 3, 6, 7, 50, 100, 199, 200]:
        np.testing.assert_allclose(ours(jnp.int32(step)), ref(step), rtol=1e-5, atol=1e-12)
