"""Class prompts -> token ids for the dual encoder's text tower, as the backbone dictates.

The default text tower reads hashed words (``data.tokenizer``, no file). Any other tower
(``ModelConfig.text_tower``, e.g. the released CLIP's or a BERT's) reads the ids of the tokenizer
it was trained with: ``tokenizer.json`` in the backbone folder (``backbone.path``), applied with
its own normalizer and special tokens (CLIP: ``<|startoftext|>`` ... ``<|endoftext|>``; BERT
WordPiece: ``[CLS]`` ... ``[SEP]``) and right-padded to ``model.max_text_len`` with its padding id
(``padding.pad_id`` in the file; 0 if it sets none).

A prompt longer than ``max_text_len`` is refused rather than truncated: truncation could make two
class prompts identical (the hashed tokenizer refuses it too). A tower that masks padding by id
(``models.clip.PADDING_MASKED_TOWERS``: BERT's ``tokens != 0``) needs a tokenizer padding with
``PAD_ID`` and refuses a prompt holding that id (e.g. a literal ``[PAD]``), which it would mask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from mslora_jax.config import ExperimentConfig
from mslora_jax.data.conversation import read_tokenizer_file
from mslora_jax.data.tokenizer import tokenize
from mslora_jax.errors import ConfigError, DataError
from mslora_jax.models.clip import PAD_ID, PADDING_MASKED_TOWERS

TOKENIZER_FILE = "tokenizer.json"  # in a backbone folder (written by mslora-jax convert-clip)

PromptEncoder = Callable[[Sequence[str]], np.ndarray]  # prompts -> int32 [N, max_len]


def load_prompt_tokenizer(path: str | Path, vocab_size: int) -> tuple[Tokenizer, int]:
    """(tokenizer, padding id) from a ``tokenizer.json`` whose ids fit ``vocab_size``.

    The file's own padding and truncation settings are switched off (``encode_prompts`` pads
    and checks lengths itself); its ``padding.pad_id`` is kept as the padding id.
    """
    tokenizer = read_tokenizer_file(path)
    pad_id = tokenizer.padding["pad_id"] if tokenizer.padding else PAD_ID
    tokenizer.no_padding()
    tokenizer.no_truncation()
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise DataError(
            f"{path}: the tokenizer has {size} tokens but the text tower's model.vocab_size is "
            f"{vocab_size} (is this the backbone's own tokenizer?)"
        )
    return tokenizer, pad_id


def encode_prompts(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    max_len: int,
    pad_id: int,
    where: str = "",
    padding_masked: bool = False,
) -> np.ndarray:
    """int32 ``[len(texts), max_len]``: each text's ids (with the tokenizer's special tokens),
    then ``pad_id``. ConfigError naming the prompt if one needs more than ``max_len`` ids or,
    with ``padding_masked`` (the tower masks ``pad_id`` out), holds ``pad_id``."""
    out = np.full((len(texts), max_len), pad_id, np.int32)
    for i, encoding in enumerate(tokenizer.encode_batch(list(texts))):
        ids = encoding.ids
        if len(ids) > max_len:
            raise ConfigError(
                f"prompt {texts[i]!r} is {len(ids)} tokens with {where or 'its tokenizer'}; "
                f"model.max_text_len={max_len} allows {max_len}"
            )
        if padding_masked and pad_id in ids:
            raise ConfigError(
                f"prompt {texts[i]!r} holds token id {pad_id} "
                f"({tokenizer.id_to_token(pad_id)!r}), the padding id the text tower masks out"
            )
        out[i, : len(ids)] = ids
    return out


def prompt_encoder(config: ExperimentConfig) -> PromptEncoder:
    """How ``config``'s run turns class prompts into ids (see the module docstring)."""
    model = config.model
    if model.text_tower is None:
        return functools.partial(tokenize, max_len=model.max_text_len, vocab_size=model.vocab_size)
    if config.backbone.source != "load":
        raise ConfigError(
            f"model.text_tower={model.text_tower!r} takes its tokenizer.json from the backbone "
            f'folder, so it needs backbone.source="load" with backbone.path (a folder written by '
            f"mslora-jax convert-clip), not backbone.source={config.backbone.source!r}"
        )
    path = Path(config.backbone.path).absolute() / TOKENIZER_FILE
    tokenizer, pad_id = load_prompt_tokenizer(path, model.vocab_size)
    masked = model.text_tower in PADDING_MASKED_TOWERS
    if masked and pad_id != PAD_ID:
        raise DataError(
            f"{path}: pads with id {pad_id}, but model.text_tower={model.text_tower!r} masks "
            f"padding as id {PAD_ID}"
        )
    return functools.partial(
        encode_prompts,
        tokenizer,
        max_len=model.max_text_len,
        pad_id=pad_id,
        where=str(path),
        padding_masked=masked,
    )
