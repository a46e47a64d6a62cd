"""CPU demo of the paper's generative setting: a tiny LLaVA answering questions about images.

    mslora-jax run --config configs/demo_generative.py --workdir out/demo_generative

Synthetic image tasks (the demo's generator) become VQA tasks in the paper's file format under
``<workdir>/data`` (closed yes/no and either-or questions, open "what is shown" questions); a
tiny LLaVA (ViT + mlp2x_gelu projector + Mistral-style decoder) is pretrained on separate base
tasks, then each stream task gets its own LoRA in the decoder.
"""

import ml_collections

from mslora_jax.config import synthetic_base_tasks, synthetic_task
from mslora_jax.models.llava import LLAVA_LORA_TARGETS


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model_kind = "llava"
    c.methods = ("each", "seq", "mslora", "mslora_cr", "mslora_cr_ortho", "joint")
    c.modalities = ("pathology", "radiology", "dermatology")
    c.stream = [
        {
            **synthetic_task("path_a", "pathology", seed=101, num_train=512, num_test=256),
            "primary_metric": "closed_accuracy",
        },
        {
            **synthetic_task("rad_a", "radiology", seed=201, num_train=512, num_test=256),
            "primary_metric": "closed_accuracy",
        },
        {
            **synthetic_task("path_b", "pathology", seed=102, num_train=512, num_test=256),
            "primary_metric": "closed_accuracy",
        },
    ]
    c.base_tasks = synthetic_base_tasks(("pathology", "radiology"), num_classes=4, num_train=768)
    c.llava = dict(
        vision=dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64),
        vision_layer=-2,
        decoder=dict(
            vocab_size=512,
            width=64,
            depth=2,
            num_heads=4,
            num_kv_heads=2,
            mlp_dim=128,
            max_len=256,
            # Blocks under nn.scan, parameters on a layer axis (False: block_i modules, the
            # layout of workdirs written before the scan).
            scan_layers=True,
        ),
        image_token_id=4,
        # A short system line instead of LLaVA's ~90-token one: sequences shrink from ~160 text
        # tokens to under 64, which is what makes the demo fit in a few CPU minutes.
        system_prompt="A medical image chat.",
        max_len=32,
        max_new_tokens=6,
        tokenizer_vocab_size=512,
    )
    c.lora = dict(rank=8, alpha=16.0, targets=LLAVA_LORA_TARGETS)
    c.regularizer = dict(alpha_cr=0.1, beta_ortho=0.01)
    c.train = dict(batch_size=16, steps_per_task=200, learning_rate=5e-3, eval_batch_size=64)
    c.pretrain = dict(steps=500, batch_size=16, learning_rate=2e-3)
    c.backbone = dict(source="pretrain")
    c.num_devices = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)  # (data, fsdp, tensor); -1 = the rest
    c.progress = True
    return c
