"""End to end: results files, checkpoints, exact resume, and errors for bad input."""

import hashlib
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from mslora_jax.cli.inspect import inspect_adapters, load_stage_adapters
from mslora_jax.errors import CheckpointError, ConfigError, DataError
from mslora_jax.report.results import load_results
from mslora_jax.report.task_metrics import validate_task_metrics
from mslora_jax.run.experiment import run_experiment
from mslora_jax.train import stream
from mslora_jax.train.checkpoints import StageCheckpoints
from tests.helpers import ROOT, smoke_config

METHODS = ("seq", "mslora_cr")


def _config(**overrides):
    return smoke_config(**{"methods": METHODS, "num_devices": 1, **overrides})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    return workdir, run_experiment(_config(), workdir)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_writes_results_tables_and_plots(full_run):
    workdir, results = full_run
    for name in ("results.json", "results.md", "results.csv", "acc_matrices.png", "config.json"):
        assert (workdir / name).exists(), name
    assert load_results(workdir / "results.json")["methods"].keys() == set(METHODS)
    seq = results["methods"]["seq"]
    # Stage 0 evaluates task 1 too (the superdiagonal forward transfer reads), not task 2.
    assert len(seq["acc_matrix"]) == 3 and seq["acc_matrix"][0][2] is None
    assert seq["acc_matrix"][0][1] is not None and seq["fwt"] is not None
    assert results["methods"]["mslora_cr"]["train_steps_per_s"] > 0
    assert len(results["backbone"]["zero_shot_acc"]) == 3
    assert "| mslora_cr |" in (workdir / "results.md").read_text()
    # The per-task metric table: the dual encoder's only metric is accuracy, which fills the
    # accuracy matrix, stage by stage.
    report = json.loads((workdir / "task_metrics.json").read_text())
    validate_task_metrics(report)
    assert [t["primary_metric"] for t in report["tasks"]] == ["accuracy"] * 3
    for method in METHODS:
        matrix = results["methods"][method]["acc_matrix"]
        stages = report["methods"][method]
        assert [[None if m is None else m["accuracy"] for m in row] for row in stages] == matrix
    assert [m["accuracy"] for m in report["zero_shot"]] == results["backbone"]["zero_shot_acc"]
    table = (workdir / "task_metrics.md").read_text().splitlines()
    assert len(table) == 2 + 3 * (1 + len(METHODS))  # header, rule, (frozen + methods) x tasks
    assert (workdir / "task_metrics.csv").read_text().startswith("method,task,modality,")


def test_interrupted_then_resumed_run_equals_uninterrupted(full_run, tmp_path, monkeypatch):
    full_dir, full_results = full_run
    original = stream.train_stage

    def crash_at_stage_2(exp, method, stage, slots, *args):
        if method.name == "mslora_cr" and stage == 2:
            raise KeyboardInterrupt("simulated interruption")
        return original(exp, method, stage, slots, *args)

    monkeypatch.setattr(stream, "train_stage", crash_at_stage_2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_config(), tmp_path)
    assert StageCheckpoints(tmp_path / "checkpoints" / "mslora_cr").finished_stages() == [0, 1]
    assert not (tmp_path / "results.json").exists()
    monkeypatch.setattr(stream, "train_stage", original)
    resumed = run_experiment(_config(), tmp_path)
    for method in METHODS:
        a = load_stage_adapters(full_dir, method)
        b = load_stage_adapters(tmp_path, method)
        assert [m["task"] for m, _ in a] == [m["task"] for m, _ in b]
        for (_, pa), (_, pb) in zip(a, b):
            chex.assert_trees_all_equal(pa, pb)
        assert (
            resumed["methods"][method]["acc_matrix"]
            == full_results["methods"][method]["acc_matrix"]
        )
    assert (tmp_path / "task_metrics.json").read_text() == (
        full_dir / "task_metrics.json"
    ).read_text()
    # The log of the interrupted run is kept and the rerun appends: mslora_cr's stage 2 rows
    # come once, after its first two stages' rows (which the rerun restored, not retrained).
    rows = [json.loads(line) for line in (tmp_path / "logs" / "train.jsonl").open()]
    cr = [(r["kind"], r["stage"]) for r in rows if r["method"] == "mslora_cr"]
    assert cr.count(("stage", 2)) == 1 and cr.index(("stage", 1)) < cr.index(("stage", 2))


def test_training_log_jsonl_and_tensorboard(full_run):
    """Per-step scalars every train.log_every_steps steps (and at each stage's last step) and
    each stage's row, in logs/train.jsonl and TensorBoard event files per method."""
    workdir, results = full_run
    rows = [json.loads(line) for line in (workdir / "logs" / "train.jsonl").open()]
    steps = [r for r in rows if r["kind"] == "step" and r["method"] == "mslora_cr"]
    per_stage = _config().train.steps_per_task
    assert [r["step"] for r in steps if r["stage"] == 0] == [0, per_stage - 1]
    assert [r["method_step"] for r in steps] == [
        s * per_stage + i for s in range(3) for i in (0, per_stage - 1)
    ]
    for r in steps:
        assert {"loss", "task_loss", "cr", "ortho", "grad_norm", "lr"} <= r.keys()
        assert all(np.isfinite(r[k]) for k in ("loss", "cr", "ortho", "grad_norm"))
    assert steps[-1]["steps_per_s"] > 0 and steps[1]["cr"] == 0.0 and steps[3]["cr"] > 0
    stages = [r for r in rows if r["kind"] == "stage" and r["method"] == "seq"]
    assert [r["row"] for r in stages] == results["methods"]["seq"]["acc_matrix"]
    for method in METHODS:
        events = list((workdir / "logs" / "tensorboard" / method).glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 100


def test_run_time_knobs_may_change_on_resume(full_run):
    """Evaluation batch size, accumulation, logging cadence: a rerun resumes every stage."""
    from mslora_jax.run.experiment import fingerprint

    workdir, results = full_run
    knobs = {"train.eval_batch_size": 16, "train.micro_batch_size": 16, "train.log_every_steps": 5}
    assert fingerprint(_config(**knobs)) == fingerprint(_config())
    assert fingerprint(_config(**{"lora.rank": 3})) != fingerprint(_config())
    resumed = run_experiment(_config(**knobs), workdir)
    for method in METHODS:
        assert resumed["methods"][method]["acc_matrix"] == results["methods"][method]["acc_matrix"]


def test_rerun_with_a_different_config_is_refused_and_keeps_files(full_run):
    workdir, _ = full_run
    before = {p: _digest(p) for p in workdir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"different config.*lora\.rank"):
        run_experiment(_config(**{"lora.rank": 3}), workdir)
    assert {p: _digest(p) for p in workdir.rglob("*") if p.is_file()} == before


def test_checkpoint_round_trip_and_fingerprint_check(tmp_path):
    ckpt = StageCheckpoints(tmp_path / "m")
    adapter = {"x": {"lora_a": np.arange(6.0).reshape(2, 3), "lora_b": np.ones((4, 2))}}
    trainer = {"step": np.int32(7), "mu": np.full((3,), 0.5)}
    ckpt.save(0, adapter, trainer, {"row": [0.5]}, {"fingerprint": {"a": 1}})
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    got_adapter, got_trainer, metrics, meta = ckpt.restore(
        0, abstract(adapter), abstract(trainer), {"a": 1}
    )
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, got_adapter), adapter)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, got_trainer), trainer)
    assert metrics == {"row": [0.5]}
    with pytest.raises(CheckpointError, match="different config"):
        ckpt.restore(0, abstract(adapter), abstract(trainer), {"a": 2})


def test_inspect_lists_adapters_and_rejects_bad_task(full_run):
    workdir, _ = full_run
    text = inspect_adapters(workdir, "mslora_cr")
    assert "path_a" in text and "CR similarity" in text
    assert "rad_a" in inspect_adapters(workdir, "mslora_cr", "rad_a")
    with pytest.raises(ConfigError, match="task id 7 is out of range"):
        inspect_adapters(workdir, "mslora_cr", "7")
    with pytest.raises(ConfigError, match="unknown task name"):
        inspect_adapters(workdir, "mslora_cr", "derm_z")
    with pytest.raises(ConfigError, match="unknown method"):
        inspect_adapters(workdir, "icarl")


def test_missing_and_corrupt_npz_are_named(tmp_path):
    task = {
        "name": "real",
        "modality": "radiology",
        "source": "medmnist",
        "file": "nowhere.npz",
        "class_names": ["normal", "pneumonia"],
    }
    config = smoke_config(**{"stream": [task], "data_dir": str(tmp_path)})
    with pytest.raises(DataError, match="nowhere.npz: file not found"):
        run_experiment(config, tmp_path / "w1")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    config = smoke_config(**{"stream": [{**task, "file": "broken.npz"}], "data_dir": str(tmp_path)})
    with pytest.raises(DataError, match="broken.npz"):
        run_experiment(config, tmp_path / "w2")


def _cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "mslora_jax.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_cli_bad_input_exits_nonzero_with_a_clear_message(full_run, tmp_path):
    workdir, _ = full_run
    proc = _cli(
        "run",
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(tmp_path),
        "--config.methods=('mslora','icarl')",
    )
    assert proc.returncode == 2 and "unknown method 'icarl'" in proc.stderr
    results_before = _digest(workdir / "results.json")
    proc = _cli(
        "run",
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(workdir),
        "--config.lora.rank=3",
        "--config.num_devices=1",
    )
    assert proc.returncode == 2 and "different config" in proc.stderr, proc.stderr[-2000:]
    assert _digest(workdir / "results.json") == results_before
    proc = _cli("inspect", "--workdir", str(workdir), "--method", "seq", "--task", "12")
    assert proc.returncode == 2 and "task id 12 is out of range" in proc.stderr
    assert json.loads((workdir / "config.json").read_text())["lora"]["rank"] == 2


def test_saved_backbone_loads_into_a_new_run(full_run, tmp_path):
    full_dir, full_results = full_run
    config = _config(
        **{
            "methods": ("seq",),
            "backbone.source": "load",
            "backbone.path": str(full_dir / "backbone"),
        }
    )
    results = run_experiment(config, tmp_path)
    assert results["backbone"]["zero_shot_acc"] == full_results["backbone"]["zero_shot_acc"]
    assert results["methods"]["seq"]["acc_matrix"] == full_results["methods"]["seq"]["acc_matrix"]
    wrong_model = _config(
        **{
            "backbone.source": "load",
            "backbone.path": str(full_dir / "backbone"),
            "model.width": 64,
        }
    )
    with pytest.raises(CheckpointError, match=r"model\.width|width"):
        run_experiment(wrong_model, tmp_path / "other")
