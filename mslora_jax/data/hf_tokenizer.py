"""Token ids for a text tower from any Hugging Face ``tokenizer.json`` (BERT WordPiece, CLIP BPE).

The file's own normalizer, pre-tokenizer and post-processor are applied (BERT's ``[CLS] ...
[SEP]``, CLIP's ``<|startoftext|> ... <|endoftext|>``); its own padding and truncation settings
are switched off: ids are padded here with ``pad_id`` (this repo's ``PAD_ID`` 0 by default, which
is BERT's ``[PAD]``; the towers' padding mask is ``tokens != 0``), and a text longer than
``max_len`` is an error rather than truncated (truncation could make two class prompts
identical), as in ``data.tokenizer.tokenize``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from mslora_jax.data.tokenizer import PAD_ID
from mslora_jax.errors import ConfigError, DataError


def load_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizer.json``; DataError naming the file if it is missing or not valid."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(os.fspath(path))
    except Exception as error:  # tokenizers raises a bare Exception for any parse failure.
        raise DataError(f"{path}: not a valid tokenizer.json ({error})") from None


class HFTokenizer:
    """``tokenizer(texts, max_len=...)`` -> int32 ``[len(texts), max_len]``, padded with ``pad_id``.

    Called like ``data.tokenizer.tokenize`` (``vocab_size``, if given, is the text tower's
    vocabulary, which must hold every id the file can produce).
    """

    def __init__(self, path: str | os.PathLike, *, pad_id: int = PAD_ID):
        self.path = os.fspath(path)
        self.tokenizer = load_tokenizer_file(path)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(
        self, texts: Sequence[str], *, max_len: int, vocab_size: int | None = None
    ) -> np.ndarray:
        if vocab_size is not None and vocab_size < self.vocab_size:
            raise ConfigError(
                f"{self.path} has {self.vocab_size} token ids but the text tower's vocab_size is "
                f"{vocab_size}"
            )
        out = np.full((len(texts), max_len), self.pad_id, np.int32)
        for i, encoding in enumerate(self.tokenizer.encode_batch(list(texts))):
            ids = encoding.ids
            if len(ids) > max_len:
                raise ConfigError(
                    f"prompt {texts[i]!r} is {len(ids)} tokens long ({self.path}, special tokens "
                    f"included); max_len={max_len}"
                )
            if self.pad_id in ids:  # it would be masked out as padding
                raise ConfigError(
                    f"prompt {texts[i]!r} holds token id {self.pad_id} "
                    f"({self.tokenizer.id_to_token(self.pad_id)!r}), the padding id"
                )
            out[i, : len(ids)] = ids
        return out
