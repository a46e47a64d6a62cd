"""Synthetic generative-VQA tasks in the paper's (LLaVA-Med) file format, for CPU demos and tests.

``write_synthetic_vqa_task`` renders a task with ``make_synthetic_task`` and writes ::

    folder/images/train_000000.png ...   Pillow PNGs
    folder/images/test_000000.png ...
    folder/train.json                    JSON list of {"id", "image", "conversations"}
    folder/test.jsonl                    {"question_id", "image", "text", "gt", "answer_type",
                                          "candidates"} per line

Image paths in the files are relative to ``folder/images``, as ``read_train_file`` and
``read_test_file`` expect for ``image_dir=folder/images``. Each sample gets one question:

* OPEN   "What is shown in this {modality} image?"        gt: the class name (a pseudo-word)
* CLOSED "Is this {class_a} or {class_b}?"                gt: the true class, candidates [a, b]
* CLOSED "Is there {class} in this {modality} image?"     gt: "yes" / "no", candidates [yes, no]

Per split, exactly ``round(open_fraction * n)`` questions are OPEN; the closed ones alternate
between the two kinds and the yes/no answers alternate, so both are balanced to within one, and
the kinds are then shuffled over the samples. Everything depends only on the spec and the sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from PIL import Image

from mslora_jax.data.synthetic import MODALITIES, SyntheticTaskSpec, make_synthetic_task
from mslora_jax.errors import ConfigError, DataError

IMAGE_DIR = "images"
TRAIN_FILE = "train.json"
TEST_FILE = "test.jsonl"

# Seed streams for the questions, kept apart from synthetic.py's streams (0..3 and their chunks).
_QUESTIONS_TRAIN, _QUESTIONS_TEST = 1001, 1002
# Question kinds.
_OPEN, _CHOICE, _YES_NO = range(3)


def write_synthetic_vqa_task(
    spec: SyntheticTaskSpec,
    folder: str | os.PathLike,
    *,
    image_size: int,
    num_train: int,
    num_test: int,
    open_fraction: float = 0.5,
) -> dict[str, Any]:
    """Writes a synthetic VQA task into ``folder`` (which must not exist or be empty).

    The files are written to a temporary sibling folder that is renamed into place at the end, so
    ``folder`` is either absent/empty or complete. Returns a summary: the paths, the counts per
    split and answer type, and the class names.
    """
    if not 0.0 <= open_fraction <= 1.0:
        raise ConfigError(
            f"synthetic VQA task {spec.name!r}: open_fraction must be in [0, 1], "
            f"got {open_fraction}"
        )
    if num_train < 1 or num_test < 1:
        raise ConfigError(
            f"synthetic VQA task {spec.name!r}: num_train and num_test must be >= 1 (the readers "
            f"reject empty files), got {num_train} and {num_test}"
        )
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise DataError(f"{folder}: already exists and is not an empty folder; will not overwrite")

    task = make_synthetic_task(spec, image_size=image_size, num_train=num_train, num_test=num_test)
    names = task.class_names
    train_q = _questions(
        _rng(spec, _QUESTIONS_TRAIN), task.train_labels, names, spec.modality, open_fraction
    )
    test_q = _questions(
        _rng(spec, _QUESTIONS_TEST), task.test_labels, names, spec.modality, open_fraction
    )

    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    try:
        os.mkdir(os.path.join(tmp, IMAGE_DIR))
        train_records = []
        for index, (image, (question, answer, _, _)) in enumerate(zip(task.train_images, train_q)):
            file = _save_png(tmp, f"train_{index:06d}.png", image)
            train_records.append(
                {
                    "id": str(index),
                    "image": file,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
        test_lines = []
        for index, (image, (question, answer, answer_type, candidates)) in enumerate(
            zip(task.test_images, test_q)
        ):
            file = _save_png(tmp, f"test_{index:06d}.png", image)
            record = {
                "question_id": index,
                "image": file,
                "text": question,
                "gt": answer,
                "answer_type": answer_type,
                "candidates": candidates,
            }
            test_lines.append(json.dumps(record))
        with open(os.path.join(tmp, TRAIN_FILE), "w", encoding="utf-8") as f:
            json.dump(train_records, f, indent=1)
        with open(os.path.join(tmp, TEST_FILE), "w", encoding="utf-8") as f:
            f.write("\n".join(test_lines) + "\n")
        # mkdtemp makes the folder 0700; give it the usual permissions before it goes public.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if os.path.isdir(folder):
            os.rmdir(folder)  # empty (checked above); fails loudly if someone filled it meanwhile
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    def counts(qs: list[tuple[str, str, str, list[str]]]) -> dict[str, int]:
        return {t: sum(q[2] == t for q in qs) for t in ("OPEN", "CLOSED")}

    return {
        "folder": folder,
        "image_dir": os.path.join(folder, IMAGE_DIR),
        "train_file": os.path.join(folder, TRAIN_FILE),
        "test_file": os.path.join(folder, TEST_FILE),
        "name": spec.name,
        "modality": spec.modality,
        "class_names": list(names),
        "num_train": num_train,
        "num_test": num_test,
        "train_answer_types": counts(train_q),
        "test_answer_types": counts(test_q),
    }


def _rng(spec: SyntheticTaskSpec, stream: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, MODALITIES.index(spec.modality), stream])


def _questions(
    rng: np.random.Generator,
    labels: np.ndarray,
    names: tuple[str, ...],
    modality: str,
    open_fraction: float,
) -> list[tuple[str, str, str, list[str]]]:
    """One (question, answer, answer_type, candidates) per label; see the module docstring."""
    n = len(labels)
    num_open = int(round(open_fraction * n))
    closed = np.arange(n - num_open)
    # Closed slots alternate choice / yes-no; yes-no slots alternate yes / no.
    kinds = np.concatenate([np.full(num_open, _OPEN), np.where(closed % 2 == 0, _CHOICE, _YES_NO)])
    says_yes = np.concatenate([np.zeros(num_open, bool), (closed // 2) % 2 == 0])
    order = rng.permutation(n)
    kinds, says_yes = kinds[order], says_yes[order]
    # A random other class per sample: the distractor of a choice or the subject of a "no".
    others = (labels + rng.integers(1, len(names), n)) % len(names)
    true_first = rng.random(n) < 0.5

    out = []
    for label, other, kind, yes, first in zip(labels, others, kinds, says_yes, true_first):
        true_name, other_name = names[label], names[other]
        if kind == _OPEN:
            out.append((f"What is shown in this {modality} image?", true_name, "OPEN", []))
        elif kind == _CHOICE:
            pair = [true_name, other_name] if first else [other_name, true_name]
            out.append((f"Is this {pair[0]} or {pair[1]}?", true_name, "CLOSED", pair))
        else:
            subject = true_name if yes else other_name
            question = f"Is there {subject} in this {modality} image?"
            out.append((question, "yes" if yes else "no", "CLOSED", ["yes", "no"]))
    return out


def _save_png(root: str, file: str, image: np.ndarray) -> str:
    # compress_level=1: these are tiny, and the default level costs several times more time.
    Image.fromarray(image).save(os.path.join(root, IMAGE_DIR, file), compress_level=1)
    return file
