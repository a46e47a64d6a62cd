"""The region embedder: the dual encoder's own image tower under new heads."""

import jax
import jax.numpy as jnp
import numpy as np

from mslora_jax.models.clip import DualEncoder, init_backbone
from mslora_jax.models.pixels import model_images
from mslora_jax.objects.model import RegionEmbedder, init_heads, retrieval_embedding
from tests.helpers import smoke_config


def test_the_tower_is_the_dual_encoders_and_heads_are_per_group():
    config = smoke_config().model
    backbone = init_backbone(config, jax.random.PRNGKey(0))
    model = RegionEmbedder(config, small_dim=config.embed_dim, large_dim=10, groups=3)
    params = init_heads(model, backbone["image"], jax.random.PRNGKey(1))
    assert {k for k in params if k.startswith("group_")} == {
        f"group_{g}_{s}" for g in range(3) for s in ("small", "large")
    }
    images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3)), jnp.uint8)
    out = model.apply({"params": params}, images)
    assert [(a.shape, b.shape) for a, b in out] == [((4, config.embed_dim), (4, 10))] * 3
    # With group 0's small head the identity, retrieval embeds as the dual encoder's image
    # tower does: the same weights under "image", the same pixels.
    identity = {"kernel": jnp.eye(config.embed_dim), "bias": jnp.zeros(config.embed_dim)}
    unit = retrieval_embedding(model, {"params": {**params, "group_0_small": identity}}, images)
    dual = DualEncoder(config)
    expected = dual.apply({"params": backbone}, model_images(dual, images),
                          method=DualEncoder.encode_image)  # fmt: skip
    np.testing.assert_allclose(unit, expected, atol=1e-5)
