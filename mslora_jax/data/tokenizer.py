"""Prompts and a hashing word tokenizer for the text tower.

A hashed vocabulary needs no file and covers any class name, including names the backbone never
saw in pretraining (their embedding rows are then untrained, which is why a frozen backbone is
near chance on new tasks until an adapter is learned). Ids: 0 = padding, 1 = [CLS] (pooled),
2..vocab_size-1 = words hashed with CRC32, which is stable across processes and platforms.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

from mslora_jax.errors import ConfigError

PAD_ID = 0
CLS_ID = 1
_FIRST_WORD_ID = 2
_WORD = re.compile(r"[a-z0-9]+")


def prompt(template: str, modality: str, label: str) -> str:
    try:
        return template.format(modality=modality, label=label)
    except (KeyError, IndexError) as e:
        raise ConfigError(
            f"prompt_template {template!r} may only use {{modality}} and {{label}}"
        ) from e


def word_id(word: str, vocab_size: int) -> int:
    return _FIRST_WORD_ID + zlib.crc32(word.encode()) % (vocab_size - _FIRST_WORD_ID)


def tokenize(texts: Sequence[str], *, max_len: int, vocab_size: int) -> np.ndarray:
    """int32 ``[len(texts), max_len]``: [CLS], the lower-cased words, then padding.

    Raises ConfigError if a text has more than ``max_len - 1`` words (silent truncation could
    make two class prompts identical).
    """
    out = np.full((len(texts), max_len), PAD_ID, np.int32)
    for i, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        if len(words) > max_len - 1:
            raise ConfigError(
                f"prompt {text!r} has {len(words)} words; model.max_text_len={max_len} allows "
                f"{max_len - 1}"
            )
        out[i, 0] = CLS_ID
        out[i, 1 : len(words) + 1] = [word_id(w, vocab_size) for w in words]
    return out
