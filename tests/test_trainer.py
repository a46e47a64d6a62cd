"""The trainer: only the active adapter learns, a new task is learned, one compilation serves all.

Sharded steps against the single-device step: tests/test_sharding.py.
"""

import chex
import jax
import numpy as np

from mslora_jax.data.pipeline import train_batches
from mslora_jax.data.registry import union_train_split
from mslora_jax.parallel.mesh import replicate, to_global_batch
from mslora_jax.train.methods import get_method
from mslora_jax.train.step import init_train_state
from mslora_jax.train.stream import initial_trainable, run_method, stage_context, train_stage
from tests.helpers import random_backbone_experiment


def _random_earlier_adapter(exp, seed):
    return jax.tree.map(
        lambda x: jax.random.normal(jax.random.PRNGKey(seed), x.shape) * 0.1, exp.fresh_adapter(0)
    )


def test_only_the_active_adapter_changes_and_has_optimizer_state():
    exp = random_backbone_experiment(**{"train.learn_temperature": False})
    method = get_method("mslora_cr_ortho")
    earlier = {0: _random_earlier_adapter(exp, 1)}
    before_base = jax.tree.map(np.array, exp.base_params)
    before_earlier = jax.tree.map(np.array, earlier)
    context = replicate(exp.mesh, stage_context(exp, method, 1, earlier, [1]))
    state = replicate(
        exp.mesh,
        init_train_state(
            initial_trainable(exp, method, exp.fresh_adapter(1)),
            exp.optimizer,
            jax.random.PRNGKey(0),
        ),
    )
    start_active = jax.tree.map(np.array, state.trainable["lora"])
    assert set(state.trainable) == {"lora"}
    # Optimizer state mirrors the trainable tree only: no moments for frozen leaves.
    adam_state = state.opt_state[0]
    chex.assert_trees_all_equal_structs(adam_state.mu, state.trainable)
    assert sum(x.size for x in jax.tree.leaves(adam_state.mu)) == sum(
        x.size for x in jax.tree.leaves(state.trainable)
    )
    images, labels = union_train_split(exp.tasks, exp.table, [1])
    batches = train_batches(images, labels, batch_size=32, num_steps=3, seed=0)
    for batch in batches:
        state, metrics = exp.train_step(state, context, to_global_batch(exp.mesh, batch))
        # After every step: backbone and the earlier adapter (as the loss sees them) unchanged.
        chex.assert_trees_all_equal(jax.tree.map(np.array, context.base_params), before_base)
        chex.assert_trees_all_equal(
            jax.tree.map(lambda x: np.array(x[0]), context.lora_stack), before_earlier[0]
        )
        assert np.isfinite(metrics["loss"]) and float(metrics["cr"]) > 0
    chex.assert_trees_all_equal(jax.tree.map(np.array, exp.base_params), before_base)
    moved = jax.tree.map(
        lambda a, b: np.abs(np.asarray(a) - b).max(), state.trainable["lora"], start_active
    )
    assert max(jax.tree.leaves(moved)) > 0


def test_learned_weights_and_temperature_join_the_trainable_partition():
    exp = random_backbone_experiment(
        **{"train.learn_temperature": True, "regularizer.learn_weights": True}
    )
    trainable = initial_trainable(exp, get_method("mslora_cr_ortho"), exp.fresh_adapter(0))
    assert set(trainable) == {"lora", "logit_scale", "log_alpha_cr", "log_beta_ortho"}
    np.testing.assert_allclose(trainable["log_alpha_cr"], -4.6)
    assert set(initial_trainable(exp, get_method("mslora"), exp.fresh_adapter(0))) == {
        "lora",
        "logit_scale",
    }


def test_two_stage_run_learns_the_new_task():
    exp = random_backbone_experiment(**{"train.steps_per_task": 60, "train.learning_rate": 3e-3})
    exp.tasks, exp.table = exp.tasks[:2], exp.table  # two stages: path_a then rad_a
    chance = 1 / exp.tasks[1].num_classes
    before = exp.accuracy({}, [], 1)
    outcome = run_method(exp, get_method("mslora_cr"), None, {})
    summary, slots = outcome.summary, outcome.adapters
    after = summary["acc_matrix"][1][1]
    assert after > chance + 0.2 and after > before + 0.15, (before, after)
    assert set(slots) == {0, 1}


def test_one_compilation_serves_every_stage_and_method():
    exp = random_backbone_experiment(**{"train.steps_per_task": 2})
    for name in ("seq", "mslora_cr_ortho", "joint"):
        method = get_method(name)
        slots = {}
        for stage in range(method.num_stages(exp.num_tasks)):
            state, _ = train_stage(exp, method, stage, slots)
            slots[method.slot(stage)] = state.trainable["lora"]
    assert exp.train_step._cache_size() == 1


def test_trained_adapter_outside_the_stack_equals_inserting_it():
    """The loss (frozen stack + the trained adapter as its own product) equals the loss of the
    stack with the adapter inserted into its slot, in value and gradients."""
    import jax.numpy as jnp

    from mslora_jax.lora.adapter import insert_params
    from mslora_jax.losses.contrastive import clip_loss
    from mslora_jax.losses.regularizers import (
        contrastive_regularizer,
        orthogonality_regularizer,
    )
    from mslora_jax.train.objectives import adapter_loss, clip_task_loss

    exp = random_backbone_experiment(**{"train.learn_temperature": False})
    method = get_method("seq")  # one slot, trained again: its old value sits in the stack
    slots = {0: _random_earlier_adapter(exp, 1)}
    context = stage_context(exp, method, 1, slots, [1])
    context = context.replace(
        alpha_cr=jnp.float32(0.1),
        beta_ortho=jnp.float32(0.01),
        ortho_mask=jnp.asarray([True, True, False]),
        earlier_mask=jnp.asarray([False, True, False]),
        forward_weights=jnp.asarray([2.0, 0.5, 0.0]),
    )
    context = context.replace(lora_stack=exp.stack({**slots, 1: _random_earlier_adapter(exp, 2)}))
    trainable = {"lora": jax.tree.map(lambda x: x + 0.03, _random_earlier_adapter(exp, 3))}
    images, labels = union_train_split(exp.tasks, exp.table, [1])
    batch = next(train_batches(images, labels, batch_size=32, num_steps=1, seed=3))
    task_loss = clip_task_loss(exp.model, clip_loss)

    def inserted(trainable):  # the formulation before the split, written out
        stack = insert_params(context.lora_stack, trainable["lora"], context.active_slot)
        variables = {"params": context.base_params, "lora": stack}
        task = task_loss(variables, trainable, context, batch, jax.random.PRNGKey(0))
        cr = contrastive_regularizer(
            trainable["lora"], context.lora_stack, context.earlier_mask, context.same_modality
        )
        ortho = orthogonality_regularizer(stack, context.ortho_mask)
        return task + 0.1 * cr + 0.01 * ortho

    split = lambda t: adapter_loss(exp.model, clip_loss)(t, context, batch, jax.random.PRNGKey(0))[
        0
    ]
    assert int(context.active_slot) == 0
    value, grads = jax.value_and_grad(split)(trainable)
    ref_value, ref_grads = jax.value_and_grad(inserted)(trainable)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
