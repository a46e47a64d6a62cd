"""The generative setting at a size that uses one TPU host (Colab TPU, v5e-8, v4-8), FSDP-sharded.

    mslora-jax run --config configs/colab_tpu.py --workdir out/colab_tpu

About 40x the CPU demo's decoder (width 1024, 8 blocks, 16 heads, GQA over 4 KV heads, SwiGLU
2816; ~170 M frozen parameters with the vision tower), 64x64 images in 8x8 patches (64 image
tokens), bf16 with rematerialized decoder blocks, batch 64 split over every chip of the host
(``mesh.fsdp=-1``: parameters and batch sharded over all devices). Synthetic VQA tasks written in
the paper's file format, as in ``configs/demo_generative.py``; the backbone is random unless
``backbone.source`` says otherwise (a stage's cost, not its accuracy, is what this config shows).
"""

import ml_collections

from mslora_jax.config import synthetic_base_tasks, synthetic_task
from mslora_jax.models.llava import LLAVA_LORA_TARGETS


def _vqa_task(name: str, modality: str, seed: int) -> dict:
    return {
        **synthetic_task(name, modality, seed=seed, num_train=2048, num_test=256),
        "primary_metric": "closed_accuracy",
    }


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model_kind = "llava"
    c.methods = ("mslora_cr_ortho",)
    c.modalities = ("pathology", "radiology")
    c.stream = [
        _vqa_task("path_a", "pathology", 101),
        _vqa_task("rad_a", "radiology", 201),
    ]
    c.base_tasks = synthetic_base_tasks(("pathology", "radiology"), num_classes=4, num_train=1024)
    c.llava = dict(
        vision=dict(image_size=64, patch_size=8, width=256, depth=4, num_heads=4, mlp_dim=1024),
        vision_layer=-2,
        decoder=dict(
            vocab_size=4096,
            width=1024,
            depth=8,
            num_heads=16,
            num_kv_heads=4,
            mlp_dim=2816,
            max_len=256,
            # Blocks under nn.scan, parameters on a layer axis (False: block_i modules, the
            # layout of workdirs written before the scan).
            scan_layers=True,
        ),
        image_token_id=4,
        system_prompt="A medical image chat.",
        max_len=64,
        max_new_tokens=8,
        tokenizer_vocab_size=1024,
        dtype="bfloat16",
        remat=True,
    )
    c.lora = dict(rank=16, alpha=32.0, targets=LLAVA_LORA_TARGETS)
    c.regularizer = dict(alpha_cr=0.1, beta_ortho=0.01)
    c.train = dict(
        batch_size=64,
        steps_per_task=100,
        learning_rate=2e-3,
        eval_batch_size=128,
        grad_clip_norm=1.0,
    )
    c.pretrain = dict(steps=200, batch_size=64, learning_rate=1e-3)
    c.backbone = dict(source="random")
    c.num_devices = 0
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    # Preemptible TPUs: save the stage in progress every 50 steps too (and always at a
    # stage's end and on SIGTERM); a rerun with the same --workdir continues from the newest.
    c.checkpoint = dict(every_steps=50, keep=2)
    c.progress = True
    return c
