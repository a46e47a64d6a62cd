"""The answer metrics exactly as the released MSLoRA-CR evaluator computes them ("released").

The paper's table comes from ``llava/eval/report_results.py`` (function ``evaluate``) of
VentusAislant/MSLoRA_CR, which uses ``normalize_word`` from ``llava/eval/eval_metrics/glossary.py``,
``calculate_f1score`` from ``llava/eval/eval_metrics/evaluate_metrics.py`` and NLTK's
``sentence_bleu``. This module reimplements it so that our numbers can be set beside the paper's;
``experiments/check_released_metrics.py`` checks it against every released ``metrics.txt``.
The clean definitions live in ``mslora_jax.eval.answer_metrics``; ``eval.metrics`` chooses.

Quirks reproduced (each a departure from the clean metrics), with where they come from:

* Preparation (``report_results.evaluate``): ground truth and prediction are ``str()``-ed and
  lower-cased, every ``"assistant:"`` is deleted from the prediction, and both go through
  ``normalize_word`` and ``strip``. Exact match is string equality of the results, over all items.
* ``normalize_word`` (``glossary.py``), in this order:

  - for each of the 21 characters ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: deleted if the
    *input* has it beside a space (``"p "`` or ``" p"``) or the input anywhere has a
    digit-comma-digit, else replaced by a space (the test looks at the input, not the text as
    edited so far);
  - a period not followed by a digit is deleted, but only the first 32 of them: the flag
    ``re.UNICODE`` (= 32) is passed where ``re.sub`` takes its ``count``. (Its pattern
    ``(?!<=\\d)(\\.)(?!\\d)`` opens with a lookahead, not the lookbehind meant, so that part never
    fails.) Other characters (``' : * # % & $``...) stay;
  - split on whitespace; the number words none, zero, one ... ten become 0 ... 10, then the
    articles a, an, the are dropped (so "none" becomes "0", not dropped);
  - each remaining word found in the VQA contraction table is replaced (``dont`` -> ``don't``;
    the table also maps ``somebody'd`` -> ``somebodyd``; its capitalised keys never match);
  - the words are joined by single spaces (its final comma deletion finds none left).

* Answer type (``evaluate``): a missing ``answer_type`` means OPEN. Precision, recall, F1 and
  the BLEU scores average over OPEN items only, closed accuracy over CLOSED items only.
* Precision / recall / F1 (``calculate_f1score``): the prepared strings are normalized *again*
  (``normalize_word`` twice; this changes something only past 32 periods, which the second pass
  goes on deleting, so a long report's F1 sees fewer periods than its exact match and BLEU), then
  split into word counts. A word in both answers adds its *prediction* count to tp (not the
  clipped minimum), a prediction-only word its count to fp, a reference-only word its reference
  count to fn; precision = tp / (tp + fp), recall = tp / (tp + fn). Either side empty or tp = 0
  gives (0, 0, 0) (two empty answers included).
* BLEU (``evaluate``): ``nltk.translate.bleu_score.sentence_bleu([gt.split()], pred.split())``
  on the prepared (once-normalized) strings, without smoothing: ``bleu_score`` with the default
  weights (1/4, 1/4, 1/4, 1/4), the cumulative BLEU-4, and ``bleu_score_1/2/3`` with one-hot
  weights (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0): the brevity penalty times the *single* n-gram
  precision of that order. A zero n-gram precision becomes ``sys.float_info.min`` (NLTK's
  method0), so BLEU-4 of an answer with no matching 4-gram is ~1e-77, i.e. 0.
* Closed accuracy (``evaluate``): a hit if the prepared ground truth equals the prepared
  prediction or is a *substring* of it ("no" is found in "normal", "yes" in "yes, no").
* Percent scaling: the released table prints every mean times 100; here the means stay fractions
  in [0, 1] like the clean metrics (the ``score`` command prints percentages).

Where this departs from the released script, on purpose: an ``answer_type`` other than OPEN,
CLOSED or missing raises (the released script counts such an item in exact match only; the
answer-file reader upper-cases "open" / "closed" first), and a missing prediction or ground truth
raises (the released script reuses the previous line's value).
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from mslora_jax.eval.answer_metrics import ANSWER_TYPES, check_answer_count

# The 21 characters normalize_word removes or turns into spaces, in its order.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@")
_PUNCT += ("`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_DELETED = 32  # re.UNICODE passed as re.sub's count
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven".split())}
_NUMBER_WORDS |= {"eight": "8", "nine": "9", "ten": "10", "none": "0"}
_ARTICLES = frozenset({"a", "an", "the"})

# The contraction table's targets (the VQA evaluation's list): each is looked up by every spelling
# with exactly one of its apostrophes left out ("couldn't've" by "couldnt've" and "couldn'tve";
# "don't" by "dont"). Together with the one reversed entry below this is the table's whole effect
# on lower-case words (its identity and capitalised entries change nothing).
_CONTRACTION_TARGETS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've
shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll
someone's something'd something'd've something'll that's there'd there'd've there're there's
they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're
what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've
""".split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for target in _CONTRACTION_TARGETS:
        for i, ch in enumerate(target):
            if ch == "'":
                table[target[:i] + target[i + 1 :]] = target
    table["somebody'd"] = "somebodyd"  # the released table's one entry that removes an apostrophe
    return table


CONTRACTIONS: dict[str, str] = _contraction_table()


def normalize(text: str) -> str:
    """The released ``normalize_word`` (see the module docstring for each step).

    >>> normalize("The two (left) lungs; dont.")
    "2 left lungs don't"
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCT:
        beside_space = p + " " in text or " " + p in text  # tested on the input, as released
        out = out.replace(p, "" if beside_space or delete_all else " ")
    out = _PERIOD.sub("", out, count=_PERIODS_DELETED)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def prepare(pred: object, gt: object) -> tuple[str, str]:
    """(prediction, ground truth) as the released ``evaluate`` compares them."""
    pred_text = str(pred).lower().replace("assistant:", "").strip()
    return normalize(pred_text).strip(), normalize(str(gt).lower()).strip()


def prf(pred: str, gt: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of the released ``calculate_f1score`` on prepared strings.

    Both are normalized again; tp counts a shared word as often as the *prediction* has it.
    """
    pred_counts = Counter(normalize(pred).split())
    gt_counts = Counter(normalize(gt).split())
    if not pred_counts or not gt_counts:
        return 0.0, 0.0, 0.0
    tp = sum(n for w, n in pred_counts.items() if w in gt_counts)
    fp = sum(n for w, n in pred_counts.items() if w not in gt_counts)
    fn = sum(n for w, n in gt_counts.items() if w not in pred_counts)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return precision, recall, 2 * precision * recall / (precision + recall)


# (our name, the released table's name, NLTK weights) of each BLEU score.
BLEU_SCORES = (
    ("bleu4", "bleu_score", (0.25, 0.25, 0.25, 0.25)),
    ("bleu1", "bleu_score_1", (1, 0, 0, 0)),
    ("bleu2", "bleu_score_2", (0, 1, 0, 0)),
    ("bleu3", "bleu_score_3", (0, 0, 1, 0)),
)


def _sentence_bleu() -> Callable:
    # Imported on first use: importing nltk takes a while and most runs never score BLEU.
    from nltk.translate.bleu_score import sentence_bleu

    return sentence_bleu


def bleu(pred: str, gt: str) -> dict[str, float]:
    """The released BLEU scores of prepared strings: {bleu4, bleu1, bleu2, bleu3} (fractions)."""
    sentence_bleu = _sentence_bleu()
    with warnings.catch_warnings():
        # NLTK warns for every zero n-gram count ("The hypothesis contains 0 counts of ...").
        warnings.simplefilter("ignore", UserWarning)
        return {
            name: float(sentence_bleu([gt.split()], pred.split(), weights=weights))
            for name, _, weights in BLEU_SCORES
        }


def closed_hit(pred: str, gt: str) -> float:
    """1.0 if the prepared ground truth equals or is a substring of the prepared prediction."""
    return float(gt == pred or gt in pred)


# What each of our names holds under "released", and the released table's row for it.
RELEASED_NAMES = {
    "exact_match": "exact match score",
    "f1": "f1 score",
    "precision": "precision",
    "recall": "recall",
    **{name: released for name, released, _ in BLEU_SCORES},
    "closed_accuracy": "close accuracy",
}


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else math.nan


def score_answers_released(
    preds: Sequence[object], refs: Sequence[Mapping[str, object]]
) -> dict[str, float]:
    """The released evaluator's means over a set of answers, under our metric names.

    ``refs[i]`` is ``{"gt": ..., "answer_type": "OPEN" | "CLOSED" | None}`` (other keys, e.g.
    ``candidates``, are ignored as the released script ignores them). Returns the keys of
    ``answer_metrics.score_answers``: exact_match over all items; precision, recall, f1 (and
    open_recall, open_f1, the same numbers) and bleu1..bleu4 over OPEN items; closed_accuracy
    over CLOSED items; NaN for a mean over no items; num_open and num_closed.
    """
    check_answer_count(preds, refs)
    names = ["exact_match", "precision", "recall", "f1", "closed_accuracy"]
    per: dict[str, list[float]] = {n: [] for n in names + [n for n, _, _ in BLEU_SCORES]}
    for i, (pred, ref) in enumerate(zip(preds, refs)):
        answer_type = ref.get("answer_type") or "OPEN"
        if answer_type not in ANSWER_TYPES:
            raise ValueError(
                f"refs[{i}]['answer_type'] must be OPEN or CLOSED, got {answer_type!r}"
            )
        if pred is None or ref.get("gt") is None:
            raise ValueError(f"item {i}: the prediction or refs[{i}]['gt'] is missing (None)")
        p_text, gt_text = prepare(pred, ref["gt"])
        per["exact_match"].append(float(p_text == gt_text))
        if answer_type == "OPEN":
            precision, recall, f1 = prf(p_text, gt_text)
            per["precision"].append(precision)
            per["recall"].append(recall)
            per["f1"].append(f1)
            for name, value in bleu(p_text, gt_text).items():
                per[name].append(value)
        else:
            per["closed_accuracy"].append(closed_hit(p_text, gt_text))
    scores = {name: _mean(values) for name, values in per.items()}
    scores["open_recall"], scores["open_f1"] = scores["recall"], scores["f1"]
    scores["num_closed"] = float(len(per["closed_accuracy"]))
    scores["num_open"] = float(len(per["f1"]))
    return scores
