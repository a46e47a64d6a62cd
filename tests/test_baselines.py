"""The continual-learning baselines (olora, ewc, lwf, modx): each loss term against a direct
NumPy formula, each method's loss = its base method's + the term, and a few training steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mslora_jax.config import experiment_config
from mslora_jax.data.pipeline import train_batches
from mslora_jax.data.registry import union_train_split
from mslora_jax.errors import ConfigError
from mslora_jax.losses.continual import (
    distillation_kl,
    ewc_penalty,
    lwf_loss,
    modx_loss,
    olora_penalty,
)
from mslora_jax.run.experiment import fingerprint
from mslora_jax.train.methods import get_method
from mslora_jax.train.stream import stage_context, stage_fisher, train_stage
from tests.helpers import random_backbone_experiment, smoke_dict


def _adapter(rng, lead=(), r=3, d_in=5, d_out=4):
    """A two-layer adapter tree, one layer with ``lead`` extra axes (a scanned layer's)."""
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return {
        "enc": {"q": {"lora_a": f(*lead, r, d_in), "lora_b": f(*lead, d_out, r)}},
        "mlp": {"lora_a": f(r, d_in + 1), "lora_b": f(d_out + 2, r)},
    }


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl_rows(p_logits, q_logits):
    p, q = _softmax(p_logits), _softmax(q_logits)
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def test_olora_penalty_is_the_sum_of_abs_a_c_a_i_t():
    rng = np.random.default_rng(0)
    active = _adapter(rng, lead=(2,))
    slots = [_adapter(rng, lead=(2,)) for _ in range(3)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *slots)
    mask = np.array([True, False, True])
    expected = 0.0
    for i in np.flatnonzero(mask):
        a_c, a_i = active["enc"]["q"]["lora_a"], slots[i]["enc"]["q"]["lora_a"]
        expected += sum(np.abs(a_c[k] @ a_i[k].T).sum() for k in range(2))  # each scanned slice
        expected += np.abs(active["mlp"]["lora_a"] @ slots[i]["mlp"]["lora_a"].T).sum()
    got = olora_penalty(active, stacked, jnp.asarray(mask))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # B factors do not enter; the earlier slots get no gradient.
    grads = jax.grad(olora_penalty, argnums=(0, 1))(active, stacked, jnp.asarray(mask))
    assert not np.any(grads[0]["mlp"]["lora_b"]) and not np.any(grads[1]["mlp"]["lora_a"])


def test_ewc_penalty_is_half_the_fisher_weighted_square_distance():
    rng = np.random.default_rng(1)
    active, anchor = _adapter(rng), _adapter(rng)
    fisher = jax.tree.map(np.abs, _adapter(rng))
    leaves = zip(*(jax.tree.leaves(t) for t in (active, anchor, fisher)), strict=True)
    expected = 0.5 * sum(np.sum(f * (p - a) ** 2) for p, a, f in leaves)
    np.testing.assert_allclose(ewc_penalty(active, anchor, fisher), expected, rtol=1e-5)


def test_lwf_loss_is_the_tempered_kl_over_valid_classes():
    rng = np.random.default_rng(2)
    teacher, student = rng.normal(size=(2, 6, 5)).astype(np.float32) * 3
    valid = np.array([True, True, False, True, False])
    t = 2.0
    expected = _kl_rows(teacher[:, valid] / t, student[:, valid] / t).mean()
    got = lwf_loss(jnp.asarray(teacher), jnp.asarray(student), t, jnp.asarray(valid))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # All columns when none are masked; zero when the two models agree.
    np.testing.assert_allclose(
        distillation_kl(teacher, student), _kl_rows(teacher, student), rtol=1e-5
    )
    np.testing.assert_allclose(lwf_loss(teacher, teacher, t, valid), 0.0, atol=1e-6)


def test_modx_loss_distils_the_rows_the_old_model_gets_right():
    rng = np.random.default_rng(3)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    t_img, t_txt, s_img, s_txt = (unit(rng.normal(size=(8, 4))) for _ in range(4))
    labels = np.array([0, 1, 2, 0, 1, 3, 2, 0])
    t_txt = unit(t_txt + t_img)  # the old model gets most rows right, not all
    same = labels[:, None] == labels[None, :]

    def rows(tq, tk, sq, sk):
        teacher, student = tq @ tk.T, sq @ sk.T
        right = same[np.arange(8), teacher.argmax(1)]
        assert 0 < right.sum() < 8  # both cases occur
        return (_kl_rows(teacher, student) * right).sum()

    expected = 0.5 * (rows(t_img, t_txt, s_img, s_txt) + rows(t_txt, t_img, s_txt, s_img))
    args = [jnp.asarray(x, jnp.float32) for x in (t_img, t_txt, s_img, s_txt)]
    np.testing.assert_allclose(modx_loss(*args, jnp.asarray(labels)), expected, rtol=1e-5)


def _random_adapter(exp, seed, scale=0.1):
    return jax.tree.map(
        lambda x: jax.random.normal(jax.random.PRNGKey(seed), x.shape) * scale,
        exp.fresh_adapter(0),
    )


@pytest.fixture(scope="module")
def exp():
    return random_backbone_experiment(
        **{
            "train.learn_temperature": False,
            "train.steps_per_task": 2,
            "regularizer.ewc_fisher_batches": 3,
        }
    )


def _batch(exp, task):
    images, labels = union_train_split(exp.tasks, exp.table, [task])
    return next(train_batches(images, labels, batch_size=32, num_steps=1, seed=3))


@pytest.mark.parametrize(
    "name, base", [("olora", "mslora"), ("ewc", "seq"), ("lwf", "seq"), ("modx", "seq")]
)
def test_baseline_loss_is_its_base_loss_plus_the_term(exp, name, base):
    """At stage 1 the baseline's loss is its base method's (same task loss, CR, ortho) plus
    lambda times its term, which is positive; at stage 0 the term's weight is 0."""
    method, base_method = get_method(name), get_method(base)
    slots = {0: _random_adapter(exp, 1)}
    fisher = jax.tree.map(lambda x: jnp.abs(x) + 1.0, _random_adapter(exp, 5))
    trainable = {"lora": _random_adapter(exp, 3)}
    batch, rng = _batch(exp, 1), jax.random.PRNGKey(0)
    context = stage_context(exp, method, 1, slots, [1], fisher)
    loss, metrics = exp.loss_for(method)(trainable, context, batch, rng)
    base_context = stage_context(exp, base_method, 1, slots, [1])
    base_loss, base_metrics = exp.loss_for(base_method)(trainable, base_context, batch, rng)
    reg = exp.config.regularizer
    lam = {"olora": reg.olora_lambda, "ewc": reg.ewc_lambda}.get(name)
    lam = lam if lam is not None else getattr(reg, f"{name}_lambda")
    assert float(context.term_weight) == lam
    assert float(metrics[name]) > 0
    for key in ("task_loss", "cr", "ortho"):
        np.testing.assert_allclose(metrics[key], base_metrics[key], rtol=1e-6)
    np.testing.assert_allclose(loss, base_loss + lam * metrics[name], rtol=1e-5)
    # The term is the direct formula on the context's inputs.
    if name == "olora":
        expected = olora_penalty(trainable["lora"], context.lora_stack, context.term_mask)
        assert context.term_mask.tolist() == [True, False, False]
    elif name == "ewc":
        chex.assert_trees_all_equal(context.anchor, slots[0])  # theta*: the stage's start
        expected = ewc_penalty(trainable["lora"], slots[0], fisher)
    else:
        expected = metrics[name]  # the distillation terms: see test_distillation_terms
    np.testing.assert_allclose(metrics[name], expected, rtol=1e-5)
    assert float(stage_context(exp, method, 0, {}, [0], None).term_weight) == 0.0


def test_distillation_terms_match_the_models_outputs(exp):
    """LwF's term from the two models' logits over the current task's prompts; Mod-X's from
    their in-batch similarities; both 0 when the trained adapter is the previous one."""
    from mslora_jax.models.clip import DualEncoder
    from mslora_jax.models.lora_dense import LORA_ACTIVE
    from mslora_jax.models.pixels import normalize_images
    from mslora_jax.train.adapter_loss import with_layer_weight

    slots = {0: _random_adapter(exp, 1)}
    trainable = {"lora": _random_adapter(exp, 3)}
    batch = _batch(exp, 1)
    images = normalize_images(batch["image"])
    weights = jnp.zeros(exp.num_slots)

    def embed(adapter, tokens):
        v = {"params": exp.base_params, LORA_ACTIVE: with_layer_weight(adapter, exp.scaling)}
        img = exp.model.apply(v, images, weights, method=DualEncoder.encode_image)
        return np.asarray(img), np.asarray(
            exp.model.apply(v, tokens, weights, method=DualEncoder.encode_text)
        )

    scale = float(np.exp(exp.base_params["logit_scale"]))
    tokens, valid = exp.table.task_tokens(1, exp.max_classes)
    (si, sc), (ti, tc) = embed(trainable["lora"], tokens), embed(slots[0], tokens)
    t = exp.config.regularizer.lwf_temperature
    lwf = _kl_rows(scale * ti @ tc[valid].T / t, scale * si @ sc[valid].T / t).mean()
    labels = np.asarray(batch["label"])
    (si, sc), (ti, tc) = (embed(a, exp.table.tokens) for a in (trainable["lora"], slots[0]))
    modx = modx_loss(ti, tc[labels], si, sc[labels], labels)
    for name, expected in (("lwf", lwf), ("modx", modx)):
        method = get_method(name)
        context = stage_context(exp, method, 1, slots, [1])
        _, metrics = exp.loss_for(method)(trainable, context, batch, jax.random.PRNGKey(0))
        np.testing.assert_allclose(metrics[name], expected, rtol=2e-4, atol=1e-6)
        _, same = exp.loss_for(method)({"lora": slots[0]}, context, batch, jax.random.PRNGKey(0))
        np.testing.assert_allclose(same[name], 0.0, atol=1e-5)


def test_ewc_fisher_is_the_mean_squared_batch_gradient(exp):
    method = get_method("ewc")
    slots = {0: _random_adapter(exp, 1)}
    fisher = stage_fisher(exp, method, 0, slots)
    context = stage_context(exp, method, 0, slots, [0])
    count = exp.config.regularizer.ewc_fisher_batches
    batches = exp.train_batches([0], count, seed=exp.config.seed * 7919 + 104729)
    task = lambda a, batch, key: exp.loss_fn({"lora": a}, context, batch, key)[1]["task_loss"]
    grad = jax.jit(jax.grad(task))
    total = None
    for i, batch in enumerate(batches):
        sq = jax.tree.map(np.square, grad(slots[0], batch, jax.random.PRNGKey(i)))
        total = sq if total is None else jax.tree.map(np.add, total, sq)
    chex.assert_trees_all_close(fisher, jax.tree.map(lambda x: x / count, total), rtol=1e-4)
    assert max(float(np.max(x)) for x in jax.tree.leaves(fisher)) > 0


@pytest.mark.parametrize("name", ["olora", "ewc", "lwf", "modx"])
def test_baseline_trains_a_stage(exp, name):
    method = get_method(name)
    slots = {0: _random_adapter(exp, 1)}
    fisher = stage_fisher(exp, method, 0, slots) if name == "ewc" else None
    state, info = train_stage(exp, method, 1, slots, fisher=fisher)
    # (EWC's term is 0 until the adapter leaves theta*: the first step's learning rate is 0.)
    assert np.isfinite(info["final"]["loss"]) and np.isfinite(info["final"][name])
    moved = jax.tree.map(
        lambda a, b: np.abs(np.asarray(a - b)).max(),
        state.trainable["lora"],
        slots[0] if not method.per_task_adapters else exp.fresh_adapter(1),
    )
    assert max(jax.tree.leaves(moved)) > 0


def test_baseline_config_keys():
    """Defaults, bad values named, the llava refusal, and older workdirs' fingerprints."""
    cfg = smoke_dict(methods=("olora", "ewc", "lwf", "modx"))
    reg = experiment_config(cfg).regularizer
    assert (reg.olora_lambda, reg.ewc_lambda, reg.ewc_fisher_batches) == (0.5, 100.0, 8)
    assert (reg.lwf_lambda, reg.lwf_temperature, reg.modx_lambda) == (1.0, 2.0, 20.0)
    assert "olora_lambda" not in fingerprint(experiment_config(cfg))["regularizer"]
    cfg["regularizer"]["olora_lambda"] = 0.1
    assert fingerprint(experiment_config(cfg))["regularizer"]["olora_lambda"] == 0.1
    for key, value in (("ewc_lambda", -1.0), ("ewc_fisher_batches", 0), ("lwf_temperature", 0.0)):
        bad = smoke_dict(**{f"regularizer.{key}": value})
        with pytest.raises(ConfigError, match=rf"regularizer\.{key}"):
            experiment_config(bad)
    assert (
        "olora" not in experiment_config({k: v for k, v in cfg.items() if k != "methods"}).methods
    )
    for name in ("lwf", "modx"):
        llava = smoke_dict(model_kind="llava", methods=(name,))
        with pytest.raises(ConfigError, match=rf"method {name!r} .*model_kind='llava'"):
            experiment_config(llava)


def test_ewc_resume_recomputes_the_fisher(tmp_path):
    """A run resumed before its second stage (the first stage's Fisher re-estimated from its
    saved adapter) ends with the results of the uninterrupted run."""
    import shutil

    from mslora_jax.run.experiment import run_experiment

    stream = smoke_dict()["stream"][:2]
    overrides = {
        "methods": ("ewc",),
        "stream": stream,
        "backbone.source": "random",
        "base_tasks": [],
        "num_devices": 1,
        "train.steps_per_task": 3,
        "regularizer.ewc_fisher_batches": 2,
    }
    config = experiment_config(smoke_dict(**overrides))
    full = run_experiment(config, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "ewc" / "1")
    (tmp_path / "cut" / "results.json").unlink()
    resumed = run_experiment(config, tmp_path / "cut")
    for key in ("acc_matrix", "unified_acc"):
        assert resumed["methods"]["ewc"][key] == full["methods"]["ewc"][key]
