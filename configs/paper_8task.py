"""The paper's protocol: LLaVA-Med v1.5 with per-task LoRA on the language model, 8 tasks.

    mslora-jax run --config configs/paper_8task.py:/path/to/data_root --dry-run --workdir out/p8

The released order and hyperparameters (Zhang et al., ACM MM 2025): pathvqa, slake-vqarad,
derm (Fitzpatrick), PCAM, CXP, HAM, nmi (WSI-DX), iu-x-ray; LoRA rank 64 and alpha 64 on the
decoder's q, k, v, o, gate, up and down projections (vision tower, projector and lm_head frozen);
lr 2e-4 (HAM 2e-5), warmup ratio 0.03, cosine schedule; epochs per task 3, 4, 4, 1, 1, 1, 6, 9;
alpha_cr 0.1, beta_ortho 0.01.

Data root: one folder per dataset, each in the paper's format: ``train.json`` (a JSON list of
{"id", "image", "conversations"}), ``test.jsonl`` ({"question_id", "image", "text", "gt",
"answer_type"} per line) and ``images/``. The real run needs an accelerator, a LLaVA-Med v1.5
backbone converted from the released weights under ``<data_root>/llava_med_v15_backbone``
(``mslora-jax convert-llava-med``, see the README) and Mistral's ``tokenizer.json`` in that
folder; the dry run needs none of them and checks the layout.
"""

import ml_collections

from mslora_jax.models.llava import LLAVA_LORA_TARGETS

# (name, modality, epochs, learning rate, primary metric), in the released order.
_TASKS = (
    ("pathvqa", "pathology", 3, 2e-4, "f1"),
    ("slake-vqarad", "radiology", 4, 2e-4, "f1"),
    ("derm", "dermatology", 4, 2e-4, "closed_accuracy"),
    ("PCAM", "pathology", 1, 2e-4, "closed_accuracy"),
    ("CXP", "radiology", 1, 2e-4, "closed_accuracy"),
    ("HAM", "dermatology", 1, 2e-5, "closed_accuracy"),
    ("nmi", "pathology", 6, 2e-4, "closed_accuracy"),
    ("iu-x-ray", "radiology", 9, 2e-4, "bleu1"),
)


def get_config(data_root: str = "data/paper_8task") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data_dir = data_root
    c.model_kind = "llava"
    c.methods = ("mslora_cr_ortho",)
    c.modalities = ("pathology", "radiology", "dermatology")
    c.stream = [
        dict(
            name=name,
            modality=modality,
            source="vqa",
            epochs=float(epochs),
            learning_rate=lr,
            primary_metric=metric,
        )
        for name, modality, epochs, lr, metric in _TASKS
    ]
    c.llava = dict(
        # CLIP ViT-L/14 at 336 px (576 patch tokens from the penultimate layer), in the layout
        # of OpenAI's released towers.
        vision=dict(
            image_size=336,
            patch_size=14,
            width=1024,
            depth=24,
            num_heads=16,
            mlp_dim=4096,
            patch_bias=False,
            pre_norm=True,
            mlp_activation="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        vision_layer=-2,
        # Mistral-7B (Instruct v0.2 settings).
        decoder=dict(
            vocab_size=32000,
            width=4096,
            depth=32,
            num_heads=32,
            num_kv_heads=8,
            mlp_dim=14336,
            max_len=32768,
            rope_theta=1e6,
        ),
        # Mistral's tokenizer has no <image> token: the placeholder gets LLaVA's id -200.
        image_token_id=-200,
        pad_to_square=True,  # LLaVA v1.5's image_aspect_ratio="pad"
        template="mistral_instruct",  # LLaVA-Med v1.5's conversation template
        # CLIP's image normalization (openai/clip-vit-large-patch14-336's preprocessor).
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
        tokenizer_file=f"{data_root}/llava_med_v15_backbone/tokenizer.json",
        remat=True,  # recompute decoder blocks in the backward pass (activation memory)
        dtype="bfloat16",  # frozen backbone and activations (LLaVA trains with --bf16)
    )
    c.lora = dict(rank=64, alpha=64.0, targets=LLAVA_LORA_TARGETS)
    c.regularizer = dict(alpha_cr=0.1, beta_ortho=0.01)
    c.train = dict(batch_size=16, learning_rate=2e-4, warmup_ratio=0.03, epochs=1.0)
    c.backbone = dict(source="load", path=f"{data_root}/llava_med_v15_backbone")
    c.progress = True
    return c
