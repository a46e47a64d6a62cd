"""The generative (LLaVA) setting through the shared method runner, on tiny synthetic VQA data."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models

from mslora_jax.config import experiment_config
from mslora_jax.data.conversation import build_tokenizer, render_conversation
from mslora_jax.data.synthetic import SyntheticTaskSpec
from mslora_jax.data.synthetic_vqa import write_synthetic_vqa_task
from mslora_jax.errors import ConfigError, DataError
from mslora_jax.families.llava.experiment import (
    GenerativeExperiment,
    answer_loss,
    load_vqa_task,
    pixels,
    pretrain_llava,
)
from mslora_jax.families.llava.setup import llava_model_json, obtain_tokenizer, prepare_generative
from mslora_jax.lora.adapter import stack_params
from mslora_jax.lora.targets import select_targets
from mslora_jax.models.llava import LLAVA_LORA_TARGETS, init_llava
from mslora_jax.parallel.mesh import make_mesh
from mslora_jax.train.checkpoints import save_backbone
from mslora_jax.train.methods import get_method
from mslora_jax.train.stream import run_method


def _task(name, modality):
    return dict(name=name, modality=modality, source="vqa", primary_metric="closed_accuracy")


def _write_tasks(root, specs, num_test):
    for name, modality, seed, num_train in specs:
        write_synthetic_vqa_task(
            SyntheticTaskSpec(name, modality, 4, seed),
            root / name,
            image_size=16,
            num_train=num_train,
            num_test=num_test,
        )


def _tiny_llava_config(root, stream, base=(), **train):
    """A tiny LLaVA on the VQA tasks written under ``root`` (the test's own data)."""
    return experiment_config(
        dict(
            stream=[_task(name, modality) for name, modality in stream],
            base_tasks=[_task(name, modality) for name, modality in base],
            data_dir=str(root),
            model_kind="llava",
            backbone=dict(source="random"),
            llava=dict(
                vision=dict(
                    image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64
                ),
                decoder=dict(
                    vocab_size=512,
                    width=64,
                    depth=2,
                    num_heads=4,
                    num_kv_heads=2,
                    mlp_dim=128,
                    max_len=256,
                ),
                image_token_id=4,
            ),
            lora=dict(rank=4, alpha=8.0, targets=LLAVA_LORA_TARGETS),
            train=dict(batch_size=16, learning_rate=3e-3, eval_batch_size=64, **train),
            pretrain=dict(steps=150, batch_size=16, learning_rate=2e-3),
            num_devices=1,
            progress=False,
        )
    )


def test_two_stage_generative_run_lifts_the_new_task(tmp_path):
    specs = [
        ("base_p", "pathology", 900, 512),
        ("base_r", "radiology", 901, 512),
        ("s_p", "pathology", 11, 256),
        ("s_r", "radiology", 21, 256),
    ]
    _write_tasks(tmp_path, specs, num_test=64)
    config = _tiny_llava_config(
        tmp_path,
        stream=[("s_p", "pathology"), ("s_r", "radiology")],
        base=[("base_p", "pathology"), ("base_r", "radiology")],
        steps_per_task=60,
    )
    base = [load_vqa_task(config, t) for t in config.base_tasks]
    stream = [load_vqa_task(config, t) for t in config.stream]
    tokenizer = build_tokenizer(
        [render_conversation(e) for t in base + stream for e in t.examples], 512
    )
    mesh = make_mesh(1)
    params = pretrain_llava(config, base, tokenizer, mesh, jax.random.PRNGKey(0), max_len=160)
    targets = select_targets(params, config.lora.targets)
    assert targets and all(t.startswith("decoder/") for t in targets)
    exp = GenerativeExperiment(
        config, stream, tokenizer, mesh, params, targets, max_len=160, max_new_tokens=6
    )
    before = exp.accuracy({}, [], 1)
    outcome = run_method(exp, get_method("mslora_cr"), None, {})
    summary = outcome.summary
    after = summary["acc_matrix"][1][1]
    assert after > before + 0.05, (before, after)
    assert np.isfinite(summary["unified_avg_acc"])
    # Every answer metric is kept per stage and task; the matrix holds the primary one.
    first, second = outcome.task_metrics
    # Stage 0 also meets task 1 before training on it (the superdiagonal, for forward transfer).
    assert first[1] is not None and first[2:] == [None] * (len(first) - 2)
    assert set(second[1]) >= {"closed_accuracy", "f1", "bleu4"}
    assert second[1]["closed_accuracy"] == after


def test_sharded_generation_equals_single_device(tmp_path):
    """KV-cache greedy answers on the FSDP + tensor sharded backbone (and cache) equal one
    device's. (Sharded training steps: tests/test_sharding.py.)"""
    _write_tasks(tmp_path, [("s_p", "pathology", 11, 32), ("s_r", "radiology", 21, 32)], 20)
    config = _tiny_llava_config(
        tmp_path, stream=[("s_p", "pathology"), ("s_r", "radiology")], steps_per_task=1
    )
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, eval_batch_size=16)
    )
    tasks = [load_vqa_task(config, t) for t in config.stream]
    tokenizer = build_tokenizer([render_conversation(e) for t in tasks for e in t.examples], 512)
    params = init_llava(config.llava.model_config(), jax.random.PRNGKey(0))
    targets = select_targets(params, config.lora.targets)
    outputs = []
    for mesh in (make_mesh(8, (2, 2, 2)), make_mesh(1)):
        exp = GenerativeExperiment(
            config, tasks, tokenizer, mesh, params, targets, max_len=160, max_new_tokens=4
        )
        # Nonzero B everywhere, so the adapters change the answers.
        slots = {
            0: jax.tree.map(lambda x: x + 0.05, exp.fresh_adapter(0)),
            1: jax.tree.map(lambda x: x - 0.05, exp.fresh_adapter(1)),
        }
        # 20 test items: one full batch of 16 and one padded one.
        outputs.append(exp.answer_records(slots, [0, 1], 1))
        assert exp.stack(slots)["decoder"]["blocks"]["attn"]["q"]["lora_a"].sharding.mesh == mesh
    sharded, single = outputs
    assert len(sharded) == 20 and [r["answer"] for r in sharded] == [r["answer"] for r in single]


def test_tokenizer_file_that_does_not_fit_is_named_before_training(tmp_path):
    _write_tasks(tmp_path, [("s_p", "pathology", 11, 8)], num_test=4)
    no_image = tmp_path / "mistral_like.json"
    Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>")).save(
        str(no_image)
    )
    config = _tiny_llava_config(tmp_path, stream=[("s_p", "pathology")])
    with_file = dataclasses.replace(
        config, llava=dataclasses.replace(config.llava, tokenizer_file=str(no_image))
    )
    # Without an <image> token the placeholder id must not be one of the tokenizer's ids.
    on_bos = dataclasses.replace(
        with_file, llava=dataclasses.replace(with_file.llava, image_token_id=1)
    )
    with pytest.raises(ConfigError, match=r"mistral_like\.json: .*no '<image>'.*-200"):
        obtain_tokenizer(on_bos, [], tmp_path / "work")
    no_eos = tmp_path / "no_eos.json"
    Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1}, unk_token="<unk>")).save(str(no_eos))
    without_eos = dataclasses.replace(
        config, llava=dataclasses.replace(config.llava, tokenizer_file=str(no_eos))
    )
    with pytest.raises(DataError, match=r"no_eos\.json: tokenizer has no special token '</s>'"):
        obtain_tokenizer(without_eos, [], tmp_path / "work")
    # A built tokenizer is checked too, and not saved when it does not fit.
    (tmp_path / "work").mkdir()
    wrong_id = dataclasses.replace(
        config, llava=dataclasses.replace(config.llava, image_token_id=9)
    )
    task = load_vqa_task(config, config.stream[0])
    with pytest.raises(ConfigError, match=r"tokenizer\.json: .*set llava\.image_token_id=4"):
        obtain_tokenizer(wrong_id, [task], tmp_path / "work")
    assert not (tmp_path / "work" / "tokenizer.json").exists()


def test_bfloat16_backbone_trains_float32_adapters(tmp_path):
    """llava.dtype="bfloat16": frozen weights and activations in bf16 (also when restored from a
    float32 backbone folder), adapters and loss in float32, close to the float32 model."""
    _write_tasks(tmp_path, [("s_p", "pathology", 11, 16), ("s_r", "radiology", 21, 16)], 8)
    config = _tiny_llava_config(
        tmp_path, stream=[("s_p", "pathology"), ("s_r", "radiology")], steps_per_task=2
    )
    params32 = init_llava(config.llava.model_config(), jax.random.PRNGKey(0))
    save_backbone(tmp_path / "bb", params32, {"model": llava_model_json(config)})
    config = dataclasses.replace(
        config,
        llava=dataclasses.replace(config.llava, dtype="bfloat16"),
        backbone=dataclasses.replace(config.backbone, source="load", path=str(tmp_path / "bb")),
    )
    mesh = make_mesh(1)
    exp, _ = prepare_generative(config, tmp_path / "work", mesh)
    leaves = jax.tree.leaves(exp.base_params)
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), exp.base_params), params32, rtol=1e-2
    )
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(exp.fresh_adapter(0)))

    batch = next(iter(exp.train_batches([0], 1, seed=0)))
    adapter = jax.tree.map(lambda x: x + 0.05, exp.fresh_adapter(0))
    lora = stack_params([adapter, adapter])
    weights = jnp.array([1.0, 0.0])

    def loss(base, dtype):
        cfg = dataclasses.replace(config, llava=dataclasses.replace(config.llava, dtype=dtype))
        data = {**batch, "image": pixels(cfg, batch["image"])}
        variables = {"params": base, "lora": lora}
        return answer_loss(exp.model, variables, data, weights, jax.random.key(0), True)

    loss16, loss32 = loss(exp.base_params, "bfloat16"), loss(params32, "float32")
    assert loss16.dtype == jnp.float32 and abs(float(loss16) - float(loss32)) < 0.05 * float(loss32)
    outcome = run_method(exp, get_method("mslora"), None, {})
    assert np.all(np.isfinite(outcome.summary["acc_matrix"][1]))


def test_per_task_batch_size_sets_generative_batches(tmp_path):
    _write_tasks(tmp_path, [("s_p", "pathology", 11, 32), ("s_r", "radiology", 21, 32)], 4)
    config = _tiny_llava_config(tmp_path, stream=[("s_p", "pathology"), ("s_r", "radiology")])
    stream = (config.stream[0], dataclasses.replace(config.stream[1], batch_size=8))
    config = dataclasses.replace(config, stream=stream)  # train.batch_size stays 16
    tasks = [load_vqa_task(config, t) for t in config.stream]
    tokenizer = build_tokenizer([render_conversation(e) for t in tasks for e in t.examples], 512)
    params = init_llava(config.llava.model_config(), jax.random.PRNGKey(0))
    exp = GenerativeExperiment(
        config,
        tasks,
        tokenizer,
        make_mesh(1),
        params,
        select_targets(params, LLAVA_LORA_TARGETS),
        max_len=64,
        max_new_tokens=2,
    )
    assert [exp.num_steps([i]) for i in range(2)] == [2, 4]  # 32 examples, 1 epoch
    assert next(exp.train_batches([0], 1, seed=0))["input_ids"].shape == (16, 64)
    assert next(exp.train_batches([1], 1, seed=0))["input_ids"].shape == (8, 64)
