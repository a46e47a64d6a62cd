"""STML's pseudo-labels, relaxed contrastive loss and self-distillation against slow NumPy loops
written from the authors' released definitions (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mslora_jax.losses.stml import (
    cross_group_kl,
    pseudo_labels,
    relaxed_contrastive_loss,
    self_distillation_kl,
    stml_loss,
)


def _cdist(x):
    return np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0))


def _pseudo_reference(t, ids, sigma, k):
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    n = len(t)
    w_p = np.exp(-(_cdist(t) ** 2) / sigma)
    choose = w_p.copy()
    choose[ids[:, None] == ids[None, :]] = 1.0
    top = np.argsort(-choose, axis=1, kind="stable")[:, :k]
    half = top[:, : int(np.around(k / 2))]
    knn = np.zeros((n, n))
    for i in range(n):
        knn[i, top[i]] = 1
    v = ((knn + knn.T) / 2 == 1).astype(float)
    w_c_tilde = np.zeros((n, n))
    for i in range(n):
        members = np.where(v[i] != 0)[0]
        w_c_tilde[i, members] = (v[:, members].sum(1) / len(members))[members]
    w_c_hat = w_c_tilde[half].mean(1)
    return (w_p + (w_c_hat + w_c_hat.T) / 2) / 2


def _relative(x):
    d = _cdist(x)
    return d / d.mean(1, keepdims=True)


def _rc_reference(s, w, delta):
    d, n, total = _relative(s), len(s), 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                pull = w[i, j] * max(d[i, j], 0) ** 2
                total += pull + (1 - w[i, j]) * max(delta - d[i, j], 0) ** 2
    return total / (n * (n - 1))


def _kl_reference(s, g):
    total = 0.0
    for row_s, row_g in zip(-_relative(s), -_relative(g), strict=True):
        q = np.exp(row_s - row_s.max())
        q /= q.sum()
        p = np.exp(row_g - row_g.max())
        p /= p.sum()
        total += np.sum(p * (np.log(p) - np.log(q)))
    return total / len(s)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6))
    ids = np.repeat(np.arange(12), 2)  # two views of each of 12 objects
    x = centres[ids % 4] + 0.4 * rng.normal(size=(24, 6))
    return x, ids, rng


@pytest.mark.parametrize("k", [4, 10, 24])
def test_pseudo_labels_match_the_released_loop(batch, k):
    x, ids, _ = batch
    got = np.asarray(pseudo_labels(jnp.asarray(x, jnp.float32), jnp.asarray(ids), 3.0, k))
    np.testing.assert_allclose(got, _pseudo_reference(x, ids, 3.0, k), atol=2e-5)
    assert np.allclose(got, got.T, atol=1e-6) and (got >= 0).all() and (got <= 1 + 1e-6).all()


def test_relaxed_contrastive_loss_and_distillation_match_the_loops(batch):
    x, ids, rng = batch
    w = _pseudo_reference(x, ids, 3.0, 10)
    s = x + 0.3 * rng.normal(size=x.shape)
    got = relaxed_contrastive_loss(jnp.asarray(s, jnp.float32), jnp.asarray(w, jnp.float32), 1.0)
    assert float(got) == pytest.approx(_rc_reference(s, w, 1.0), rel=1e-4)
    g = rng.normal(size=(24, 10))
    kl = self_distillation_kl(jnp.asarray(s, jnp.float32), jnp.asarray(g, jnp.float32))
    assert float(kl) == pytest.approx(_kl_reference(s, g), rel=1e-4, abs=1e-6)
    assert float(self_distillation_kl(jnp.asarray(s), jnp.asarray(s))) == pytest.approx(0, abs=1e-6)


def test_gradients_are_finite_and_flow_to_the_students_only(batch):
    x, ids, rng = batch
    small = jnp.asarray(x[:, :4] + 0.1 * rng.normal(size=(24, 4)), jnp.float32)
    large = jnp.asarray(x + 0.1 * rng.normal(size=x.shape), jnp.float32)
    teacher = jnp.asarray(x, jnp.float32)

    def total(small, large, teacher):
        return stml_loss(small, large, teacher, jnp.asarray(ids))[0]

    grads = jax.grad(total, argnums=(0, 1, 2))(small, large, teacher)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    assert float(jnp.abs(grads[0]).sum()) > 0 and float(jnp.abs(grads[1]).sum()) > 0
    assert float(jnp.abs(grads[2]).sum()) == 0.0  # the teacher gives labels, not gradients
    # The loss falls when the student moves along its negative gradient.
    loss = total(small, large, teacher)
    stepped = total(small - 0.05 * grads[0], large - 0.05 * grads[1], teacher)
    assert float(stepped) < float(loss)


def test_cross_group_kl_matches_the_released_formula():
    rng = np.random.default_rng(3)
    earlier, current = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    centres = rng.normal(size=(100, 5))
    d_e = np.sqrt(((earlier[:, None] - centres[None]) ** 2).sum(-1))
    d_c = np.sqrt(((current[:, None] - centres[None]) ** 2).sum(-1))
    soft = lambda z: (
        np.exp(z - z.max(1, keepdims=True))
        / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
    )
    p, q = (soft(d_e) + 1e-8) / (1 + 1e-8), (soft(d_c) + 1e-8) / (1 + 1e-8)
    want = np.mean(np.sum(p * np.log(p / q), 1))
    got = cross_group_kl(*(jnp.asarray(a, jnp.float32) for a in (earlier, current, centres)))
    assert float(got) == pytest.approx(want, rel=1e-4)
    same = cross_group_kl(*(jnp.asarray(a, jnp.float32) for a in (earlier, earlier, centres)))
    assert float(same) == pytest.approx(0.0, abs=1e-6)
