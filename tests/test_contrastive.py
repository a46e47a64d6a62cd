"""CLIP InfoNCE against a float64 numpy reference, and sharded (8 devices) against 1 device."""

import jax
import jax.numpy as jnp
import numpy as np

from mslora_jax.losses.contrastive import clip_loss, sharded_clip_loss
from mslora_jax.parallel.mesh import make_mesh


def _reference(img, txt, ids, logit_scale):
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    logits = np.exp(logit_scale) * img @ txt.T
    pos = (ids[:, None] == ids[None, :]).astype(np.float64)
    targets = pos / pos.sum(1, keepdims=True)

    def xent(lg):
        lg = lg - lg.max(1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        return -(targets * logp).sum(1).mean()

    return 0.5 * (xent(logits) + xent(logits.T))


def _embeddings(n=16, d=8, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return norm(jax.random.normal(k1, (n, d))), norm(jax.random.normal(k2, (n, d)))


def test_clip_loss_matches_reference_with_duplicates():
    img, txt = _embeddings()
    ids = jnp.array([0, 1, 2, 3] * 4)
    np.testing.assert_allclose(
        clip_loss(img, txt, ids, 2.0), _reference(img, txt, np.asarray(ids), 2.0), rtol=1e-5
    )


def test_clip_loss_is_standard_infonce_for_distinct_prompts():
    img, txt = _embeddings(n=6)
    ids = jnp.arange(6)
    logits = np.exp(1.5) * np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
    lse = lambda x: np.log(np.exp(x).sum(1))
    want = 0.5 * ((lse(logits) - np.diag(logits)).mean() + (lse(logits.T) - np.diag(logits)).mean())
    np.testing.assert_allclose(clip_loss(img, txt, ids, 1.5), want, rtol=1e-5)


def test_sharded_loss_and_grads_equal_single_device():
    img, txt = _embeddings(n=32)
    ids = jnp.array(np.random.default_rng(0).integers(0, 5, 32))
    mesh8, mesh1 = make_mesh(8), make_mesh(1)
    assert mesh8.size == 8
    single = jax.value_and_grad(clip_loss, argnums=(0, 1, 3))
    for mesh in (mesh8, mesh1):
        sharded = jax.jit(jax.value_and_grad(sharded_clip_loss(mesh), argnums=(0, 1, 3)))
        got_loss, got_grads = sharded(img, txt, ids, jnp.float32(2.0))
        want_loss, want_grads = single(img, txt, ids, jnp.float32(2.0))
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
