"""The paper's protocol: LLaVA-Med v1.5 with per-task LoRA on the language model, 8 tasks.

    mslora-jax run --config configs/paper_8task.py:/path/to/data_root --dry-run --workdir out/p8

The released order and hyperparameters (Zhang et al., ACM MM 2025): pathvqa, slake-vqarad,
derm (Fitzpatrick), PCAM, CXP, HAM, nmi (WSI-DX), iu-x-ray; LoRA rank 64 and alpha 64 on the
decoder's q, k, v, o, gate, up and down projections (vision tower, projector and lm_head frozen);
lr 2e-4 (HAM 2e-5), warmup ratio 0.03, cosine schedule; epochs per task 3, 4, 4, 1, 1, 1, 6, 9;
batch size per task 24, 24, 24, 24, 24, 16, 16, 16 (one device, no gradient accumulation);
alpha_cr 0.1, beta_ortho 0.01; LoRA dropout 0, no weight decay, gradient clipping at 1.0 (the
Hugging Face Trainer's default max_grad_norm), bf16, gradient checkpointing; model_max_length
2048; greedy answers of up to 100 new tokens. Where this config still departs from the released
scripts: docs/generative.md, "Where the config departs from the released scripts".

Data root: one folder per dataset, each in the paper's format: ``train.json`` (a JSON list of
{"id", "image", "conversations"}), ``test.jsonl`` ({"question_id", "image", "text", "gt",
"answer_type"} per line) and ``images/``. The real run needs an accelerator, a LLaVA-Med v1.5
backbone converted from the released weights under ``<data_root>/llava_med_v15_backbone``
(``mslora-jax convert-llava-med``, see docs/generative.md) and Mistral's ``tokenizer.json`` in that
folder; the dry run needs none of them and checks the layout.
"""

import ml_collections

from mslora_jax.models.llava import LLAVA_LORA_TARGETS

# (name, modality, epochs, learning rate, batch size, primary metric), in the released order
# (scripts/finetune_mslora_cr_ortho.sh: per_device_train_batch_size on one device).
_TASKS = (
    ("pathvqa", "pathology", 3, 2e-4, 24, "f1"),
    ("slake-vqarad", "radiology", 4, 2e-4, 24, "f1"),
    ("derm", "dermatology", 4, 2e-4, 24, "closed_accuracy"),
    ("PCAM", "pathology", 1, 2e-4, 24, "closed_accuracy"),
    ("CXP", "radiology", 1, 2e-4, 24, "closed_accuracy"),
    ("HAM", "dermatology", 1, 2e-5, 16, "closed_accuracy"),
    ("nmi", "pathology", 6, 2e-4, 16, "closed_accuracy"),
    ("iu-x-ray", "radiology", 9, 2e-4, 16, "bleu1"),
)
# LLaVA's model_max_length: text tokens of a training sequence, the one <image> placeholder
# included (the 576 patch tokens replace it afterwards); longer conversations are cut.
_MAX_TEXT_TOKENS = 2048
_MAX_NEW_TOKENS = 100  # the released eval_mslora_cr.py: greedy, max_new_tokens=100


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
            batch_size=batch_size,
            primary_metric=metric,
        )
        for name, modality, epochs, lr, batch_size, metric in _TASKS
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
        # Mistral-7B (Instruct v0.2 settings). max_len bounds a sequence with its 575 extra image
        # tokens and the generated answer: 32768 >= 2048 + 575 + 100.
        decoder=dict(
            vocab_size=32000,
            width=4096,
            depth=32,
            num_heads=32,
            num_kv_heads=8,
            mlp_dim=14336,
            max_len=32768,
            rope_theta=1e6,
            # Blocks under nn.scan, parameters on a layer axis (False: block_i modules, the
            # layout of workdirs written before the scan).
            scan_layers=True,
        ),
        # Mistral's tokenizer has no <image> token: the placeholder gets LLaVA's id -200.
        image_token_id=-200,
        pad_to_square=True,  # LLaVA v1.5's image_aspect_ratio="pad"
        template="mistral_instruct",  # LLaVA-Med v1.5's conversation template
        # CLIP's image normalization (openai/clip-vit-large-patch14-336's preprocessor).
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
        tokenizer_file=f"{data_root}/llava_med_v15_backbone/tokenizer.json",
        max_len=_MAX_TEXT_TOKENS,
        max_new_tokens=_MAX_NEW_TOKENS,
        remat=True,  # recompute decoder blocks in the backward pass (activation memory)
        # Attention scores 512 queries at a time: the float32 [heads, 2623, 2623] scores of one
        # layer are what overflows a 16 GiB chip otherwise (docs/scaling.md, "Proof of fit").
        attention_chunk=512,
        # None: XLA's attention. On TPUs, --config.llava.attention_kernel=splash uses the Pallas
        # flash-attention kernel for training instead (docs/method.md, "How a stage computes"); a
        # placeholder so that the command line may set a string.
        attention_kernel=ml_collections.config_dict.placeholder(str),
        dtype="bfloat16",  # frozen backbone and activations (LLaVA trains with --bf16)
    )
    # The released evaluator's metric definitions (report_results.py), so the numbers compare
    # with the paper's table; "clean" for ours (mslora_jax.eval.answer_metrics).
    c.eval = dict(metrics="released")
    c.lora = dict(rank=64, alpha=64.0, targets=LLAVA_LORA_TARGETS, dropout=0.0)
    c.regularizer = dict(alpha_cr=0.1, beta_ortho=0.01)
    # Per-task batch sizes are in the stream; batch_size here serves `joint` (whose tasks
    # disagree), as the released scripts train no joint model.
    c.train = dict(
        batch_size=16,
        learning_rate=2e-4,
        warmup_ratio=0.03,
        epochs=1.0,
        weight_decay=0.0,
        grad_clip_norm=1.0,  # the HF Trainer's default max_grad_norm, unchanged by the scripts
        # Greedy answers for 64 prompts of 2048 tokens at a time: 9.34 GiB per v5e chip on an
        # all-fsdp v5e-8 (docs/scaling.md, "Proof of fit"; 256 prompts needed 28.7 GiB, unrolled).
        eval_batch_size=64,
    )
    c.backbone = dict(source="load", path=f"{data_root}/llava_med_v15_backbone")
    # Every device on fsdp: each holds 1/N of the frozen 7B backbone and of each batch
    # (docs/scaling.md, "Proof of fit", sizes this on TPU v5e-8 and v4-8): on a v5e-8 (16 GiB a
    # chip) a step of batch 24 needs 7.56 GiB, of batch 16 6.27 GiB.
    c.num_devices = 0
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    # Preemptible TPUs: save the stage in progress every 200 steps too (and always at a
    # stage's end and on SIGTERM); a rerun with the same --workdir continues from the newest.
    c.checkpoint = dict(every_steps=200, keep=2)
    c.progress = True
    return c
