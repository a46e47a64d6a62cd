"""The generative (LLaVA) setting through the shared method runner, on tiny synthetic VQA data."""

import jax
import numpy as np

from mslora_jax.config import experiment_config
from mslora_jax.data.conversation import build_tokenizer, render_conversation
from mslora_jax.data.synthetic import SyntheticTaskSpec
from mslora_jax.data.synthetic_vqa import write_synthetic_vqa_task
from mslora_jax.lora.targets import select_targets
from mslora_jax.models.llava import LLAVA_LORA_TARGETS
from mslora_jax.parallel.mesh import make_mesh
from mslora_jax.train.generative import GenerativeExperiment, load_vqa_task, pretrain_llava
from mslora_jax.train.methods import get_method
from mslora_jax.train.stream import run_method


def _task(name, modality):
    return dict(name=name, modality=modality, source="vqa", primary_metric="closed_accuracy")


def test_two_stage_generative_run_lifts_the_new_task(tmp_path):
    specs = [
        ("base_p", "pathology", 900, 512),
        ("base_r", "radiology", 901, 512),
        ("s_p", "pathology", 11, 256),
        ("s_r", "radiology", 21, 256),
    ]
    for name, modality, seed, num_train in specs:
        write_synthetic_vqa_task(
            SyntheticTaskSpec(name, modality, 4, seed),
            tmp_path / name,
            image_size=16,
            num_train=num_train,
            num_test=64,
        )
    config = experiment_config(
        dict(
            stream=[_task("s_p", "pathology"), _task("s_r", "radiology")],
            base_tasks=[_task("base_p", "pathology"), _task("base_r", "radiology")],
            data_dir=str(tmp_path),
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
            train=dict(batch_size=16, steps_per_task=60, learning_rate=3e-3, eval_batch_size=64),
            pretrain=dict(steps=150, batch_size=16, learning_rate=2e-3),
            num_devices=1,
            progress=False,
        )
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
    assert first[1] is None and set(second[1]) >= {"closed_accuracy", "f1", "bleu4"}
    assert second[1]["closed_accuracy"] == after
