"""FSDP + tensor + data sharding on 8 simulated CPU devices, against the single-device run.

Every test here runs in CI (conftest forces 8 CPU devices); none is skipped.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models

from mslora_jax.data.pipeline import train_batches
from mslora_jax.data.registry import load_tasks, union_train_split
from mslora_jax.errors import ConfigError
from mslora_jax.families.dual_encoder.experiment import build_experiment
from mslora_jax.families.llava.experiment import GenerativeExperiment, VqaTask
from mslora_jax.lora.targets import select_targets
from mslora_jax.models.llava import init_llava
from mslora_jax.parallel.mesh import make_mesh, resolve_mesh_shape, to_global_batch
from mslora_jax.parallel.rules import ShardingRules
from mslora_jax.train.checkpoints import StageCheckpoints, load_backbone, save_backbone
from mslora_jax.train.methods import get_method
from mslora_jax.train.stream import stage_context
from tests.helpers import random_backbone_experiment, smoke_config
from tests.test_generative import _tiny_llava_config

MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]


def _perturbed(tree, seed, scale=0.05):
    """``tree`` plus noise (on the host, then put back as it was sharded): nonzero B, so
    adapters change outputs and get gradients."""
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(
        lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32), tree
    )
    return jax.device_put(noisy, jax.tree.map(lambda x: x.sharding, tree))


def _dual_encoder_on(mesh_shape, devices=8, base=None, **overrides):
    """The smoke experiment on a mesh; ``base`` (host params) reused instead of a new init."""
    if base is None:
        return random_backbone_experiment(devices, mesh_shape, **overrides)
    config = smoke_config(**{"backbone.source": "random", **overrides})
    tasks = load_tasks(config, config.stream)
    return build_experiment(config, tasks, make_mesh(devices, mesh_shape), base)


def _one_step(exp, batch):
    """State and metrics after one mslora_cr_ortho step at stage 1 (``exp.train_step``).

    Adam's first moment after one step is ``(1 - b1) * grad``, so the returned state holds the
    gradients too (``opt_state[0].mu``)."""
    method = get_method("mslora_cr_ortho")
    earlier = {0: _perturbed(exp.fresh_adapter(0), 1)}
    active = _perturbed(exp.fresh_adapter(1), 2)
    context = exp.rules.place(stage_context(exp, method, 1, earlier, [1]))
    assert (
        float(context.schedule(jnp.int32(0))) > 0
    )  # warmup_ratio=0: the step really moves the adapter
    state = exp.init_state(method, active, jax.random.PRNGKey(0))
    batch = to_global_batch(exp.mesh, batch)
    state, metrics = exp.train_step(state, context, batch)
    return state, jax.device_get(metrics)


def _assert_same_step(state, metrics, ref_state, ref_metrics):
    for key in ("loss", "task_loss", "cr", "ortho"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-5, err_msg=key)
    grads, ref_grads = (jax.device_get(s.opt_state[0].mu) for s in (state, ref_state))
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-7)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads)) > 1e-5
    # Adam's first update is about lr * sign(grad): where a gradient is ~0 its float noise shows.
    chex.assert_trees_all_close(
        jax.device_get(state.trainable), jax.device_get(ref_state.trainable), atol=1e-5
    )


def _shard_shape(x) -> tuple:
    return tuple(x.addressable_shards[0].data.shape)


def _dual_encoder_batch(exp):
    images, labels = union_train_split(exp.tasks, exp.table, [1])
    return next(train_batches(images, labels, batch_size=32, num_steps=1, seed=3))


def test_dual_encoder_step_on_every_mesh_equals_one_device():
    no_warmup = {"train.warmup_ratio": 0.0}
    reference = random_backbone_experiment(num_devices=1, **no_warmup)
    batch = _dual_encoder_batch(reference)
    ref_state, ref_metrics = _one_step(reference, batch)
    base = jax.device_get(reference.base_params)
    for shape in MESHES:
        exp = _dual_encoder_on(shape, base=base, **no_warmup)
        assert dict(exp.mesh.shape) == dict(zip(("data", "fsdp", "tensor"), shape))
        state, metrics = _one_step(exp, batch)
        _assert_same_step(state, metrics, ref_state, ref_metrics)
        # The frozen weights are really split as the rules say: fc1 [32, 64] is (embed, mlp)
        # -> (fsdp, tensor); its LoRA A [r, 32] follows the input dim, B [64, r] the output.
        data, fsdp, tensor = shape
        fc1 = exp.base_params["image"]["encoder"]["block_0"]["mlp"]["fc1"]
        assert _shard_shape(fc1["kernel"]) == (32 // fsdp, 64 // tensor)
        lora = state.trainable["lora"]["image"]["encoder"]["block_0"]["mlp"]["fc1"]
        assert _shard_shape(lora["lora_a"]) == (2, 32 // fsdp)
        # B's output dim maps to tensor only; FSDP splits every array, so fsdp joins it.
        assert _shard_shape(lora["lora_b"]) == (64 // (tensor * fsdp), 2)
        # Adam's moments follow their adapter.
        mu = state.opt_state[0].mu["lora"]["image"]["encoder"]["block_0"]["mlp"]["fc1"]
        assert mu["lora_a"].sharding == lora["lora_a"].sharding
        # The embedding [256, 32] is (vocab, embed) -> (tensor, fsdp); a norm scale [32] has
        # no sharded logical axis, so FSDP alone splits it.
        scale = exp.base_params["image"]["encoder"]["block_0"]["ln_mlp"]["scale"]
        assert _shard_shape(scale) == (32 // fsdp,)
        embedding = exp.base_params["text"]["token_embed"]["embedding"]
        assert _shard_shape(embedding) == (256 // tensor, 32 // fsdp)


def _llava_experiment(tmp_path, mesh, params=None):
    stream = [("s_p", "pathology"), ("s_r", "radiology")]
    config = _tiny_llava_config(tmp_path, stream=stream, warmup_ratio=0.0)
    params = (
        params
        if params is not None
        else init_llava(config.llava.model_config(), jax.random.PRNGKey(0))
    )
    tasks = [VqaTask(t.name, t.modality, [], [], t.primary_metric) for t in config.stream]
    tokenizer = Tokenizer(
        models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}, "<unk>")
    )
    targets = select_targets(params, config.lora.targets)
    return GenerativeExperiment(
        config, tasks, tokenizer, mesh, params, targets, max_len=24, max_new_tokens=4
    ), params


def _llava_batch(rows=16, length=24, image_size=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 512, size=(rows, length)).astype(np.int32)
    ids[:, 2] = 4  # the <image> placeholder
    attention = np.ones((rows, length), bool)
    attention[::3, -5:] = False  # some right padding
    loss_mask = attention & (np.arange(length) > 8)
    images = rng.integers(0, 256, size=(rows, image_size, image_size, 3)).astype(np.uint8)
    return {
        "image": images,
        "input_ids": ids,
        "attention_mask": attention,
        "loss_mask": loss_mask,
    }


def test_llava_step_on_every_mesh_equals_one_device(tmp_path):
    reference, params = _llava_experiment(tmp_path, make_mesh(1))
    batch = _llava_batch()
    ref_state, ref_metrics = _one_step(reference, batch)
    params = jax.device_get(params)
    for shape in MESHES:
        exp, _ = _llava_experiment(tmp_path, make_mesh(8, shape), params)
        state, metrics = _one_step(exp, batch)
        _assert_same_step(state, metrics, ref_state, ref_metrics)
        data, fsdp, tensor = shape
        block = exp.base_params["decoder"]["blocks"]  # scanned: a leading, unsharded layer axis
        depth = block["attn"]["q"]["kernel"].shape[0]
        # q [64, 64] (embed, heads); k [64, 32] (embed, kv_heads); down [128, 64] (mlp, embed).
        assert _shard_shape(block["attn"]["q"]["kernel"]) == (depth, 64 // fsdp, 64 // tensor)
        assert _shard_shape(block["attn"]["k"]["kernel"]) == (depth, 64 // fsdp, 32 // tensor)
        assert _shard_shape(block["mlp"]["down"]["kernel"]) == (depth, 128 // tensor, 64 // fsdp)
        assert _shard_shape(block["attn_norm"]["scale"]) == (depth, 64 // fsdp)
        head = exp.base_params["decoder"]["lm_head"]["kernel"]
        assert _shard_shape(head) == (64 // fsdp, 512 // tensor)
        lora = state.trainable["lora"]["decoder"]["blocks"]["mlp"]["down"]
        assert _shard_shape(lora["lora_a"]) == (depth, 4, 128 // (tensor * fsdp))
        assert _shard_shape(lora["lora_b"]) == (depth, 64 // fsdp, 4)


def test_every_parameter_needs_a_rule_and_every_rule_a_parameter():
    exp = random_backbone_experiment(num_devices=8, mesh_shape=(1, 8, 1))
    params = jax.device_get(exp.base_params)
    rules = ShardingRules(exp.mesh, "dual_encoder")
    rules.check_rules(params)
    extra = {**params, "image": {**params["image"], "new_head": {"kernel": np.zeros((32, 4))}}}
    with pytest.raises(ConfigError, match=r"image/new_head/kernel \(32, 4\) matches no"):
        rules.check_rules(extra)
    without_text = {k: v for k, v in params.items() if k != "text"}
    with pytest.raises(ConfigError, match=r"rules match no parameter: .*token_embed"):
        rules.check_rules(without_text)
    wrong_rank = {**params, "logit_scale": np.zeros((2,))}
    with pytest.raises(ConfigError, match=r"logit_scale of shape \(2,\)"):
        rules.check_rules(wrong_rank)


def test_mesh_shapes_are_resolved_and_checked():
    assert resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    for bad, match in (
        ((-1, -1, 1), "at most one -1"),
        ((3, -1, 1), "not divisible by 3"),
        ((2, 2, 1), "needs 4 devices"),
    ):
        with pytest.raises(ConfigError, match=match):
            resolve_mesh_shape(bad, 8)
    with pytest.raises(ConfigError, match="batch shards"):
        random_backbone_experiment(num_devices=8, mesh_shape=(1, 8, 1), **{"train.batch_size": 12})


def test_checkpoint_written_on_one_mesh_restores_on_others(tmp_path):
    source = random_backbone_experiment(num_devices=8, mesh_shape=(2, 4, 1))
    method = get_method("mslora_cr_ortho")
    adapter = _perturbed(source.fresh_adapter(0), 5)
    state = source.init_state(method, adapter, jax.random.PRNGKey(0))
    checkpoints = StageCheckpoints(tmp_path / "ckpt")
    checkpoints.save(0, adapter=adapter, trainer=state, metrics={"row": [1.0]}, meta={})
    save_backbone(tmp_path / "backbone", source.base_params, {"model": {}})
    expected_adapter, expected_state = jax.device_get((adapter, state))
    expected_base = jax.device_get(source.base_params)
    for shape, devices in (((1, 1, 1), 1), ((1, 8, 1), 8)):
        target = random_backbone_experiment(num_devices=devices, mesh_shape=shape)
        abstract_adapter = target.rules.abstract(jax.eval_shape(target.fresh_adapter, 0))
        abstract_state = target.rules.abstract(jax.eval_shape(lambda: state))
        restored, trainer, metrics, _ = StageCheckpoints(tmp_path / "ckpt").restore(
            0, abstract_adapter, abstract_state, {}
        )
        chex.assert_trees_all_equal(jax.device_get(restored), expected_adapter)
        chex.assert_trees_all_equal(jax.device_get(trainer), expected_state)
        assert metrics == {"row": [1.0]}
        # Restored straight into the target's shardings.
        fc1 = restored["image"]["encoder"]["block_0"]["mlp"]["fc1"]["lora_a"]
        assert (
            fc1.sharding
            == abstract_adapter["image"]["encoder"]["block_0"]["mlp"]["fc1"]["lora_a"].sharding
        )
        base, _ = load_backbone(tmp_path / "backbone", target.rules.abstract(expected_base), {})
        chex.assert_trees_all_equal(jax.device_get(base), expected_base)
        kernel = base["image"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
        assert _shard_shape(kernel) == (32 // shape[1], 64)


def test_workdirs_written_before_a_new_optional_key_still_resume():
    from mslora_jax.errors import CheckpointError
    from mslora_jax.train.checkpoints import check_same_config

    saved = {"stream": [{"name": "a", "epochs": 1.0}], "mesh_free": 1}
    check_same_config(
        saved,
        {"stream": [{"name": "a", "epochs": 1.0, "batch_size": None}], "mesh_free": 1},
        "workdir w",
    )
    with pytest.raises(CheckpointError, match=r"config\.stream\[0\]\.batch_size: None -> 24"):
        check_same_config(
            saved,
            {"stream": [{"name": "a", "epochs": 1.0, "batch_size": 24}], "mesh_free": 1},
            "workdir w",
        )
