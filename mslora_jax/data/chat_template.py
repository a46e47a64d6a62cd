"""Conversation templates: a VQA conversation as text, with the character spans trained on.

Two templates, as LLaVA defines them (``llava/conversation.py``); ``<s>`` is not part of the
text (the encoder puts its id in front), ``</s>`` is (a special token every tokenizer here has):

``vicuna_v1`` (LLaVA v1, ``SeparatorStyle.TWO``), system line ``VICUNA_SYSTEM`` by default::

    {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...
    prompt: {system} USER: {q} ASSISTANT:

``mistral_instruct`` (LLaVA-Med v1.5's ``conv_mistral_instruct``, ``SeparatorStyle.LLAMA_2``
with ``sep=""``), no system line by default (a given one is wrapped in ``<<SYS>>`` tags in front
of the first question)::

    [INST] {q1} [/INST] {a1} </s>[INST] {q2} [/INST] {a2} </s>...
    prompt: [INST] {q} [/INST]

Targets (what the loss is computed on) are each answer with the space before it, through its
``</s>``: ``" {a}</s>"`` resp. ``" {a} </s>"``. Every target starts with a space, and the
tokenizers used here (byte-level BPE, SentencePiece-style Metaspace) never merge a token across a
space, so a token is a target exactly when its first character lies in a target span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mslora_jax.errors import ConfigError

TEMPLATES = ("vicuna_v1", "mistral_instruct")
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
EOS_TEXT = "</s>"


@dataclass(frozen=True)
class Rendered:
    """A conversation's text and the ``[start, end)`` character spans that are targets."""

    text: str
    targets: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ChatTemplate:
    """One of ``TEMPLATES``; ``system=None`` takes the template's default system line."""

    kind: str = "vicuna_v1"
    system: str | None = None

    def __post_init__(self):
        if self.kind not in TEMPLATES:
            raise ConfigError(
                f"llava.template={self.kind!r} is unknown; expected one of {TEMPLATES}"
            )

    @property
    def system_text(self) -> str:
        if self.system is not None:
            return self.system
        return VICUNA_SYSTEM if self.kind == "vicuna_v1" else ""

    def _question(self, turn: int, question: str) -> str:
        """The user part of ``turn`` (0-based), up to where the answer's space begins."""
        if self.kind == "vicuna_v1":
            head = f"{self.system_text} " if turn == 0 else ""
            return f"{head}USER: {question} ASSISTANT:"
        system = self.system_text
        head = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if turn == 0 and system else ""
        return f"[INST] {head}{question} [/INST]"

    def _answer(self, answer: str) -> str:
        tail = "" if self.kind == "vicuna_v1" else " "
        return f" {answer}{tail}{EOS_TEXT}"

    def render(self, turns: Sequence[tuple[str, str]]) -> Rendered:
        """The whole conversation (all turns answered) and its target spans."""
        text, targets = "", []
        for turn, (question, answer) in enumerate(turns):
            text += self._question(turn, question)
            start = len(text)
            text += self._answer(answer)
            targets.append((start, len(text)))
        return Rendered(text, tuple(targets))

    def render_prompt(self, question: str) -> str:
        """A one-question generation prompt; the answer follows it."""
        return self._question(0, question)


DEFAULT_TEMPLATE = ChatTemplate()
