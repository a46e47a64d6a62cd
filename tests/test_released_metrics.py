"""``eval.metrics="released"``: the released MSLoRA-CR evaluator's numbers; ``mslora-jax score``.

Two kinds of reference:

* Values recorded from the released evaluator itself (VentusAislant/MSLoRA_CR,
  ``llava/eval/report_results.py::evaluate`` with ``eval_metrics/glossary.py`` and
  ``evaluate_metrics.py``, nltk 3.10.4), run once in a scratch process on the answers of
  ``_CASE`` below (``PYTHONPATH=<released repo> python -c ...``, its ``tabulate`` swapped for
  ``repr`` to read the means at full precision). The released code is not needed here.
* Hand-computed cases for each quirk (docstring of ``mslora_jax.eval.released_metrics``).

The check against every released ``results/*/*/answer-file.jsonl`` is
``experiments/check_released_metrics.py`` (the released files are not shipped).
"""

import json
import math
import os
import subprocess
import sys

import pytest

from mslora_jax.cli import main as cli_main
from mslora_jax.config import experiment_config
from mslora_jax.errors import CheckpointError, ConfigError, DataError
from mslora_jax.eval import released_metrics as rm
from mslora_jax.eval.answer_metrics import score_answers
from mslora_jax.eval.scoring import score_answer_file, score_answers_as
from tests.helpers import ROOT, load_config_file

# (prediction, ground truth, answer_type; None = key missing), one quirk or more each.
_CASE = [
    ("The histones", "the histone subunits", "OPEN"),
    ("dont know, two lesions", "don't know 2 lesions", "OPEN"),  # contraction, number word
    ("normal", "no", "CLOSED"),  # substring hit
    ("Yes, no", "yes", "CLOSED"),  # substring hit
    ("pneumonia", "normal", "CLOSED"),
    ("mass mass mass", "mass lesion", "OPEN"),  # tp counts the prediction's repeats
    (
        "ok " * 40,
        "ok. " * 40,
        "OPEN",
    ),  # (= _OKS below)  # only 32 periods deleted per normalization
    ("ASSISTANT: chest", "Chest", "OPEN"),  # "assistant:" dropped
    ("left lung", "left lower lung", None),  # missing type: OPEN
    ("", "lung", "OPEN"),
    ("3,000 cells (approx)", "3000 cells approx", "OPEN"),  # digit,digit: punctuation deleted
    ("none", "0", "OPEN"),
    ("cat sat on mat today", "cat sat on mat", "OPEN"),
    ("cat sat", "cat sat on mat", "OPEN"),  # brevity penalty
    ("Negative", "Negative", "CLOSED"),
]
# The released evaluator's table for _CASE (percent, full precision; see the module docstring).
_RELEASED_TABLE = {
    "exact match score": 33.33333333333333,
    "f1 score": 74.66089466089467,
    "precision": 80.0,
    "recall": 71.96969696969697,
    "bleu_score": 22.37045046034944,
    "bleu_score_1": 62.79766758379463,
    "bleu_score_2": 35.570465782211244,
    "bleu_score_3": 31.419457735247207,
    "close accuracy": 75.0,
}
# Per answer, from the same scratch run: the inputs, the two prepared strings, calculate_f1score's
# (precision, recall, f1) and sentence_bleu with weights 1/4 x 4, (1,0,0,0), (0,1,0,0), (0,0,1,0).
_OKS = "ok " * 40, "ok. " * 40
_RELEASED_ITEMS = [
    (_CASE[0][:2], ("histones", "histone subunits"), (0, 0, 0), (0, 0, 0, 0)),
    (_CASE[1][:2], ("don't know 2 lesions",) * 2, (1, 1, 1), (1, 1, 1, 1)),
    (_CASE[3][:2], ("yes no", "yes"), (0.5, 1, 2 / 3), (1.5319719891192393e-231, 0.5, 0, 0)),
    (
        _CASE[5][:2],
        ("mass mass mass", "mass lesion"),
        (1, 0.75, 6 / 7),
        (1.384292958842266e-231, 1 / 3, 0, 0),
    ),
    (
        _OKS,
        (" ".join(["ok"] * 40), " ".join(["ok"] * 32 + ["ok."] * 8)),
        (1, 1, 1),  # normalized again inside F1: the last 8 periods go too
        (0.7920092456620161, 0.8, 0.7948717948717948, 0.7894736842105263),
    ),
    (_CASE[7][:2], ("chest", "chest"), (1, 1, 1), (1.821831989445342e-231, 1, 0, 0)),
    (
        _CASE[10][:2],
        ("3000 cells approx",) * 2,
        (1, 1, 1),
        (1.2213386697554703e-77, 1, 1, 1),
    ),
    (
        _CASE[13][:2],
        ("cat sat", "cat sat on mat"),
        (1, 0.5, 2 / 3),
        (5.487540440520353e-155, math.exp(-1), math.exp(-1), 0),
    ),
]


def _write_answers(path, rows, pred_key="text"):
    lines = []
    for i, (pred, gt, answer_type) in enumerate(rows):
        record = {"question_id": i, "prompt": "q", pred_key: pred, "gt": gt}
        if answer_type is not None:
            record["answer_type"] = answer_type
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_matches_the_released_evaluator_on_a_hand_made_file(tmp_path):
    scores = score_answer_file(_write_answers(tmp_path / "a.jsonl", _CASE), "released")
    ours = {released: 100 * scores[name] for name, released in rm.RELEASED_NAMES.items()}
    assert ours == pytest.approx(_RELEASED_TABLE, abs=1e-9)
    assert (scores["num_open"], scores["num_closed"]) == (11, 4)
    assert (scores["open_f1"], scores["open_recall"]) == (scores["f1"], scores["recall"])


@pytest.mark.parametrize("raw, prepared, prf, bleu", _RELEASED_ITEMS)
def test_each_answer_matches_the_released_evaluator(raw, prepared, prf, bleu):
    assert rm.prepare(*raw) == prepared
    assert rm.prf(*prepared) == pytest.approx(prf, abs=1e-12)
    b = rm.bleu(*prepared)
    # Tiny values (NLTK's float_info.min for a zero precision) compare to 1e-300 absolute.
    ours = [b["bleu4"], b["bleu1"], b["bleu2"], b["bleu3"]]
    assert ours == pytest.approx(bleu, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The two (left) lungs; dont.", "2 left lungs don't"),  # articles, numbers, contractions
        ("x-ray/ct", "x ray ct"),  # not beside a space: replaced by a space
        ("left - lung", "left lung"),  # "- " in the input: deleted (the spaces split anyway)
        ("x-ray, 3,000", "xray 3000"),  # a digit,digit anywhere: every listed sign deleted
        ("1.5 cm. 2.", "1.5 cm 2"),  # a period before a digit stays
        ("none of a kind", "0 of kind"),  # number words are mapped before articles go
        ("somebody'd dont", "somebodyd don't"),  # the table's one apostrophe-removing entry
        ("it's 5: ok*", "it's 5: ok*"),  # ' : * are not in the list
    ],
)
def test_normalize_hand_computed(text, expected):
    assert rm.normalize(text) == expected


def test_only_32_periods_are_deleted():
    assert rm.normalize("a. " * 40) == " ".join(["a."] * 8)  # the 32 "a" are articles
    assert rm.normalize("x. " * 40) == " ".join(["x"] * 32 + ["x."] * 8)


def test_prf_hand_computed():
    # pred counts {mass: 2, big: 1}, gt {mass: 1, lesion: 1}: tp = 2 (the prediction's count),
    # fp = 1, fn = 1 -> precision 2/3, recall 2/3 (the clean multiset overlap would give 1/3, 1/2).
    assert rm.prf("mass big mass", "mass lesion") == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert rm.prf("", "") == (0.0, 0.0, 0.0)  # two empty answers score 0, not 1
    assert rm.prf("a", "lung") == (0.0, 0.0, 0.0)  # "a" is an article: empty after normalizing


def test_bleu_hand_computed():
    # c = 5 >= r = 4: no brevity penalty; p1..p4 = 4/5, 3/4, 2/3, 1/2.
    b = rm.bleu("cat sat on mat today", "cat sat on mat")
    assert b["bleu4"] == pytest.approx((0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25, rel=1e-12)
    assert (b["bleu1"], b["bleu2"], b["bleu3"]) == pytest.approx((0.8, 0.75, 2 / 3), rel=1e-12)
    # c = 2 < r = 4: BP = exp(1 - 4/2); no trigram: p3 = float_info.min, so bleu3 and bleu4 ~ 0.
    b = rm.bleu("cat sat", "cat sat on mat")
    assert (b["bleu1"], b["bleu2"]) == pytest.approx((math.exp(-1), math.exp(-1)), rel=1e-12)
    assert max(b["bleu3"], b["bleu4"]) < 1e-100
    assert rm.bleu("", "lung") == {"bleu4": 0.0, "bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0}


def test_closed_accuracy_is_a_substring_test():
    assert rm.closed_hit(*rm.prepare("Normal.", "no")) == 1.0  # "no" in "normal"
    assert rm.closed_hit(*rm.prepare("no", "yes")) == 0.0
    assert rm.closed_hit(*rm.prepare("The answer: Positive", "positive")) == 1.0


def test_averages_over_open_or_closed_items_only():
    preds, refs = (
        ["cat sat on mat", "yes"],
        [
            {"gt": "cat sat on mat", "answer_type": "OPEN"},
            {"gt": "no", "answer_type": "CLOSED"},
        ],
    )
    released = score_answers_as("released", preds, refs)
    assert (released["f1"], released["bleu1"], released["closed_accuracy"]) == (1.0, 1.0, 0.0)
    assert released["exact_match"] == 0.5
    assert score_answers_as("clean", preds, refs)["f1"] == 0.5  # clean: over both items
    closed_only = score_answers_as("released", ["no"], [{"gt": "no", "answer_type": "CLOSED"}])
    assert math.isnan(closed_only["f1"]) and closed_only["closed_accuracy"] == 1.0
    with pytest.raises(ValueError, match="must be OPEN or CLOSED"):
        score_answers_as("released", ["x"], [{"gt": "x", "answer_type": "open-ended"}])
    with pytest.raises(ConfigError, match="eval.metrics='vqa' is unknown"):
        score_answers_as("vqa", preds, refs)


def test_clean_metrics_are_unchanged(tmp_path):
    rows = [(p, g, t or "OPEN") for p, g, t in _CASE]
    scores = score_answer_file(_write_answers(tmp_path / "a.jsonl", rows, "answer"), "clean")
    preds, refs = [r[0] for r in rows], [{"gt": r[1], "answer_type": r[2]} for r in rows]
    assert scores == score_answers(preds, refs)
    assert scores["f1"] != pytest.approx(_RELEASED_TABLE["f1 score"] / 100, abs=0.01)


def test_answer_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        score_answer_file(tmp_path / "missing.jsonl", "released")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "gt": "a"}\n\n{"text": "a", "gt": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 3: malformed JSON"):
        score_answer_file(bad, "released")
    bad.write_text('{"text": "a", "gt": "a"}\n{"text": "a"}\n')
    with pytest.raises(DataError, match=r"line 2: no 'gt' / 'ground_truth' key"):
        score_answer_file(bad, "released")
    bad.write_text('{"text": "a", "gt": "a", "answer_type": "yes/no"}\n')
    with pytest.raises(DataError, match=r"line 1: answer_type must be OPEN or CLOSED"):
        score_answer_file(bad, "released")
    bad.write_text('{"text": "a", "gt": "a"}\n')  # the clean metrics need an answer_type
    with pytest.raises(DataError, match=r"bad.jsonl: refs\[0\]\['answer_type'\]"):
        score_answer_file(bad, "clean")
    assert score_answer_file(bad, "released")["exact_match"] == 1.0


def test_eval_metrics_key_is_checked_and_defines_results():
    """eval.metrics: clean by default, released in the paper config, a bad value named; released
    is part of the fingerprint, while a workdir written before the key still matches."""
    from mslora_jax.run.experiment import fingerprint
    from mslora_jax.train.checkpoints import check_same_config

    cfg = load_config_file("demo.py")
    clean = experiment_config(cfg)
    assert clean.eval.metrics == "clean"
    assert "eval" not in fingerprint(clean)  # what a workdir written before the key holds
    assert experiment_config(load_config_file("paper_8task.py")).eval.metrics == "released"
    cfg.eval = {"metrics": "paper"}
    with pytest.raises(ConfigError, match=r"eval\.metrics='paper' is unknown; expected one of"):
        experiment_config(cfg)
    cfg.eval = {"metrics": "released"}
    released = fingerprint(experiment_config(cfg))
    assert released["eval"] == {"metrics": "released"}
    check_same_config(fingerprint(clean), fingerprint(clean), "workdir")
    with pytest.raises(CheckpointError, match=r"eval: None -> \{'metrics': 'released'\}"):
        check_same_config(fingerprint(clean), released, "workdir")


def _score(capsys, *args):
    """``mslora-jax score ARGS`` in-process: (exit code, stdout, stderr); 0 when it returns."""
    try:
        cli_main.main(["mslora-jax", "score", *args])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def test_score_command_end_to_end(tmp_path, capsys):
    path = _write_answers(tmp_path / "answer-file.jsonl", _CASE)
    code, out, err = _score(capsys, "--answers", str(path))
    assert code == 0, err
    assert out.startswith("metrics: released (11 open, 4 closed answers)")
    assert "f1               f1 score             74.6609" in out
    assert "closed_accuracy  close accuracy       75.0000" in out
    code, _, err = _score(capsys, "--answers", str(path), "--metrics", "clean")
    assert code == 2 and "answer_type" in err  # line 9 has none: clean refuses to guess
    typed = _write_answers(tmp_path / "typed.jsonl", [(p, g, t or "OPEN") for p, g, t in _CASE])
    code, out, _ = _score(capsys, "--answers", str(typed), "--metrics", "clean", "--json")
    # Clean exact match: only "ok " * 40 and "Negative" (no number words, contractions or
    # "assistant:"; "3,000" is "3 000").
    assert code == 0 and json.loads(out)["exact_match"] == pytest.approx(2 / 15)
    code, out, err = _score(capsys, "--answers", str(tmp_path / "none.jsonl"))
    assert code == 2 and err.startswith("error: ") and "none.jsonl: file not found" in err
    assert err.count("\n") == 1
    code, _, err = _score(capsys, "--answers", str(path), "--metrics", "vqa")
    assert code == 2 and "released" in err


def test_check_script_passes_and_fails(tmp_path):
    """experiments/check_released_metrics.py on a results/ folder holding _CASE with the released
    table (as report_results.py writes it: tabulate, six significant digits)."""
    task = tmp_path / "results" / "run" / "task"
    task.mkdir(parents=True)
    _write_answers(task / "answer-file.jsonl", _CASE)
    rows = [f"{name:<17}  {value:13.6g}" for name, value in _RELEASED_TABLE.items()]
    table = "Metric               Performance\n-----------------  -------------\n"
    (task / "metrics.txt").write_text(table + "\n".join(rows))
    script = str(ROOT / "experiments" / "check_released_metrics.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    run = [sys.executable, script, "--results", str(tmp_path / "results")]
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "run/task" in done.stdout and "1 files" in done.stdout and "OK" in done.stdout
    rows[1] = f"{'f1 score':<17}  {74.6809:13.6g}"  # 0.02 points off
    (task / "metrics.txt").write_text(table + "\n".join(rows))
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "FAILED" in done.stdout and "f1 score" in done.stdout


def test_task_metrics_report_says_whose_metrics():
    from mslora_jax.report.task_metrics import format_task_metrics_markdown, validate_task_metrics

    report = {
        "tasks": [{"name": "t", "modality": "m", "primary_metric": "f1"}],
        "zero_shot": [{"f1": 0.5}],
        "methods": {"seq": [[{"f1": 0.75}]]},
    }
    validate_task_metrics(report)  # written before the key: still valid, no note
    assert format_task_metrics_markdown(report).startswith("| method |")
    released = {**report, "answer_metrics": "released"}
    validate_task_metrics(released)
    text = format_task_metrics_markdown(released)
    assert text.startswith("Answer metrics: released (the released MSLoRA-CR evaluator's")
    assert text.endswith(format_task_metrics_markdown(report))  # the same table below the note
    with pytest.raises(DataError, match=r"\['answer_metrics'\]: is 'paper'; expected one of"):
        validate_task_metrics({**report, "answer_metrics": "paper"})
