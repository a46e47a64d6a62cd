"""Gradient accumulation: micro-batches averaged into one update, also on a sharded batch."""

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mslora_jax.config import experiment_config
from mslora_jax.errors import ConfigError
from mslora_jax.parallel.mesh import make_mesh, to_global_batch
from mslora_jax.train.optim import Schedule, make_optimizer
from mslora_jax.train.step import init_train_state, make_train_step, micro_batches


@flax.struct.dataclass
class _Context:
    schedule: Schedule


def _mean_squared_error(trainable, context, batch, rng):
    """A per-example mean, so equal micro-batches average to the full batch's gradient."""
    del context, rng
    error = batch["x"] @ trainable["w"] + trainable["b"] - batch["y"]
    loss = jnp.mean(jnp.square(error))
    return loss, {"task_loss": loss}


def _batch(size=16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(size, 3)).astype(np.float32),
        "y": rng.normal(size=(size, 2)).astype(np.float32),
    }


def test_micro_batches_interleave_rows():
    batch = {"i": np.arange(8)}
    np.testing.assert_array_equal(micro_batches(batch, 2)["i"], [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_accumulated_step_equals_full_batch_step_also_sharded():
    optimizer = make_optimizer(weight_decay=0.01, grad_clip_norm=1.0)
    trainable = {"w": jnp.ones((3, 2)) * 0.3, "b": jnp.zeros(2)}
    context = _Context(Schedule.create(0.1, total_steps=10, warmup_ratio=0.0))
    state = init_train_state(trainable, optimizer, jax.random.PRNGKey(0))
    batch = _batch()
    full = jax.jit(make_train_step(_mean_squared_error, optimizer))
    accum = jax.jit(make_train_step(_mean_squared_error, optimizer, grad_accum_steps=4))
    want_state, want_metrics = full(state, context, batch)
    for sharded in (False, True):
        data = to_global_batch(make_mesh(8), batch) if sharded else batch
        got_state, got_metrics = accum(state, context, data)
        chex.assert_trees_all_close(got_state.trainable, want_state.trainable, rtol=1e-5)
        np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-5)
    assert int(got_state.step) == 1  # one update per batch, not per micro-batch


def test_grad_accum_steps_must_divide_the_batch():
    stream = [dict(name="t", modality="m")]
    with pytest.raises(
        ConfigError, match=r"train.batch_size=16 is not divisible by train.grad_accum_steps=3"
    ):
        experiment_config(dict(stream=stream, train=dict(batch_size=16, grad_accum_steps=3)))


def test_micro_batch_size_follows_each_batch():
    """``micro_batch_size`` splits batches of any size into micro-batches of that many rows:
    the step equals the full-batch step for batches of 16 and 8 rows (4 and 2 micro-batches)."""
    optimizer = make_optimizer(weight_decay=0.0, grad_clip_norm=1.0)
    trainable = {"w": jnp.ones((3, 2)) * 0.3, "b": jnp.zeros(2)}
    context = _Context(Schedule.create(0.1, total_steps=10, warmup_ratio=0.0))
    state = init_train_state(trainable, optimizer, jax.random.PRNGKey(0))
    full = jax.jit(make_train_step(_mean_squared_error, optimizer))
    micro = jax.jit(make_train_step(_mean_squared_error, optimizer, micro_batch_size=4))
    for rows in (16, 8):
        batch = _batch(rows, seed=rows)
        want_state, _ = full(state, context, batch)
        got_state, _ = micro(state, context, batch)
        chex.assert_trees_all_close(got_state.trainable, want_state.trainable, rtol=1e-5)
    stream = [dict(name="t", modality="m", batch_size=12), dict(name="u", modality="m")]
    random = dict(source="random")
    cfg = experiment_config(
        dict(stream=stream, backbone=random, train=dict(batch_size=16, micro_batch_size=4))
    )
    assert [cfg.train.accum_steps(b) for b in (12, 16)] == [3, 4]
    stream[0]["batch_size"] = 10
    with pytest.raises(ConfigError, match=r"task 't': batch_size=10 is not divisible by train"):
        experiment_config(
            dict(stream=stream, backbone=random, train=dict(batch_size=16, micro_batch_size=4))
        )
    with pytest.raises(ConfigError, match="not both"):
        experiment_config(
            dict(stream=stream[1:], train=dict(micro_batch_size=4, grad_accum_steps=2))
        )
