"""The Pallas splash-attention path against XLA attention (the kernel in the Pallas interpreter).

Real tokens must get the same outputs and gradients as ``attention.attend``; padding rows are
never read, so they are not compared. Tiny shapes: the interpreter is slow.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mslora_jax.config import experiment_config
from mslora_jax.errors import ConfigError
from mslora_jax.models.attention import attend
from mslora_jax.models.splash import splash_attention
from mslora_jax.parallel.mesh import make_mesh

B, L, H, K, DH = 4, 70, 4, 2, 16  # L pads to 128 inside; grouped-query: 2 query heads per kv
LENGTHS = [70, 64, 33, 1]  # right padding, as in training


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(B, L, h, DH)), jnp.float32) for h in (H, K, K))
    real = jnp.asarray(np.arange(L)[None] < np.array(LENGTHS)[:, None])
    return q, k, v, real


def _xla(q, k, v, real):
    visible = real[:, None, :] & (jnp.arange(L)[None, None, :] <= jnp.arange(L)[None, :, None])
    return attend(q.reshape(B, L, K, H // K, DH), k, v, visible).reshape(B, L, H, DH)


def _masked_sum(out, real, weights):
    return jnp.sum(jnp.where(real[..., None, None], out * weights, 0.0))


def test_splash_equals_xla_attention_on_real_tokens_values_and_gradients():
    q, k, v, real = _inputs()
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, L, H, DH)), jnp.float32)
    splash = lambda q, k, v: splash_attention(q, k, v, real, interpret=True)
    xla = lambda q, k, v: _xla(q, k, v, real)
    got, want = jax.jit(splash)(q, k, v), jax.jit(xla)(q, k, v)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
    grads = lambda f: jax.jit(jax.grad(lambda *a: _masked_sum(f(*a), real, weights), (0, 1, 2)))
    chex.assert_trees_all_close(grads(splash)(q, k, v), grads(xla)(q, k, v), rtol=1e-4, atol=1e-5)


def test_splash_under_a_mesh_runs_per_shard_and_equals_one_device():
    """Batch over (data, fsdp) and heads over tensor via ``shard_map``: the same outputs."""
    q, k, v, real = _inputs(2)
    want = jax.jit(lambda *a: splash_attention(*a, interpret=True))(q, k, v, real)
    mesh = make_mesh(8, (1, 4, 2))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: splash_attention(*a, interpret=True))(q, k, v, real)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-6)


def test_llava_loss_with_splash_equals_xla(tmp_path):
    """The whole LLaVA forward (scanned decoder, adapters) with the kernel: same logits on the
    real tokens and the same adapter gradients."""
    from mslora_jax.lora.adapter import init_adapter_params, stack_params
    from mslora_jax.lora.targets import select_targets
    from mslora_jax.models.llava import LLAVA_LORA_TARGETS, Llava, init_llava
    from tests.test_decoder import IMAGE_ID, LLAVA, _right_pad

    params = init_llava(LLAVA, jax.random.PRNGKey(0))
    targets = select_targets(params, LLAVA_LORA_TARGETS)
    adapter = jax.tree.map(
        lambda x: x + 0.05, init_adapter_params(params, targets, 2, jax.random.PRNGKey(1))
    )
    images = jnp.asarray(np.random.default_rng(2).random((2, 8, 8, 3)), jnp.float32)
    ids, mask = _right_pad([[1, IMAGE_ID, 9, 10, 11], [1, IMAGE_ID, 12]], 5)
    real = jnp.asarray(np.arange(8)[None] < np.array([[8], [6]]))  # 5 + 4 patches - 1 spliced

    def loss_and_grad(kernel):
        def loss(lora):
            logits = Llava(LLAVA, attention_kernel=kernel).apply(
                {"params": params, "lora": stack_params([lora])}, images, ids, mask, jnp.ones(1)
            )
            return jnp.sum(jnp.where(real, jax.nn.log_softmax(logits)[..., 7], 0.0)), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(adapter)

    (loss_x, logits_x), grad_x = loss_and_grad("xla")
    (loss_s, logits_s), grad_s = loss_and_grad("splash_interpret")
    np.testing.assert_allclose(logits_s[real], logits_x[real], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(loss_s, loss_x, rtol=1e-5)
    chex.assert_trees_all_close(grad_s, grad_x, rtol=1e-4, atol=1e-6)


def test_splash_on_cpu_devices_is_refused_by_name():
    from mslora_jax.config import LlavaSettings
    from mslora_jax.families.llava.experiment import attention_kernel
    from tests.helpers import load_config_file

    config = experiment_config(load_config_file("demo_generative.py"))
    assert attention_kernel(config, make_mesh(1)) == "xla"  # the default (None)
    splash = dataclasses.replace(
        config, llava=dataclasses.replace(config.llava, attention_kernel="splash")
    )
    with pytest.raises(ConfigError, match='attention_kernel="splash" is a TPU kernel.*cpu'):
        attention_kernel(splash, make_mesh(1))
    with pytest.raises(ConfigError, match="llava.attention_kernel='flash' is unknown"):
        LlavaSettings(attention_kernel="flash")
