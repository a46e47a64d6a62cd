"""A whole generative run through ``run_experiment``: files written, answers saved, exact resume."""

import json

import pytest

from mslora_jax.config import experiment_config, synthetic_task
from mslora_jax.eval.scoring import score_answer_file
from mslora_jax.report.results import load_results
from mslora_jax.report.task_metrics import validate_task_metrics
from mslora_jax.run.experiment import ZERO_SHOT_DIR, run_experiment
from mslora_jax.train import stream
from tests.helpers import load_config_file

METHODS = ("seq", "mslora_cr")
PRIMARY = ("closed_accuracy", "f1")
ANSWER_KEYS = {"question_id", "image", "question", "answer", "gt", "answer_type", "candidates"}


def _config():
    """configs/demo_generative.py shrunk to seconds: two small tasks, a few steps."""
    cfg = load_config_file("demo_generative.py").to_dict()
    cfg["methods"] = METHODS
    cfg["stream"] = [
        {
            **synthetic_task("p", "pathology", 5, num_train=48, num_test=20),
            "primary_metric": PRIMARY[0],
        },
        {
            **synthetic_task("r", "radiology", 6, num_train=48, num_test=20),
            "primary_metric": PRIMARY[1],
        },
    ]
    cfg["base_tasks"] = [synthetic_task("b", "pathology", seed=7, num_train=48, num_test=8)]
    cfg["pretrain"].update(steps=20)
    cfg["train"].update(steps_per_task=8, eval_batch_size=16)
    cfg["llava"].update(max_new_tokens=3)
    cfg["num_devices"] = 1
    cfg["progress"] = False
    cfg["eval"] = {"metrics": "released"}  # the paper config's; demo_generative.py's is clean
    return experiment_config(cfg)


@pytest.fixture(scope="module")
def generative_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("generative")
    return workdir, run_experiment(_config(), workdir)


def test_generative_run_writes_results_metric_table_and_answers(generative_run):
    workdir, results = generative_run
    for name in ("results.json", "results.md", "results.csv", "acc_matrices.png"):
        assert (workdir / name).exists(), name
    assert load_results(workdir / "results.json")["methods"].keys() == set(METHODS)
    report = json.loads((workdir / "task_metrics.json").read_text())
    validate_task_metrics(report)
    assert tuple(t["primary_metric"] for t in report["tasks"]) == PRIMARY
    # The accuracy matrix holds each task's primary metric, stage by stage.
    for method in METHODS:
        stages = report["methods"][method]
        expected = [[None if m is None else m[p] for m, p in zip(row, PRIMARY)] for row in stages]
        assert results["methods"][method]["acc_matrix"] == expected
        assert set(stages[-1][0]) >= {"exact_match", "closed_accuracy", "f1", "bleu4", "num_open"}
    for folder in (ZERO_SHOT_DIR, *METHODS):
        for task in ("p", "r"):
            lines = (workdir / "answers" / folder / f"{task}.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]
            assert len(records) == 20 and all(set(r) == ANSWER_KEYS for r in records)
            assert all(isinstance(r["answer"], str) for r in records)
    # The metric table holds the released metrics of exactly the saved answers (mslora-jax score).
    assert report["answer_metrics"] == "released"
    assert (workdir / "task_metrics.md").read_text().startswith("Answer metrics: released (")
    for method in METHODS:
        for t, task in enumerate(("p", "r")):
            scores = score_answer_file(workdir / "answers" / method / f"{task}.jsonl", "released")
            scores = {k: None if v != v else v for k, v in scores.items()}  # NaN -> None
            assert report["methods"][method][-1][t] == scores


def test_generative_rerun_restores_every_stage_and_gives_the_same_files(
    generative_run, monkeypatch
):
    workdir, results = generative_run
    before = {
        p.relative_to(workdir): p.read_bytes()
        for p in [workdir / "results.json", workdir / "task_metrics.json"]
        + sorted((workdir / "answers").rglob("*.jsonl"))
    }

    def no_training(*args):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(stream, "train_stage", no_training)
    rerun = run_experiment(_config(), workdir)
    assert rerun["methods"] == results["methods"]
    after = {p: (workdir / p).read_bytes() for p in before}
    assert after == before
