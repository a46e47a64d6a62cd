"""Readers for the generative (LLaVA-Med style) VQA data: a training JSON, a test JSONL, images.

Training file: a JSON list of records ::

    {"id": "17", "image": "rad/img_0017.png",
     "conversations": [{"from": "human", "value": "<image>\\nIs this a CT scan?"},
                       {"from": "gpt", "value": "Yes."}, ... more human/gpt turns]}

Test file: JSON lines, one record per line ::

    {"question_id": 3, "image": "rad/img_0003.png", "text": "Is there a fracture?",
     "gt": "no", "answer_type": "CLOSED", "candidates": ["yes", "no"]}   # candidates optional

Image paths are relative to an image folder; the readers return them joined with it. Every
problem is a ``DataError`` naming the file and the list index (JSON) or line number (JSONL).
Question and answer texts are stripped of surrounding whitespace; nothing else is changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from mslora_jax.errors import ConfigError, DataError

IMAGE_TOKEN = "<image>"
# Background of pad_to_square: the CLIP image mean in 0..255, as LLaVA pads with.
PAD_COLOR = (122, 116, 104)
ANSWER_TYPES = ("OPEN", "CLOSED")
_ROLES = ("human", "gpt")


@dataclass(frozen=True)
class VqaExample:
    """One training conversation about one image.

    ``image`` is the path joined with the image folder. ``turns`` are (question, answer) pairs;
    the first question holds the single ``<image>`` placeholder, where the file put it.
    """

    id: str
    image: str
    turns: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class VqaTestItem:
    """One test question; ``answer_type`` is "OPEN" or "CLOSED", ``candidates`` may be empty.

    ``question`` is the file's ``text``; it holds at most one ``<image>`` (usually none: the
    prompt builder adds it).
    """

    question_id: str
    image: str
    question: str
    gt: str
    answer_type: str
    candidates: tuple[str, ...] = ()


def read_train_file(
    path: str | os.PathLike, image_dir: str | os.PathLike, check_images: bool = True
) -> list[VqaExample]:
    """Reads a training JSON list into ``VqaExample``s; ``check_images`` checks each file exists."""
    records = _load_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: the file holds no records")
    examples = []
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        record = _require(record, ("id", "image", "conversations"), where)
        ex_id = _id(record["id"], "id", where)
        where = f"{path}: record {index} (id {ex_id!r})"
        image = _image_path(record["image"], image_dir, check_images, where)
        turns = _turns(record["conversations"], where)
        examples.append(VqaExample(id=ex_id, image=image, turns=turns))
    return examples


def read_test_file(
    path: str | os.PathLike, image_dir: str | os.PathLike, check_images: bool = True
) -> list[VqaTestItem]:
    """Reads a test JSONL into ``VqaTestItem``s; blank lines are skipped, ids must be unique.

    ``answer_type`` is matched case-insensitively and stored upper-case. ``question_id`` and
    ``gt`` may be strings or integers (stored as strings).
    """
    items: list[VqaTestItem] = []
    seen: dict[str, int] = {}
    for number, where, record in jsonl_records(path):
        record = _require(record, ("question_id", "image", "text", "gt", "answer_type"), where)
        qid = _id(record["question_id"], "question_id", where)
        if qid in seen:
            raise DataError(f"{where}: question_id {qid!r} already used on line {seen[qid]}")
        seen[qid] = number
        where = f"{path}: line {number} (question_id {qid!r})"
        question = _text(record["text"], "text", where)
        if question.count(IMAGE_TOKEN) > 1:
            raise DataError(f"{where}: 'text' holds {IMAGE_TOKEN} more than once")
        answer_type = record["answer_type"]
        if not isinstance(answer_type, str) or answer_type.upper() not in ANSWER_TYPES:
            raise DataError(f"{where}: answer_type must be OPEN or CLOSED, got {answer_type!r}")
        candidates = record.get("candidates", [])
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise DataError(f"{where}: 'candidates' must be a list of strings, got {candidates!r}")
        items.append(
            VqaTestItem(
                question_id=qid,
                image=_image_path(record["image"], image_dir, check_images, where),
                question=question,
                gt=_id(record["gt"], "gt", where).strip(),
                answer_type=answer_type.upper(),
                candidates=tuple(candidates),
            )
        )
    if not items:
        raise DataError(f"{path}: the file holds no records")
    return items


def load_image(path: str | os.PathLike, image_size: int, pad_to_square: bool = False) -> np.ndarray:
    """Reads an image as uint8 ``[image_size, image_size, 3]`` RGB.

    The image is resized to a square with Pillow's bicubic filter (antialiased when shrinking).
    By default it is resized straight, not keeping the aspect ratio (most medical images are
    near-square); with ``pad_to_square`` it is first centred on a square of ``PAD_COLOR``, as
    LLaVA's ``image_aspect_ratio="pad"`` does. Alpha is dropped, grayscale is repeated to 3
    channels, and 16-bit grayscale is mapped 0..65535 -> 0..255 (Pillow's own conversion would
    clip it).
    """
    if image_size < 1:
        raise ConfigError(f"load_image: image_size must be >= 1, got {image_size}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I;16"):
                wide = np.asarray(image, dtype=np.float32)
                image = Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), mode="L")
            rgb = image.convert("RGB")
            if pad_to_square:
                rgb = _expand_to_square(rgb)
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot read image ({error})") from None
    return np.asarray(rgb, dtype=np.uint8)


def _expand_to_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), PAD_COLOR)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _read_text(path: str | os.PathLike) -> str:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read file ({error})") from None


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[int, str, Any]]:
    """(line number, "PATH: line N", parsed value) of each non-blank line of a JSON-lines file;
    a malformed line raises ``DataError`` naming it."""
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{where}: malformed JSON ({error.msg} at column {error.colno})"
            ) from None
        yield number, where, record


def _load_json(path: str | os.PathLike) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: malformed JSON at line {error.lineno} column {error.colno} ({error.msg})"
        ) from None


def _require(record: Any, keys: tuple[str, ...], where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise DataError(f"{where}: missing key {missing[0]!r} (record has {sorted(record)})")
    return record


def _id(value: Any, key: str, where: str) -> str:
    # bool is an int subclass; True as an id is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: {key!r} must be a string or integer, got {value!r}")
    return str(value)


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value.strip()


def _image_path(value: Any, image_dir: str | os.PathLike, check: bool, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: 'image' must be a non-empty path string, got {value!r}")
    full = os.path.join(os.fspath(image_dir), value)
    if check and not os.path.isfile(full):
        raise DataError(f"{where}: image {value!r} not found (looked for {full})")
    return full


def _turns(conversations: Any, where: str) -> tuple[tuple[str, str], ...]:
    """Checks human/gpt alternation and the single ``<image>`` in the first question."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    values = []
    for position, turn in enumerate(conversations):
        turn_where = f"{where}: conversations[{position}]"
        turn = _require(turn, ("from", "value"), turn_where)
        expected = _ROLES[position % 2]
        if turn["from"] != expected:
            raise DataError(
                f"{turn_where}: expected 'from' {expected!r} (turns must alternate human, gpt, "
                f"starting with human), got {turn['from']!r}"
            )
        values.append(_text(turn["value"], "value", turn_where))
    if len(values) % 2:
        raise DataError(f"{where}: the last human turn has no gpt answer")
    counts = [value.count(IMAGE_TOKEN) for value in values]
    if counts[0] != 1:
        raise DataError(
            f"{where}: the first human turn must hold {IMAGE_TOKEN} exactly once, found {counts[0]}"
        )
    if any(counts[1:]):
        position = 1 + next(i for i, c in enumerate(counts[1:]) if c)
        raise DataError(
            f"{where}: conversations[{position}] holds {IMAGE_TOKEN}; only the first human turn may"
        )
    return tuple(zip(values[0::2], values[1::2]))
