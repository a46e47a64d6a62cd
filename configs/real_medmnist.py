"""A modality-incremental stream over real biomedical images in the MedMNIST ``.npz`` layout.

The data folder is given after a colon (ml_collections passes it to ``get_config``); without it
``get_config`` raises a ValueError that says how to pass it (there is no silent default path):

    mslora-jax run --config configs/real_medmnist.py:/work/shared/data/real --workdir out/real
    mslora-jax run --config configs/real_medmnist.py:/path/to/data --workdir out/real2 \
        --config.lora.rank=8

The folder must hold breastmnist.npz, pneumoniamnist.npz, retinamnist.npz, mednist.npz and
bccd_cells.npz (keys train/val/test_images and _labels); each task's ``file`` is resolved relative
to ``data_dir``. MedNIST mixes modalities, so it is split by label into a CT-only task (AbdomenCT,
ChestCT, HeadCT) and an X-ray-only task (CXR, Hand); its MRI class is left out.

Six tasks, three modalities: radiology (CT, pediatric chest X-ray, chest/hand X-ray, breast
ultrasound), microscopy (blood cells) and ophthalmology (fundus). The order interleaves them so
that radiology recurs after tasks of other modalities: CR then has same-modality pairs
(pneumonia after CT, X-ray after pneumonia, ultrasound after X-ray) and old modalities must be
kept while new ones are learned.

Backbone: no pretrained weights can be downloaded here, so it is pretrained on the demo's
synthetic base tasks (pathology/radiology/dermatology, at 28 px): a generic stand-in, not a
biomedical foundation model; expect a frozen-backbone zero-shot accuracy near chance.

Budget: 28 px images with 7 px patches (16 image tokens), train sets capped at 3000 and test sets
at 1500 (seeded subsets), 150 steps per task. The six paper methods: 3 min 7 s on 2 CPU cores;
three seeds of all ten methods, about 20 min on a shared 2-core CPU (docs/results.md, "Real data").
"""

import ml_collections

from mslora_jax.config import synthetic_base_tasks


def _real(name, modality, file, class_names, labels=(), max_train=3000, max_test=1500):
    return dict(
        name=name,
        modality=modality,
        source="medmnist",
        file=file,
        class_names=tuple(class_names),
        labels=tuple(labels),
        max_train=max_train,
        max_test=max_test,
    )


def get_config(data_dir: str = "") -> ml_collections.ConfigDict:
    if not data_dir:
        raise ValueError(
            "configs/real_medmnist.py needs the data folder after a colon: "
            "--config configs/real_medmnist.py:/path/to/folder"
        )
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data_dir = data_dir
    # The paper's six methods, then the continual-learning baselines (docs/method.md,
    # "Methods and baselines").
    c.methods = (
        *("each", "seq", "mslora", "mslora_cr", "mslora_cr_ortho", "joint"),
        *("olora", "ewc", "lwf", "modx"),
    )
    # pathology and dermatology are only used by the synthetic base tasks (pretraining).
    c.modalities = ("radiology", "microscopy", "ophthalmology", "pathology", "dermatology")
    c.prompt_template = "a {modality} image of {label}"
    c.stream = [
        _real(
            "mednist_ct",
            "radiology",
            "mednist.npz",
            ("abdomen ct", "chest ct", "head ct"),
            labels=(0, 3, 5),
        ),
        _real(
            "bccd_cells",
            "microscopy",
            "bccd_cells.npz",
            ("red blood cell", "white blood cell", "platelet"),
        ),
        _real("pneumonia_xray", "radiology", "pneumoniamnist.npz", ("normal", "pneumonia")),
        _real(
            "retina_fundus",
            "ophthalmology",
            "retinamnist.npz",
            (
                "no retinopathy",
                "mild retinopathy",
                "moderate retinopathy",
                "severe retinopathy",
                "proliferative retinopathy",
            ),
        ),
        _real(
            "mednist_xray", "radiology", "mednist.npz", ("chest xray", "hand xray"), labels=(2, 4)
        ),
        _real(
            "breast_ultrasound", "radiology", "breastmnist.npz", ("malignant", "benign or normal")
        ),
    ]
    c.base_tasks = synthetic_base_tasks()
    c.model = dict(
        image_size=28,
        patch_size=7,
        width=64,
        depth=2,
        num_heads=4,
        mlp_dim=128,
        vocab_size=1024,
        # [CLS] + the longest prompt, "a radiology image of benign or normal" (7 words) = 8.
        max_text_len=10,
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
        # The demo's 2e-3. Tried 5e-3, 300 steps and rank 8: within a point or two per task
        # (BreastMNIST, 156 test images, stays near its 73% majority class), and at 5e-3 seq
        # collapsed (33% average), so the demo's settings stay.
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
