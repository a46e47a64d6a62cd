"""Runs that are killed (SIGKILL) or preempted (SIGTERM) at any point, then rerun, end exactly
where an uninterrupted run ends: same adapters, same results.json numbers.

One workdir goes through a chain of real subprocess runs of the command line, each stopped at
another point by ``MSLORA_JAX_FAULT`` (``train.faults``): mid-stage, on SIGTERM, during an
in-stage checkpoint save, during a stage's evaluation, and finally a clean finish.
"""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from mslora_jax.errors import TrainingDivergedError
from mslora_jax.run.experiment import run_experiment
from mslora_jax.train.checkpoints import StageCheckpoints, read_tree_on_one_device
from mslora_jax.train.preemption import EXIT_CODE
from tests.helpers import ROOT, smoke_config, smoke_dict

METHOD = "mslora_cr"
STEPS = 6  # per task; in-stage checkpoints every 2 steps, the newest 2 kept
OVERRIDES = {
    "methods": (METHOD,),
    "num_devices": 1,
    "backbone": {"source": "random"},
    "base_tasks": [],
    "train.steps_per_task": STEPS,
    "checkpoint": {"every_steps": 2, "keep": 2},
}


def _run(config_file, workdir, fault=None, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("MSLORA_JAX_FAULT", None)
    if fault:
        env["MSLORA_JAX_FAULT"] = fault
    command = [sys.executable, "-m", "mslora_jax.cli.main", "run", f"--config={config_file}"]
    command += [f"--workdir={workdir}", *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _complete_steps(directory):
    """Steps of the finished in-stage checkpoints in ``directory`` (orbax's tmp folders aside)."""
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _adapters(workdir):
    return {
        stage: read_tree_on_one_device(workdir / "checkpoints" / METHOD / str(stage) / "adapter")
        for stage in range(3)
    }


def _numbers(results):
    """results.json without its timings (those differ between any two runs)."""
    method = {k: v for k, v in results["methods"][METHOD].items() if "per_s" not in k}
    return {"method": method, "zero_shot": results["backbone"]["zero_shot_acc"]}


def test_killed_and_preempted_run_ends_bit_identical(tmp_path):
    config_file = tmp_path / "config.py"
    literal = json.dumps(json.dumps(smoke_dict(**OVERRIDES)))
    config_file.write_text(
        "import json\nimport ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict(json.loads({literal}))\n"
    )
    reference_dir, workdir = tmp_path / "reference", tmp_path / "work"
    reference = run_experiment(smoke_config(**OVERRIDES), reference_dir)
    steps = workdir / "steps" / METHOD

    # 1. SIGKILL mid-stage, after step 5 of stage 1. Saves are asynchronous: step 2's finished
    # before step 4's began (orbax writes one at a time); step 4's may still have been running.
    done = _run(config_file, workdir, "KILL@step:5")
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert _complete_steps(steps / "0") in ([2], [2, 4])
    resumed_at = _complete_steps(steps / "0")[-1]

    # 2. SIGTERM (preemption) one step after the resume: saved there, exit 143, a message.
    done = _run(config_file, workdir, "TERM@step:1")
    assert done.returncode == EXIT_CODE, done.stderr
    assert f"resuming at step {resumed_at} of 6" in done.stderr
    assert f"stopped on SIGTERM after step {resumed_at + 1} of 6" in done.stderr
    assert "Traceback" not in done.stderr
    assert _complete_steps(steps / "0") == [resumed_at, resumed_at + 1]

    # 3. SIGKILL while stage 2's step-4 checkpoint is written (the saves left in stage 1, then
    # stage 2's step 2, then this one): stage 1 is finished and its in-stage checkpoints are
    # gone; stage 2's step-2 checkpoint stays readable and the cut-off one does not count.
    saves = len(range(resumed_at + 2, STEPS + 1, 2)) + 2
    done = _run(config_file, workdir, f"KILL@save:{saves}")
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert StageCheckpoints(workdir / "checkpoints" / METHOD).finished_stages() == [0]
    assert not (steps / "0").exists()
    assert _complete_steps(steps / "1") == [2]
    assert any(p.name.startswith("4.") for p in (steps / "1").iterdir())  # the cut-off save
    trainer = read_tree_on_one_device(steps / "1" / "2" / "trainer")
    assert int(trainer["step"]) == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(trainer))

    # 4. SIGKILL as stage 3's evaluation starts (its 2nd in this run), with another checkpoint
    # cadence (a run-time knob): stage 3's trained state is on disk, its results are not.
    done = _run(config_file, workdir, "KILL@eval:2", "--config.checkpoint.every_steps=3")
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert StageCheckpoints(workdir / "checkpoints" / METHOD).finished_stages() == [0, 1]
    assert _complete_steps(steps / "2")[-1] == STEPS
    assert not (workdir / "results.json").exists()

    # 5. A clean rerun evaluates stage 3 without training it again and finishes.
    done = _run(config_file, workdir)
    assert done.returncode == 0, done.stderr
    assert "resuming at step 6 of 6" in done.stderr
    assert not any(steps.iterdir())  # every stage's in-stage checkpoints were removed
    # A calm console (cli.console): restored stages and the resumed one each get one readable
    # line; no raw metric dicts, no absl-style prefixes, no orbax warnings about metadata.
    lines = done.stderr.splitlines()
    for stage, task in enumerate(("path_a", "rad_a", "path_b")):
        line = next(x for x in lines if x.startswith(f"{METHOD} {stage + 1}/3 {task}: accuracy "))
        assert ("restored from" in line) == (stage < 2), line
    assert not [
        x for x in lines if "{'" in x or "Metadata file" in x or x[:1] in "IWE" and x[1:5].isdigit()
    ]
    results = json.loads((workdir / "results.json").read_text())
    assert _numbers(results) == _numbers(reference)
    for stage, adapter in _adapters(workdir).items():
        expected = _adapters(reference_dir)[stage]
        assert jax.tree.structure(adapter) == jax.tree.structure(expected)
        for got, want in zip(jax.tree.leaves(adapter), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(got, want)


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path):
    """Diverging after a periodic checkpoint: the error names the stage, step and term; that
    checkpoint stays, nothing later is saved, the stage is not finished."""
    config = smoke_config(**{**OVERRIDES, "train.learning_rate": 1e6, "checkpoint.every_steps": 1})
    pattern = r"mslora_cr 1/3 path_a: .* became non-finite .* at step (\d+) of 6"
    with pytest.raises(TrainingDivergedError, match=pattern) as error:
        run_experiment(config, tmp_path)
    assert StageCheckpoints(tmp_path / "checkpoints" / METHOD).finished_stages() == []
    assert not (tmp_path / "results.json").exists()
    bad_step = int(re.search(r"at step (\d+) of 6", str(error.value)).group(1))
    saved = _complete_steps(tmp_path / "steps" / METHOD / "0")
    assert saved and max(saved) < bad_step, (saved, bad_step)
    trainer = read_tree_on_one_device(
        tmp_path / "steps" / METHOD / "0" / str(max(saved)) / "trainer"
    )
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(trainer))
