"""LoRA layers and adapter trees against explicit matrix formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mslora_jax.errors import ConfigError
from mslora_jax.lora.adapter import (
    LoraAdapter,
    adapter_paths,
    init_adapter,
    init_adapter_params,
    insert_params,
    stack_params,
    unstack_params,
)
from mslora_jax.lora.merge import merge, unmerge
from mslora_jax.lora.targets import get_by_path, select_targets
from mslora_jax.models.clip import DualEncoder, ModelConfig, init_backbone
from mslora_jax.models.lora_dense import LoraDense

CFG = ModelConfig(
    image_size=8,
    patch_size=4,
    width=16,
    depth=1,
    num_heads=2,
    mlp_dim=32,
    vocab_size=64,
    max_text_len=6,
    text_width=16,
    text_depth=1,
    text_num_heads=2,
    text_mlp_dim=32,
    embed_dim=8,
)


def _random_lora(rng, t, r, d_in, d_out):
    ka, kb = jax.random.split(rng)
    return {
        "lora_a": jax.random.normal(ka, (t, r, d_in)),
        "lora_b": jax.random.normal(kb, (t, d_out, r)),
    }


def test_lora_dense_matches_explicit_formula():
    layer = LoraDense(5)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7))
    params = layer.init(jax.random.PRNGKey(1), x)["params"]
    lora = _random_lora(jax.random.PRNGKey(2), t=3, r=2, d_in=7, d_out=5)
    weights = jnp.array([0.5, 0.0, 2.0])  # mask (1, 0, 1) times scaling
    got = layer.apply({"params": params, "lora": lora}, x, weights)
    want = np.asarray(x) @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
    for t in range(3):
        a, b = np.asarray(lora["lora_a"][t]), np.asarray(lora["lora_b"][t])
        want = want + float(weights[t]) * (np.asarray(x) @ a.T) @ b.T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layer_without_adapter_is_plain_dense():
    layer = LoraDense(4)
    x = jnp.ones((2, 3))
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    got = layer.apply({"params": params}, x, jnp.ones(2))
    np.testing.assert_allclose(got, x @ params["kernel"] + params["bias"], rtol=1e-6)


def test_kaiming_init_and_zero_b_leave_output_unchanged():
    params = init_backbone(CFG, jax.random.PRNGKey(0))
    targets = select_targets(params, [r"attn/(q|k|v|out)$", r"mlp/(fc1|fc2)$"])
    adapter = init_adapter_params(params, targets, rank=4, rng=jax.random.PRNGKey(1))
    a = get_by_path(adapter, "image/encoder/block_0/attn/q")["lora_a"]
    assert a.shape == (4, 16) and np.abs(a).max() <= 1 / np.sqrt(16)
    assert np.abs(a).max() > 0.5 / np.sqrt(16)  # really uniform over the whole bound
    model = DualEncoder(CFG)
    images = jax.random.uniform(jax.random.PRNGKey(2), (2, 8, 8, 3))
    tokens = jnp.array([[1, 5, 6, 0, 0, 0], [1, 7, 0, 0, 0, 0]])
    plain = model.apply({"params": params}, images, tokens)
    stack = stack_params([adapter, adapter])
    adapted = model.apply({"params": params, "lora": stack}, images, tokens, jnp.array([2.0, 2.0]))
    chex.assert_trees_all_close(plain, adapted, atol=1e-6)


def test_targets_select_by_pattern_and_reject_unmatched():
    params = init_backbone(CFG, jax.random.PRNGKey(0))
    q_only = select_targets(params, [r"^image/.*attn/q$"])
    assert q_only == ["image/encoder/block_0/attn/q"]
    all_targets = select_targets(params, [r"attn/(q|k|v|out)$", r"mlp/(fc1|fc2)$"])
    assert len(all_targets) == 2 * 6  # two towers x one block x six layers
    with pytest.raises(ConfigError, match="matches no LoRA-capable layer"):
        select_targets(params, [r"attn/query$"])
    with pytest.raises(ConfigError, match="invalid regular expression"):
        select_targets(params, ["attn/(q"])


def test_adapter_tree_mirrors_only_adapted_paths():
    params = init_backbone(CFG, jax.random.PRNGKey(0))
    targets = select_targets(params, [r"mlp/fc1$"])
    adapter = init_adapter(
        params,
        targets,
        rank=2,
        alpha=4.0,
        modality="radiology",
        task="t0",
        rng=jax.random.PRNGKey(3),
    )
    assert adapter_paths(adapter.params) == targets
    assert adapter.scaling == 2.0
    assert adapter.num_params() == sum(2 * 16 + 32 * 2 for _ in targets)


def test_stack_unstack_insert():
    trees = [
        {"x": {"lora_a": jnp.full((2, 3), i), "lora_b": jnp.full((4, 2), i)}} for i in range(3)
    ]
    stacked = stack_params(trees)
    chex.assert_trees_all_equal(unstack_params(stacked)[1], trees[1])
    replaced = insert_params(stacked, trees[0], jnp.int32(2))
    chex.assert_trees_all_equal(unstack_params(replaced)[2], trees[0])


def test_merge_equals_unmerged_forward_and_round_trips():
    params = init_backbone(CFG, jax.random.PRNGKey(0))
    targets = select_targets(params, [r"attn/(q|k|v|out)$", r"mlp/(fc1|fc2)$"])
    adapters = []
    for i in range(2):
        tree = jax.tree.map(
            lambda x, i=i: jax.random.normal(jax.random.PRNGKey(10 + i), x.shape) * 0.1,
            init_adapter_params(params, targets, 3, jax.random.PRNGKey(i)),
        )
        adapters.append(LoraAdapter(tree, rank=3, alpha=6.0, modality="m", task=f"t{i}"))
    model = DualEncoder(CFG)
    images = jax.random.uniform(jax.random.PRNGKey(2), (2, 8, 8, 3))
    tokens = jnp.array([[1, 5, 6, 0, 0, 0], [1, 7, 0, 0, 0, 0]])
    stack = stack_params([a.params for a in adapters])
    unmerged = model.apply(
        {"params": params, "lora": stack}, images, tokens, jnp.array([a.scaling for a in adapters])
    )
    merged_params = merge(params, adapters)
    merged = model.apply({"params": merged_params}, images, tokens)
    chex.assert_trees_all_close(unmerged, merged, atol=1e-5)
    chex.assert_trees_all_close(unmerge(merged_params, adapters), params, atol=1e-5)


def test_task_mask_is_data_not_structure():
    params = init_backbone(CFG, jax.random.PRNGKey(0))
    targets = select_targets(params, [r"attn/(q|v)$"])
    stack = stack_params(
        [init_adapter_params(params, targets, 2, jax.random.PRNGKey(i)) for i in range(3)]
    )
    model = DualEncoder(CFG)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def embed(weights, images):
        return model.apply(
            {"params": params, "lora": stack}, images, weights, method=DualEncoder.encode_image
        )

    images = jnp.zeros((2, 8, 8, 3))
    for mask in ([1, 0, 0], [1, 1, 1], [0, 0, 1], [1, 1, 0]):
        embed(jnp.asarray(mask, jnp.float32), images)


def test_save_load_adapter_round_trip_and_errors(tmp_path):
    from mslora_jax.errors import CheckpointError
    from mslora_jax.lora.io import load_adapter, save_adapter

    params = init_backbone(CFG, jax.random.PRNGKey(0))
    targets = select_targets(params, [r"mlp/fc2$"])
    adapter = init_adapter(
        params,
        targets,
        rank=2,
        alpha=3.0,
        modality="dermatology",
        task="ham",
        rng=jax.random.PRNGKey(4),
    )
    save_adapter(tmp_path / "ham", adapter)
    loaded = load_adapter(tmp_path / "ham")
    assert loaded.metadata() == adapter.metadata()
    chex.assert_trees_all_equal(loaded.params, jax.tree.map(np.asarray, adapter.params))
    with pytest.raises(CheckpointError, match="already holds an adapter"):
        save_adapter(tmp_path / "ham", adapter)
    with pytest.raises(CheckpointError, match="no adapter at"):
        load_adapter(tmp_path / "missing")


def test_lora_dropout_is_used_in_training_only():
    layer = LoraDense(4, lora_dropout=0.5)
    x = jnp.ones((8, 6))
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    lora = _random_lora(jax.random.PRNGKey(1), t=1, r=2, d_in=6, d_out=4)
    w = jnp.ones(1)
    evals = layer.apply({"params": params, "lora": lora}, x, w)
    np.testing.assert_allclose(evals, layer.apply({"params": params, "lora": lora}, x, w, True))
    train = layer.apply(
        {"params": params, "lora": lora}, x, w, False, rngs={"dropout": jax.random.PRNGKey(2)}
    )
    assert not np.allclose(train, evals)
