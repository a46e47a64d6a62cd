"""Conversation template, a small BPE tokenizer, and tokenisation for generative VQA training.

Template (LLaVA v1 / Mistral-instruct flavoured) for a conversation of n turns::

    <s>{SYSTEM} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...

``<s>``/``</s>`` are single special-token ids, never text. ``<image>`` stays inside ``q1`` (as
one special token; the model replaces it with the image features). A generation prompt is the
same text up to and including the last ``ASSISTANT:``; the answer then starts with a space.

Loss mask: True exactly on the tokens of ``" {a_i}"`` and the ``</s>`` after it (system,
``USER:``, questions and ``ASSISTANT:`` are False). ``loss_mask[t]`` marks ``input_ids[t]`` as a
target, i.e. the loss compares ``logits[:, :-1]`` with ``input_ids[:, 1:]`` under
``loss_mask[:, 1:]``.

Each segment (the system line, each ``USER: ... ASSISTANT:`` part, each answer) is encoded on its
own and the ids are concatenated, so the mask is exact by construction. With the byte-level
pre-tokenizer every segment boundary is also a pre-token boundary, so the ids equal those of
encoding the whole rendered string (tested). Another tokenizer loaded from a ``tokenizer.json``
still gets an exact mask, but its ids may differ slightly from whole-string encoding.

Tokenizer (``build_tokenizer``): byte-level BPE (GPT-2 style: all 256 bytes in the base
alphabet, so no text is ever unknown, and decoding is lossless), special tokens ``<pad>`` 0,
``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<image>`` 4.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mslora_jax.data.vqa import IMAGE_TOKEN, VqaExample
from mslora_jax.errors import ConfigError, DataError

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
_BYTE_ALPHABET = 256


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens the template needs, looked up by name in a tokenizer."""

    pad: int
    bos: int
    eos: int
    unk: int
    image: int


def special_ids(tokenizer: Tokenizer) -> SpecialIds:
    """Looks up ``<pad> <s> </s> <unk> <image>``; DataError if the tokenizer lacks one."""
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    missing = [token for token, i in zip(SPECIAL_TOKENS, ids) if i is None]
    if missing:
        raise DataError(f"tokenizer has no special token {missing[0]!r} (needs {SPECIAL_TOKENS})")
    return SpecialIds(*ids)


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int, image_token_id: int) -> None:
    """ConfigError unless the model can embed every token id and finds ``<image>`` where it looks.

    Without this check, ids past the embedding table would be silently clamped, and a different
    ``<image>`` id would leave the image out of every prompt.
    """
    size = tokenizer.get_vocab_size()
    if size > vocab_size:
        raise ConfigError(
            f"the tokenizer has {size} tokens but llava.decoder.vocab_size is {vocab_size}; "
            f"set vocab_size >= {size} (or build a smaller tokenizer)"
        )
    image = special_ids(tokenizer).image
    if image != image_token_id:
        raise ConfigError(
            f"the tokenizer's {IMAGE_TOKEN!r} has id {image} but llava.image_token_id is "
            f"{image_token_id}; set llava.image_token_id={image}"
        )


def render_conversation(example: VqaExample, system: str = SYSTEM) -> str:
    """The template as text (without ``<s>``); e.g. a corpus for ``build_tokenizer``."""
    parts = [system + " "]
    for question, answer in example.turns:
        parts.append(f"USER: {question} ASSISTANT: {answer}</s>")
    return "".join(parts)


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


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a ``tokenizer.json``; DataError if missing, invalid or lacking a special token."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: tokenizer file not found")
    try:
        tokenizer = Tokenizer.from_file(os.fspath(path))
    except Exception as error:  # tokenizers raises a bare Exception for any parse failure.
        raise DataError(f"{path}: not a valid tokenizer.json ({error})") from None
    try:
        special_ids(tokenizer)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None
    return tokenizer


def encode_conversation(
    tokenizer: Tokenizer, example: VqaExample, max_len: int, system: str = SYSTEM
) -> dict[str, np.ndarray]:
    """``{"input_ids": int32 [L], "loss_mask": bool [L]}`` with ``L = min(full length, max_len)``.

    Sequences longer than ``max_len`` are cut from the right (later turns, then the end of an
    answer, go first). DataError if not even the first answer token would survive: such an
    example would train nothing and, silently dropped, would bias the data.
    """
    return encode_conversations(tokenizer, [example], max_len, system)[0]


def encode_conversations(
    tokenizer: Tokenizer, examples: Sequence[VqaExample], max_len: int, system: str = SYSTEM
) -> list[dict[str, np.ndarray]]:
    """``encode_conversation`` for many examples; the system line is encoded once (~4x faster)."""
    if max_len < 2:
        raise ConfigError(f"encode_conversation: max_len must be >= 2, got {max_len}")
    ids = special_ids(tokenizer)
    system_ids = tokenizer.encode(system, add_special_tokens=False).ids
    return [_encode(tokenizer, ids, system_ids, example, max_len) for example in examples]


def _encode(
    tokenizer: Tokenizer, ids: SpecialIds, system: list[int], example: VqaExample, max_len: int
) -> dict[str, np.ndarray]:
    what = f"conversation {example.id!r}"
    if not example.turns:
        raise DataError(f"{what}: has no turns")
    input_ids, loss_mask, texts = [ids.bos, *system], [False] * (1 + len(system)), []
    for turn, (question, answer) in enumerate(example.turns):
        # The first "USER:" follows the system line after a space, later ones follow "</s>".
        space = " " if turn == 0 else ""
        prompt = tokenizer.encode(f"{space}USER: {question} ASSISTANT:", add_special_tokens=False)
        reply = tokenizer.encode(f" {answer}", add_special_tokens=False)
        if turn == 0 and ids.image not in prompt.ids:
            raise DataError(f"{what}: {IMAGE_TOKEN} must be in the first question")
        texts += [prompt.ids, reply.ids]
        input_ids += [*prompt.ids, *reply.ids, ids.eos]
        loss_mask += [False] * len(prompt.ids) + [True] * (len(reply.ids) + 1)
    _check_specials(texts, ids, what)
    first_target = loss_mask.index(True)
    if first_target >= max_len:
        raise DataError(
            f"{what}: the first answer starts at token {first_target}, beyond max_len "
            f"{max_len}; raise max_len or shorten the question"
        )
    return {
        "input_ids": np.asarray(input_ids[:max_len], np.int32),
        "loss_mask": np.asarray(loss_mask[:max_len], bool),
    }


def encode_prompt(
    tokenizer: Tokenizer, question: str, *, max_len: int | None = None, system: str = SYSTEM
) -> np.ndarray:
    """int32 ids of ``<s>{SYSTEM} USER: {question} ASSISTANT:`` for generation.

    ``<image>\\n`` is put in front of a question without one (test files usually omit it).
    DataError if the prompt is longer than ``max_len`` (cutting it would drop ``ASSISTANT:``).
    """
    ids = special_ids(tokenizer)
    question = question.strip()
    if IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n{question}"
    text = f"{system} USER: {question} ASSISTANT:"
    encoded = tokenizer.encode(text, add_special_tokens=False).ids
    _check_specials([encoded], ids, f"question {question!r}")
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


def _check_specials(encoded: Sequence[Sequence[int]], ids: SpecialIds, what: str) -> None:
    """Text may hold exactly one ``<image>`` and no ``<pad>``, ``<s>`` or ``</s>``."""
    flat = np.concatenate([np.asarray(e, np.int64) for e in encoded] + [np.zeros(0, np.int64)])
    images = int(np.sum(flat == ids.image))
    if images != 1:
        raise DataError(f"{what}: expected exactly one {IMAGE_TOKEN} token, found {images}")
    for name, token_id in (("<pad>", ids.pad), ("<s>", ids.bos), ("</s>", ids.eos)):
        if np.any(flat == token_id):
            raise DataError(f"{what}: the text contains the special token {name}")
