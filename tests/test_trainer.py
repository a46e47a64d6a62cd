"""The trainer: only the active adapter learns, a new task is learned, one compilation serves all.

Sharded steps against the single-device step: tests/test_sharding.py.
"""

import chex
import jax
import numpy as np

from mslora_jax.data.pipeline import train_batches
from mslora_jax.data.registry import union_train_split
from mslora_jax.lora.adapter import LoraAdapter
from mslora_jax.lora.merge import merge
from mslora_jax.train.methods import get_method
from mslora_jax.train.stream import evaluate_row, run_method, stage_context, train_stage
from mslora_jax.train.stream_experiment import initial_trainable
from tests.helpers import random_backbone_experiment


def _random_earlier_adapter(exp, seed):
    return jax.tree.map(
        lambda x: jax.random.normal(jax.random.PRNGKey(seed), x.shape) * 0.1, exp.fresh_adapter(0)
    )


def test_only_the_active_adapter_changes_and_has_optimizer_state():
    """What a stage returns and keeps: a new active adapter with optimizer state for it alone;
    the backbone and every earlier adapter bit-identical (and still readable: the step donates
    its state, which for ``seq`` starts from the saved slot); the forward's frozen term is the
    earlier adapter's delta (checked against ``lora.merge``, written independently)."""
    exp = random_backbone_experiment(
        **{"train.learn_temperature": False, "train.steps_per_task": 3}
    )
    assert exp.fold_frozen  # float32 kernels: frozen adapters merged per stage
    before_base = jax.tree.map(np.array, exp.base_params)
    for name in ("mslora_cr_ortho", "seq"):
        method = get_method(name)
        earlier = {0: _random_earlier_adapter(exp, 1)}
        before_earlier = jax.tree.map(np.array, earlier)
        start = exp.fresh_adapter(1) if method.per_task_adapters else earlier[0]
        start = jax.tree.map(np.array, start)
        state, info = train_stage(exp, method, 1, earlier)
        assert set(state.trainable) == {"lora"}
        # Optimizer state mirrors the trainable tree only: no moments for frozen leaves.
        adam_state = state.opt_state[0]
        chex.assert_trees_all_equal_structs(adam_state.mu, state.trainable)
        assert np.isfinite(info["final"]["loss"])
        chex.assert_trees_all_equal(jax.tree.map(np.array, earlier), before_earlier)
        chex.assert_trees_all_equal(jax.tree.map(np.array, exp.base_params), before_base)
        moved = jax.tree.map(
            lambda a, b: np.abs(np.asarray(a) - b).max(), state.trainable["lora"], start
        )
        assert max(jax.tree.leaves(moved)) > 0
    # The frozen term of stage 1 of mslora: adapter 0 merged with its scaling, nothing else.
    context = stage_context(exp, get_method("mslora"), 1, earlier, [1])
    adapter = LoraAdapter(earlier[0], exp.config.lora.rank, exp.config.lora.alpha, "x", "x")
    expected = merge(exp.base_params, [adapter])
    chex.assert_trees_all_close(context.base_params, expected, rtol=1e-6, atol=1e-6)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(context.base_params), jax.tree.leaves(before_base))
    )
    # each: no frozen adapter enters the forward, so the backbone is passed as it is.
    context = stage_context(exp, get_method("each"), 1, earlier, [1])
    assert context.base_params is exp.base_params


def test_folded_stage_equals_the_stacked_forward():
    """Merging the frozen adapters into the kernels (``lora.fold_frozen=merge``) gives the loss
    and gradients of summing the stack in every layer (``stack``)."""
    from mslora_jax.families.dual_encoder.objectives import adapter_loss
    from mslora_jax.losses.contrastive import clip_loss

    folded = random_backbone_experiment(**{"train.learn_temperature": False})
    stacked = random_backbone_experiment(
        **{"train.learn_temperature": False, "lora.fold_frozen": "stack"}
    )
    assert folded.fold_frozen and not stacked.fold_frozen
    method = get_method("mslora_cr_ortho")
    slots = {0: _random_earlier_adapter(folded, 1), 1: _random_earlier_adapter(folded, 2)}
    trainable = {"lora": jax.tree.map(lambda x: x * 0.5, _random_earlier_adapter(folded, 3))}
    images, labels = union_train_split(folded.tasks, folded.table, [2])
    batch = next(train_batches(images, labels, batch_size=32, num_steps=1, seed=3))
    values = []
    for exp in (folded, stacked):
        context = stage_context(exp, method, 2, slots, [2])
        loss = adapter_loss(exp.model, clip_loss, folded=exp.fold_frozen)
        fn = lambda t, context=context, loss=loss: loss(t, context, batch, jax.random.PRNGKey(0))
        values.append(jax.value_and_grad(fn, has_aux=True)(trainable))
    ((loss_f, metrics_f), grads_f), ((loss_s, metrics_s), grads_s) = values
    np.testing.assert_allclose(loss_f, loss_s, rtol=1e-5)
    np.testing.assert_allclose(metrics_f["cr"], metrics_s["cr"], rtol=1e-6)
    chex.assert_trees_all_close(grads_f, grads_s, rtol=1e-4, atol=1e-6)
    # Evaluation merges too: its accuracy equals the stacked forward's.
    from mslora_jax.eval.evaluate import evaluate_accuracy

    tokens, valid = folded.table.task_tokens(1, folded.max_classes)
    data = folded.tasks[1]
    args = (data.test_images, data.test_labels, tokens, valid, folded.eval_batch_size)
    weights = folded.weights([0, 1])
    merged_params = folded.inference_params(slots, [0, 1])
    merged = evaluate_accuracy(folded.predict_fn, folded.mesh, merged_params, None, weights, *args)
    stack = folded.stack(slots)
    summed = evaluate_accuracy(
        folded.predict_fn, folded.mesh, folded.base_params, stack, weights, *args
    )
    assert merged == summed


def test_cr_distance_reaches_the_train_loss():
    """``regularizer.cr_distance`` picks the CR the experiment's loss computes (with s = alpha /
    rank for ``delta_w``); the default stays the released one."""
    from mslora_jax.losses.regularizers import contrastive_regularizer

    method = get_method("mslora_cr")
    values = {}
    for distance in ("released", "delta_w"):
        exp = random_backbone_experiment(
            **{"train.learn_temperature": False, "regularizer.cr_distance": distance}
        )
        slots = {0: _random_earlier_adapter(exp, 1)}
        context = stage_context(exp, method, 1, slots, [1])
        trainable = {"lora": jax.tree.map(lambda x: x * 0.5, _random_earlier_adapter(exp, 3))}
        images, labels = union_train_split(exp.tasks, exp.table, [1])
        batch = next(train_batches(images, labels, batch_size=32, num_steps=1, seed=3))
        _, metrics = exp.loss_fn(trainable, context, batch, jax.random.PRNGKey(0))
        expected = contrastive_regularizer(
            trainable["lora"],
            context.lora_stack,
            context.earlier_mask,
            context.same_modality,
            distance,
            exp.scaling,
        )
        assert bool(context.earlier_mask[0])
        np.testing.assert_allclose(metrics["cr"], expected, rtol=1e-6)
        values[distance] = float(metrics["cr"])
    assert values["released"] != values["delta_w"]


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


def test_earlier_cells_of_per_task_methods_equal_their_diagonal():
    """The invariant behind not recomputing ``a[i][j]`` (j < i) for per-task methods: evaluated
    afresh with the final adapters, every earlier task's metrics equal those of its own stage."""
    exp = random_backbone_experiment(**{"train.steps_per_task": 4, "train.learning_rate": 3e-3})
    outcomes = {}
    for name in ("each", "mslora_cr"):
        method = get_method(name)
        outcome = outcomes[name] = run_method(exp, method, None, {})
        last = exp.num_tasks - 1
        fresh = evaluate_row(exp, method, last, outcome.adapters)  # no previous row: all anew
        assert fresh == outcome.task_metrics[last]
        for task in range(last):
            assert fresh[task] == outcome.task_metrics[task][task]
    # Given a previous row, per-task methods take their earlier cells from it; seq, whose one
    # adapter keeps training, recomputes them.
    sentinel = [{"accuracy": -1.0}] * exp.num_tasks
    reused = evaluate_row(exp, get_method("each"), 1, outcome.adapters, sentinel)
    assert reused[0] == sentinel[0] and reused[1] != sentinel[1] and reused[2] != sentinel[2]
    # "each" meets task 1 before its adapter exists: the frozen backbone, so no forward transfer.
    assert outcomes["each"].task_metrics[0][1] == exp.task_metrics({}, [], 1)
    # mslora_cr meets it with task 0's adapter already summed in.
    assert outcomes["mslora_cr"].task_metrics[0][1] == exp.task_metrics(outcome.adapters, [0], 1)
    # Stage 0 evaluates its task and the next one (the superdiagonal), nothing further.
    assert evaluate_row(exp, get_method("each"), 0, outcome.adapters)[2] is None
    seq_row = evaluate_row(exp, get_method("seq"), 1, {0: outcome.adapters[0]}, sentinel)
    assert seq_row[0] != sentinel[0] and seq_row[1] != sentinel[1]


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

    from mslora_jax.families.dual_encoder.objectives import adapter_loss, clip_task_loss
    from mslora_jax.lora.adapter import insert_params
    from mslora_jax.losses.contrastive import clip_loss
    from mslora_jax.losses.regularizers import (
        contrastive_regularizer,
        orthogonality_per_slot,
        orthogonality_regularizer,
    )

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
    stack = exp.stack({**slots, 1: _random_earlier_adapter(exp, 2)})
    context = context.replace(lora_stack=stack, frozen_ortho=orthogonality_per_slot(stack))
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
    # float32 sums in another order: on an AMD EPYC one element of ~4e-3 differed by 1.5e-7.
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6)
