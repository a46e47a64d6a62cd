"""A pathology/microscopy stream read from prepared TFDS datasets: PCAM (the paper's PCAM task,
as classification), malaria cell images and Kather's colorectal histology tiles.

The TFDS data folder is given after a colon (ml_collections passes it to ``get_config``):

    mslora-jax run --config configs/pcam_tfds.py:/data/tfds --workdir out/pcam --dry-run

The datasets must be prepared there beforehand in the ``array_record`` format (random access;
``tfds build`` writes ``tfrecord`` unless told otherwise). Generating them downloads the sources
and needs TensorFlow (tfds encodes the images with it) and h5py for PCAM; reading them here
needs neither:

    pip install tensorflow-cpu h5py importlib_resources
    tfds build patch_camelyon malaria colorectal_histology --data_dir=/data/tfds \\
        --file_format=array_record

(``importlib_resources``: tfds 4.9's catalog builders import it on Python 3.11 but do not
install it.) Each task's ``tfds_name`` is looked up under ``data_dir`` (``tfds_data_dir`` would
name a subfolder), from the prepared files alone.

PCAM's label feature has no names ("0", "1"), so its class names are given (label 1: tumour
tissue in the centre 32x32 px of the patch); malaria keeps its feature's names; malaria and
colorectal_histology have one split, so ``train_split``/``test_split`` slice it (TFDS split
syntax). Train sets are capped at 3000 and test sets at 1500 (seeded subsets: only those
records are decoded) and images resized to 32 px as they are read; PCAM in full is 262,144 train
images of 96x96x3 (7.2 GB in memory).

Not run here (no downloads in this environment): its results are not measured. The backbone is
pretrained on the synthetic base tasks, as in configs/real_medmnist.py.
"""

import ml_collections

from mslora_jax.config import synthetic_base_tasks


def _tfds(name, modality, tfds_name, class_names=(), **splits):
    return dict(
        name=name,
        modality=modality,
        source="tfds",
        tfds_name=tfds_name,
        class_names=tuple(class_names),  # empty: the label feature's names
        max_train=3000,
        max_test=1500,
        **splits,
    )


def get_config(data_dir: str = "") -> ml_collections.ConfigDict:
    if not data_dir:
        raise ValueError(
            "configs/pcam_tfds.py needs the TFDS data folder after a colon: "
            "--config configs/pcam_tfds.py:/path/to/tfds"
        )
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data_dir = data_dir
    c.methods = ("each", "seq", "mslora", "mslora_cr", "mslora_cr_ortho", "joint")
    # radiology and dermatology are only used by the synthetic base tasks (pretraining).
    c.modalities = ("pathology", "microscopy", "radiology", "dermatology")
    c.prompt_template = "a {modality} image of {label}"
    c.stream = [
        _tfds(
            "pcam",
            "pathology",
            "patch_camelyon",
            ("normal lymph node", "lymph node metastasis"),
            test_split="test",  # or "validation" (32,768 patches)
        ),
        _tfds(
            "malaria",
            "microscopy",
            "malaria",
            train_split="train[:80%]",
            test_split="train[80%:]",
        ),
        _tfds(
            "colorectal",
            "pathology",
            "colorectal_histology",
            (
                "tumour epithelium",
                "simple stroma",
                "complex stroma",
                "immune cells",
                "debris and mucus",
                "normal mucosa",
                "adipose tissue",
                "background",
            ),
            train_split="train[:80%]",
            test_split="train[80%:]",
        ),
    ]
    c.base_tasks = synthetic_base_tasks()
    c.model = dict(
        image_size=32,
        patch_size=8,
        width=64,
        depth=2,
        num_heads=4,
        mlp_dim=128,
        vocab_size=1024,
        # [CLS] + the longest prompt, "a pathology image of lymph node metastasis" (7 words).
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
