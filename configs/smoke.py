"""A seconds-long smoke variant of the demo for CPU checks and tests (not for conclusions).

mslora-jax run --config configs/smoke.py --workdir /tmp/smoke
"""

import functools

import ml_collections

from mslora_jax.config import synthetic_task

_task = functools.partial(synthetic_task, num_classes=3, num_train=256, num_test=128)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.methods = ("each", "seq", "mslora", "mslora_cr", "mslora_cr_ortho", "joint")
    c.modalities = ("pathology", "radiology")
    c.stream = [
        _task("path_a", "pathology", seed=11),
        _task("rad_a", "radiology", seed=21),
        _task("path_b", "pathology", seed=12),
    ]
    c.base_tasks = [
        _task("base_path", "pathology", seed=500, num_classes=4),
        _task("base_rad", "radiology", seed=600, num_classes=4),
    ]
    c.model = dict(
        image_size=8,
        patch_size=4,
        width=32,
        depth=1,
        num_heads=2,
        mlp_dim=64,
        vocab_size=256,
        max_text_len=8,
        text_width=32,
        text_depth=1,
        text_num_heads=2,
        text_mlp_dim=64,
        embed_dim=32,
    )
    c.lora = dict(rank=2, alpha=4.0)
    c.regularizer = dict(alpha_cr=0.1, beta_ortho=0.01)
    c.train = dict(batch_size=32, steps_per_task=20, learning_rate=3e-3, eval_batch_size=64)
    c.pretrain = dict(steps=30, batch_size=32, learning_rate=2e-3)
    c.backbone = dict(source="pretrain")
    c.num_devices = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)  # (data, fsdp, tensor); -1 = the rest
    c.progress = False
    return c
