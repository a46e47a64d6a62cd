"""The embedded default: a synthetic modality-incremental stream, no downloads.

Two-plus modalities with two tasks each, learned one after another on a backbone pretrained on
separate base tasks. Sized to run every method in a few minutes on 2 CPU cores.

    mslora-jax run --config configs/demo.py --workdir out/demo
    mslora-jax run --config configs/demo.py --workdir out/demo2 --config.lora.rank=4
"""

import ml_collections

from mslora_jax.config import synthetic_base_tasks, synthetic_task


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # The paper's six methods, then the continual-learning baselines (docs/method.md,
    # "Methods and baselines").
    c.methods = (
        *("each", "seq", "mslora", "mslora_cr", "mslora_cr_ortho", "joint"),
        *("olora", "ewc", "lwf", "modx"),
    )
    c.modalities = ("pathology", "radiology", "dermatology")
    c.prompt_template = "a {modality} image of {label}"
    # The stream: modalities interleaved, so a method must keep old modalities while learning new.
    c.stream = [
        synthetic_task("path_a", "pathology", seed=101),
        synthetic_task("rad_a", "radiology", seed=201),
        synthetic_task("derm_a", "dermatology", seed=301),
        synthetic_task("path_b", "pathology", seed=102),
        synthetic_task("rad_b", "radiology", seed=202),
    ]
    # Pretraining only (never part of the stream): what a pretrained backbone would have seen.
    c.base_tasks = synthetic_base_tasks()
    c.model = dict(
        image_size=16,
        patch_size=4,
        width=64,
        depth=2,
        num_heads=4,
        mlp_dim=128,
        vocab_size=1024,
        max_text_len=8,
        text_width=64,
        text_depth=1,
        text_num_heads=4,
        text_mlp_dim=128,
        embed_dim=64,
    )
    c.lora = dict(rank=4, alpha=8.0, targets=(r"attn/(q|k|v|out)$", r"mlp/(fc1|fc2)$"))
    c.regularizer = dict(alpha_cr=0.1, beta_ortho=0.01, learn_weights=False)
    c.train = dict(
        batch_size=64,
        steps_per_task=150,
        learning_rate=2e-3,
        warmup_ratio=0.03,
        eval_batch_size=256,
    )
    c.pretrain = dict(steps=600, batch_size=64, learning_rate=1e-3)
    c.backbone = dict(source="pretrain")
    c.num_devices = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)  # (data, fsdp, tensor); -1 = the rest
    c.progress = True
    return c
