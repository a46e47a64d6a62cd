"""Answer-level VQA metrics for the generative (LLaVA-Med style) setting.

Reimplements what LLaVA-Med reports for VQA-RAD / SLAKE / PathVQA (its ``run_eval.py``):
closed-question accuracy, and for every answer exact match, token precision/recall/F1 and
BLEU. Pure Python, no dependencies. Differences from the LLaVA-Med script, on purpose:

* Normalization is only: lower-case, delete apostrophes, replace every other punctuation or
  symbol character by a space, collapse whitespace. LLaVA-Med's VQA-style ``normalize_word``
  also drops articles and maps number words ("two" -> "2"); we do not, so that scores are on
  the text as written. Replacing (rather than deleting) punctuation keeps "x-ray/ct" as three
  words; deleting apostrophes keeps "don't" and "patient's" as one word each.
* Closed yes/no accuracy is token based (LLaVA-Med tests substrings, so "no" matches "normal"),
  and an answer that contains both "yes" and "no" counts as wrong (see ``closed_accuracy``).
* BLEU-n is the *cumulative* BLEU with uniform weights ``1/n`` (LLaVA-Med calls NLTK with
  one-hot weights, i.e. single-order precisions), with NLTK's smoothing method1 (epsilon 0.1).
* Every empty-input case is defined, not left to a division by zero.
"""

from __future__ import annotations

import math
import string
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

MetricName = Literal[
    "exact_match",
    "precision",
    "recall",
    "f1",
    "bleu1",
    "bleu2",
    "bleu3",
    "bleu4",
    "closed_accuracy",
    "open_recall",
    "open_f1",
]
METRIC_NAMES: tuple[str, ...] = get_args(MetricName)
ANSWER_TYPES = ("OPEN", "CLOSED")
BLEU_EPSILON = 0.1  # NLTK SmoothingFunction().method1 default.
_APOSTROPHES = frozenset("'\u2019\u2018`")
_YES_NO = {"yes": "no", "no": "yes"}


def _is_punct(ch: str) -> bool:
    # ASCII punctuation plus any Unicode punctuation (P*) or symbol (S*) character.
    return ch in string.punctuation or unicodedata.category(ch)[0] in "PS"


def normalize_answer(text: str) -> str:
    """Lower-cases, deletes apostrophes, replaces other punctuation by spaces, collapses spaces.

    >>> normalize_answer("  The Left-Lung's  base, isn't it? ")
    'the left lungs base isnt it'
    """
    chars = []
    for ch in text.lower():
        if ch in _APOSTROPHES:
            continue
        chars.append(" " if _is_punct(ch) else ch)
    return " ".join("".join(chars).split())


def tokens(text: str) -> list[str]:
    """Whitespace tokens of ``normalize_answer(text)``."""
    return normalize_answer(text).split()


def exact_match(pred: str, gt: str) -> float:
    """1.0 when the normalized strings are equal (two empty strings are equal), else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gt))


def _prf(pred_toks: Sequence[str], gt_toks: Sequence[str]) -> tuple[float, float, float]:
    if not pred_toks and not gt_toks:
        return 1.0, 1.0, 1.0
    if not pred_toks or not gt_toks:
        return 0.0, 0.0, 0.0
    overlap = sum((Counter(pred_toks) & Counter(gt_toks)).values())
    if overlap == 0:
        return 0.0, 0.0, 0.0
    precision = overlap / len(pred_toks)
    recall = overlap / len(gt_toks)
    return precision, recall, 2 * precision * recall / (precision + recall)


def token_prf(pred: str, gt: str) -> tuple[float, float, float]:
    """Token (precision, recall, F1) with multiset overlap: a repeated token matches at most
    as many times as it occurs in the other answer.

    Both answers empty after normalization: (1, 1, 1), a perfect match. Exactly one empty:
    (0, 0, 0). No common token: (0, 0, 0).
    """
    return _prf(tokens(pred), tokens(gt))


def closed_accuracy(pred: str, gt: str, candidates: Sequence[str] | None = None) -> float:
    """1.0 if the free-text ``pred`` answers a closed question with ground truth ``gt``.

    * ``gt`` normalizes to "yes" or "no": correct iff the prediction's tokens contain the gt word
      and not the opposite one ("Yes, there is." -> yes; "no." -> no). An answer containing both
      words ("no, yes", "yes, there is no effusion") is ambiguous and scored 0 for either gt;
      "not", "nope", "negative" are not read as "no". ``candidates`` is ignored.
    * Otherwise, with ``candidates``: the candidate with the highest token F1 against the
      prediction is picked (ties -> the earlier candidate) and the score is 1 iff it equals
      ``gt`` after normalization. If no candidate shares a token with the prediction (best
      F1 is 0, e.g. an empty prediction) nothing is picked and the score is 0, so a
      non-answer is not rewarded by the tie-break. ``gt`` must be one of the candidates.
    * Otherwise (no candidates): correct iff every gt token occurs in the prediction
      (multiset containment, order ignored).
    """
    gt_toks = tokens(gt)
    if not gt_toks:
        raise ValueError(f"closed question has an empty ground truth {gt!r}")
    pred_toks = tokens(pred)
    gt_norm = " ".join(gt_toks)
    if gt_norm in _YES_NO:
        return float(gt_norm in pred_toks and _YES_NO[gt_norm] not in pred_toks)
    if candidates is not None:
        cand_toks = [tokens(c) for c in candidates]
        if gt_toks not in cand_toks:
            raise ValueError(f"ground truth {gt!r} is not among the candidates {list(candidates)}")
        f1s = [_prf(pred_toks, c)[2] for c in cand_toks]
        best = max(range(len(f1s)), key=lambda i: (f1s[i], -i))  # earliest of the maxima
        return float(f1s[best] > 0 and cand_toks[best] == gt_toks)
    return float(not Counter(gt_toks) - Counter(pred_toks))


def _ngrams(toks: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def bleu(pred: str, gt: str, max_n: int = 4) -> list[float]:
    """Sentence BLEU-1..``max_n`` of ``pred`` against the single reference ``gt``.

    BLEU-n = BP * exp(sum_{k<=n} log(p_k) / n) (cumulative, uniform weights) on normalized
    tokens, where p_k is the clipped k-gram precision (matches / max(1, #pred k-grams), as in
    NLTK) and BP = exp(1 - r/c) if the prediction length c is below the reference length r,
    else 1. Smoothing is NLTK's method1: a p_k with zero matches becomes epsilon / denominator
    with epsilon = 0.1. As in NLTK, no unigram match (including an empty prediction or
    reference) gives 0 for every order; unlike NLTK, two empty answers give 1 (consistent with
    ``exact_match`` and ``token_prf``). Equals ``nltk.translate.bleu_score.sentence_bleu([gt],
    pred, weights=(1/n,)*n, smoothing_function=SmoothingFunction().method1)`` on these tokens.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    pred_toks, gt_toks = tokens(pred), tokens(gt)
    if not pred_toks and not gt_toks:
        return [1.0] * max_n
    if not Counter(pred_toks) & Counter(gt_toks):  # no unigram match, or an empty side
        return [0.0] * max_n
    precisions = []
    for n in range(1, max_n + 1):
        pred_ng, gt_ng = _ngrams(pred_toks, n), _ngrams(gt_toks, n)
        matches = sum((pred_ng & gt_ng).values())  # counts clipped by the reference
        denom = max(1, sum(pred_ng.values()))
        precisions.append(matches / denom if matches else BLEU_EPSILON / denom)
    c, r = len(pred_toks), len(gt_toks)
    bp = 1.0 if c >= r else math.exp(1 - r / c)
    out, log_sum = [], 0.0
    for n, p in enumerate(precisions, start=1):
        log_sum += math.log(p)
        out.append(bp * math.exp(log_sum / n))
    return out


def _check_ref(i: int, ref: object) -> tuple[str, str, list[str] | None]:
    if not isinstance(ref, Mapping):
        raise ValueError(f"refs[{i}] must be a dict with 'gt' and 'answer_type', got {ref!r}")
    gt, answer_type, candidates = ref.get("gt"), ref.get("answer_type"), ref.get("candidates")
    if not isinstance(gt, str):
        raise ValueError(f"refs[{i}]['gt'] must be a string, got {gt!r}")
    if answer_type not in ANSWER_TYPES:
        raise ValueError(
            f"refs[{i}]['answer_type'] must be one of {ANSWER_TYPES}, got {answer_type!r}"
        )
    if candidates is not None and (
        isinstance(candidates, str)
        or not isinstance(candidates, Sequence)
        or not all(isinstance(c, str) for c in candidates)
    ):
        raise ValueError(f"refs[{i}]['candidates'] must be a list of strings, got {candidates!r}")
    return gt, answer_type, None if candidates is None else list(candidates)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def check_answer_count(preds: Sequence[object], refs: Sequence[object]) -> None:
    """ValueError unless there are as many predictions as references, and at least one."""
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError("no answers to score (preds and refs are empty)")


def score_answers(preds: Sequence[str], refs: Sequence[Mapping[str, object]]) -> dict[str, float]:
    """Mean of every metric over a set of answers.

    Each ref is ``{"gt": str, "answer_type": "OPEN" | "CLOSED", "candidates": list[str]}``
    (candidates optional). exact_match, precision, recall, f1 and bleu1..bleu4 average over all
    items; closed_accuracy over CLOSED items; open_recall / open_f1 (token recall / F1) over OPEN
    items. A mean over zero items is NaN. Also returns ``num_closed`` and ``num_open``.
    """
    check_answer_count(preds, refs)
    per: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    for i, (pred, ref) in enumerate(zip(preds, refs)):
        if not isinstance(pred, str):
            raise ValueError(f"preds[{i}] must be a string, got {pred!r}")
        gt, answer_type, candidates = _check_ref(i, ref)
        p, r, f = token_prf(pred, gt)
        per["exact_match"].append(exact_match(pred, gt))
        per["precision"].append(p)
        per["recall"].append(r)
        per["f1"].append(f)
        for n, b in enumerate(bleu(pred, gt, 4), start=1):
            per[f"bleu{n}"].append(b)
        if answer_type == "CLOSED":
            try:
                per["closed_accuracy"].append(closed_accuracy(pred, gt, candidates))
            except ValueError as e:
                raise ValueError(f"refs[{i}]: {e}") from None
        else:
            per["open_recall"].append(r)
            per["open_f1"].append(f)
    scores = {name: _mean(values) for name, values in per.items()}
    scores["num_closed"] = float(len(per["closed_accuracy"]))
    scores["num_open"] = float(len(per["open_recall"]))
    return scores


def primary_metric(scores: Mapping[str, float], name: str) -> float:
    """``scores[name]`` for a known metric name; raises if the name is unknown, missing from
    ``scores``, or its value is NaN (e.g. closed_accuracy on a split with no CLOSED items)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown answer metric {name!r}; expected one of {list(METRIC_NAMES)}")
    if name not in scores:
        raise ValueError(f"metric {name!r} is missing from the scores (keys: {sorted(scores)})")
    value = float(scores[name])
    if math.isnan(value):
        raise ValueError(f"metric {name!r} is undefined (NaN): no items of that answer type")
    return value
