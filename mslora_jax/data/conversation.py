"""Tokenizers and the encoding of VQA conversations for generative training and generation.

The text of a conversation comes from a ``chat_template.ChatTemplate`` (LLaVA's ``vicuna_v1`` or
``mistral_instruct``); here it becomes ids and a loss mask. ``<s>`` is one id put in front; the
``<image>`` placeholder becomes one id (``SpecialIds.image``) that the model replaces with the
image features. As LLaVA's ``tokenizer_image_token`` does, the text is split at ``<image>`` and
each piece is encoded on its own, so a tokenizer without an ``<image>`` token (Mistral's) works:
the placeholder then gets ``llava.image_token_id`` (LLaVA uses -200, never looked up).

Loss mask: True exactly on the tokens of each answer with its leading space and its ``</s>``
(``ChatTemplate`` targets; tokens are matched by their character offsets). ``loss_mask[t]``
marks ``input_ids[t]`` as a target, i.e. the loss compares ``logits[:, :-1]`` with
``input_ids[:, 1:]`` under ``loss_mask[:, 1:]``.

Tokenizer (``build_tokenizer``): byte-level BPE (GPT-2 style: all 256 bytes in the base
alphabet, so no text is ever unknown, and decoding is lossless), special tokens ``<pad>`` 0,
``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<image>`` 4. A loaded ``tokenizer.json`` needs ``<s>``,
``</s>`` and ``<unk>``; without ``<pad>`` it pads with ``<unk>`` (as LLaVA does for Mistral).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mslora_jax.data.chat_template import DEFAULT_TEMPLATE, VICUNA_SYSTEM, ChatTemplate
from mslora_jax.data.vqa import IMAGE_TOKEN, VqaExample
from mslora_jax.errors import ConfigError, DataError

SYSTEM = VICUNA_SYSTEM  # the default template's system line
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
REQUIRED_TOKENS = ("<s>", "</s>", "<unk>")
_BYTE_ALPHABET = 256


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens the encoding needs (``pad`` may equal ``unk``)."""

    pad: int
    bos: int
    eos: int
    unk: int
    image: int


def check_required_tokens(tokenizer: Tokenizer) -> None:
    """DataError if the tokenizer lacks one of ``REQUIRED_TOKENS``."""
    missing = [token for token in REQUIRED_TOKENS if tokenizer.token_to_id(token) is None]
    if missing:
        raise DataError(f"tokenizer has no special token {missing[0]!r} (needs {REQUIRED_TOKENS})")


def special_ids(tokenizer: Tokenizer, image_token_id: int | None = None) -> SpecialIds:
    """Looks up the special tokens; DataError if the tokenizer lacks ``<s>``, ``</s>``, ``<unk>``.

    ``<pad>`` falls back to ``<unk>``. ``<image>`` is the tokenizer's own token if it has one,
    else ``image_token_id`` (DataError if that is None).
    """
    check_required_tokens(tokenizer)
    bos, eos, unk = (tokenizer.token_to_id(token) for token in REQUIRED_TOKENS)
    pad = tokenizer.token_to_id("<pad>")
    image = tokenizer.token_to_id(IMAGE_TOKEN)
    if image is None:
        if image_token_id is None:
            raise DataError(f"tokenizer has no {IMAGE_TOKEN!r} token and no image id was given")
        image = image_token_id
    return SpecialIds(pad=unk if pad is None else pad, bos=bos, eos=eos, unk=unk, image=image)


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int, image_token_id: int) -> None:
    """ConfigError unless the model can embed every token id and finds ``<image>`` where it looks.

    Without this check, ids past the embedding table would be silently clamped, and a different
    ``<image>`` id would leave the image out of every prompt (or mistake a word for the image).
    """
    size = tokenizer.get_vocab_size()
    if size > vocab_size:
        raise ConfigError(
            f"the tokenizer has {size} tokens but llava.decoder.vocab_size is {vocab_size}; "
            f"set vocab_size >= {size} (or build a smaller tokenizer)"
        )
    own = tokenizer.token_to_id(IMAGE_TOKEN)
    if own is not None and own != image_token_id:
        raise ConfigError(
            f"the tokenizer's {IMAGE_TOKEN!r} has id {own} but llava.image_token_id is "
            f"{image_token_id}; set llava.image_token_id={own}"
        )
    if own is None and 0 <= image_token_id < size:  # a real token's id
        raise ConfigError(
            f"the tokenizer has no {IMAGE_TOKEN!r} token and llava.image_token_id="
            f"{image_token_id} is its token {tokenizer.id_to_token(image_token_id)!r}; set an id "
            "the tokenizer does not use, e.g. LLaVA's -200"
        )


def render_conversation(example: VqaExample, template: ChatTemplate = DEFAULT_TEMPLATE) -> str:
    """The template's text (without ``<s>``); e.g. a corpus for ``build_tokenizer``."""
    return template.render(example.turns).text


def build_tokenizer(
    texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = SPECIAL_TOKENS
) -> Tokenizer:
    """Trains a byte-level BPE tokenizer on ``texts`` (tests and the CPU demo).

    ``special_tokens`` must start with ``<pad> <s> </s> <unk> <image>`` (ids 0..4); extra tokens
    get the following ids. The vocabulary can end up smaller than ``vocab_size`` on a small
    corpus; use ``tokenizer.get_vocab_size()`` for the embedding table.
    """
    special_tokens = tuple(special_tokens)
    if special_tokens[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
        raise ConfigError(
            f"build_tokenizer: special_tokens must start with {SPECIAL_TOKENS}, "
            f"got {special_tokens}"
        )
    if len(set(special_tokens)) != len(special_tokens):
        raise ConfigError(f"build_tokenizer: special_tokens must be unique, got {special_tokens}")
    smallest = _BYTE_ALPHABET + len(special_tokens)
    if vocab_size < smallest:
        raise ConfigError(
            f"build_tokenizer: vocab_size must be >= {smallest} (256 bytes + "
            f"{len(special_tokens)} special tokens), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Writes ``tokenizer.json`` (creating the folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tokenizer.save(os.fspath(path))


def read_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
    """Reads a ``tokenizer.json``; DataError if missing or invalid (no token is required)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(os.fspath(path))
    except Exception as error:  # tokenizers raises a bare Exception for any parse failure.
        raise DataError(f"{path}: not a valid tokenizer.json ({error})") from None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a ``tokenizer.json``; DataError if missing, invalid or lacking a special token."""
    tokenizer = read_tokenizer_file(path)
    try:
        check_required_tokens(tokenizer)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None
    return tokenizer


def encode_conversation(
    tokenizer: Tokenizer,
    example: VqaExample,
    max_len: int,
    template: ChatTemplate = DEFAULT_TEMPLATE,
    image_token_id: int | None = None,
) -> dict[str, np.ndarray]:
    """``{"input_ids": int32 [L], "loss_mask": bool [L]}`` with ``L = min(full length, max_len)``.

    Sequences longer than ``max_len`` are cut from the right (later turns, then the end of an
    answer, go first). DataError if not even the first answer token would survive: such an
    example would train nothing and, silently dropped, would bias the data.
    """
    return encode_conversations(tokenizer, [example], max_len, template, image_token_id)[0]


def encode_conversations(
    tokenizer: Tokenizer,
    examples: Sequence[VqaExample],
    max_len: int,
    template: ChatTemplate = DEFAULT_TEMPLATE,
    image_token_id: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """``encode_conversation`` for many examples."""
    if max_len < 2:
        raise ConfigError(f"encode_conversation: max_len must be >= 2, got {max_len}")
    ids = special_ids(tokenizer, image_token_id)
    encode = _piece_encoder(tokenizer)
    return [_encode(encode, ids, template, example, max_len) for example in examples]


def _encode(
    encode: PieceEncoder, ids: SpecialIds, template: ChatTemplate, example: VqaExample, max_len: int
) -> dict[str, np.ndarray]:
    what = f"conversation {example.id!r}"
    if not example.turns:
        raise DataError(f"{what}: has no turns")
    if IMAGE_TOKEN not in example.turns[0][0]:
        raise DataError(f"{what}: {IMAGE_TOKEN} must be in the first question")
    rendered = template.render(example.turns)
    text_ids, starts = _encode_text(encode, rendered.text, ids.image)
    _check_specials(text_ids, ids, what, eos_count=len(example.turns))
    is_target = [any(a <= s < b for a, b in rendered.targets) for s in starts]
    input_ids, loss_mask = [ids.bos, *text_ids], [False, *is_target]
    first_target = loss_mask.index(True) if True in loss_mask else len(loss_mask)
    if first_target >= max_len:
        raise DataError(
            f"{what}: the first answer starts at token {first_target}, beyond max_len "
            f"{max_len}; raise max_len or shorten the question"
        )
    return {
        "input_ids": np.asarray(input_ids[:max_len], np.int32),
        "loss_mask": np.asarray(loss_mask[:max_len], bool),
    }


# piece -> (ids, first character of each token)
PieceEncoder = Callable[[str], tuple[tuple[int, ...], tuple[int, ...]]]


def _piece_encoder(tokenizer: Tokenizer) -> PieceEncoder:
    """Encodes a piece of text; memoized because the piece before ``<image>`` (the system line
    and the template's opening) is the same in every example (2x faster on the demo data)."""

    @functools.lru_cache(maxsize=64)
    def encode(piece: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        encoding = tokenizer.encode(piece, add_special_tokens=False)
        return tuple(encoding.ids), tuple(start for start, _ in encoding.offsets)

    return encode


def _encode_text(encode: PieceEncoder, text: str, image_id: int) -> tuple[list[int], list[int]]:
    """Ids of ``text`` with each ``<image>`` as ``image_id``, and each token's first character.

    The pieces between placeholders are encoded separately (LLaVA's ``tokenizer_image_token``);
    for a tokenizer with ``<image>`` as a special token this equals encoding the whole text.
    """
    out_ids, out_starts, offset = [], [], 0
    for index, piece in enumerate(text.split(IMAGE_TOKEN)):
        if index:
            out_ids.append(image_id)
            out_starts.append(offset - len(IMAGE_TOKEN))
        piece_ids, piece_starts = encode(piece)
        out_ids += piece_ids
        out_starts += [offset + start for start in piece_starts]
        offset += len(piece) + len(IMAGE_TOKEN)
    return out_ids, out_starts


def encode_prompt(
    tokenizer: Tokenizer,
    question: str,
    *,
    max_len: int | None = None,
    template: ChatTemplate = DEFAULT_TEMPLATE,
    image_token_id: int | None = None,
) -> np.ndarray:
    """int32 ids of ``<s>`` and the template's prompt for ``question`` (generation).

    ``<image>\\n`` is put in front of a question without one (test files usually omit it).
    DataError if the prompt is longer than ``max_len`` (cutting it would drop its end).
    """
    ids = special_ids(tokenizer, image_token_id)
    question = question.strip()
    if IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n{question}"
    encoded, _ = _encode_text(
        _piece_encoder(tokenizer), template.render_prompt(question), ids.image
    )
    _check_specials(encoded, ids, f"question {question!r}", eos_count=0)
    prompt = np.asarray([ids.bos, *encoded], np.int32)
    if max_len is not None and len(prompt) > max_len:
        raise DataError(
            f"question {question[:60]!r}: prompt has {len(prompt)} tokens, over max_len {max_len}"
        )
    return prompt


def pad_batch(
    encodings: Sequence[Mapping[str, np.ndarray]], pad_id: int, length: int
) -> dict[str, np.ndarray]:
    """Right-pads each array of the encodings to ``[B, length]`` and adds ``attention_mask``.

    ``input_ids`` is padded with ``pad_id``, other keys (``loss_mask``) with zeros/False;
    ``attention_mask`` (bool) is True on the real tokens. Right padding keeps position ids equal
    to the token index, which is what training wants.
    """
    if not encodings:
        raise ConfigError("pad_batch: no encodings given")
    keys = set(encodings[0])
    if "input_ids" not in keys or any(set(e) != keys for e in encodings):
        raise ConfigError(
            f"pad_batch: every encoding needs the same keys including 'input_ids', got "
            f"{[sorted(e) for e in encodings]}"
        )
    lengths = [len(e["input_ids"]) for e in encodings]
    if max(lengths) > length:
        raise ConfigError(f"pad_batch: an encoding has {max(lengths)} tokens, over length {length}")
    batch = {}
    for key in sorted(keys):
        dtype = np.asarray(encodings[0][key]).dtype
        fill = pad_id if key == "input_ids" else 0
        out = np.full((len(encodings), length), fill, dtype)
        for row, encoding in enumerate(encodings):
            out[row, : lengths[row]] = encoding[key]
        batch[key] = out
    batch["attention_mask"] = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
    return batch


def left_pad_prompts(
    prompts: Sequence[np.ndarray], pad_id: int, length: int | None = None
) -> dict[str, np.ndarray]:
    """Left-pads prompts to ``[B, length]`` (default: the longest) for batched generation.

    All prompts then end at position ``length - 1``, so every row's next token is sampled from
    the same column and appended at the same place. Returns ``input_ids`` int32,
    ``attention_mask`` bool and ``positions`` int32 (0 at each row's first real token, 0 on
    padding), so position embeddings do not depend on the amount of padding.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("left_pad_prompts: needs at least one prompt, none of them empty")
    lengths = np.asarray([len(p) for p in prompts])
    length = int(lengths.max()) if length is None else length
    if lengths.max() > length:
        raise ConfigError(
            f"left_pad_prompts: a prompt has {lengths.max()} tokens, over length {length}"
        )
    input_ids = np.full((len(prompts), length), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = prompt
    attention_mask = np.arange(length)[None, :] >= (length - lengths)[:, None]
    positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions}


def _check_specials(encoded: Sequence[int], ids: SpecialIds, what: str, eos_count: int) -> None:
    """One ``<image>``, only the template's ``</s>``, no ``<s>`` or ``<pad>`` in the text."""
    flat = np.asarray(encoded, np.int64)
    images = int(np.sum(flat == ids.image))
    if images != 1:
        raise DataError(f"{what}: expected exactly one {IMAGE_TOKEN} token, found {images}")
    if int(np.sum(flat == ids.eos)) != eos_count:
        raise DataError(f"{what}: the text contains the special token </s>")
    names = [("<s>", ids.bos)] + ([("<pad>", ids.pad)] if ids.pad != ids.unk else [])
    for name, token_id in names:
        if np.any(flat == token_id):
            raise DataError(f"{what}: the text contains the special token {name}")
