"""Multi-host for real: two processes on localhost (CPU backend, gloo collectives) through the CLI.

The two processes (4 CPU devices each) share one workdir, as hosts share a filesystem: orbax
writes the checkpoints cooperatively, process 0 alone writes the results. Their trained adapters
must equal those of one process over 8 devices, because every process reads only its rows of
the same global batches. The reference is a third process, started alongside, so the three
compile in parallel.
"""

import json
import logging
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mslora_jax.config import TaskConfig, experiment_config, synthetic_task
from mslora_jax.data.synthetic import SyntheticTaskSpec
from mslora_jax.data.synthetic_vqa import write_synthetic_vqa_task
from mslora_jax.errors import ConfigError
from mslora_jax.families.llava import setup as llava_setup
from mslora_jax.parallel import distributed
from mslora_jax.train.checkpoints import read_tree_on_one_device
from tests.helpers import ROOT, load_config_file, smoke_dict

METHOD = "mslora_cr_ortho"
TIMEOUT_S = 480  # a hung collective must fail the test, not hang the CI job
# Cheap compiles (~40% less CPU on this tiny model); the same for all three processes, so the
# comparison is program against program.
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count="


def _config() -> dict:
    cfg = smoke_dict(
        **{
            "backbone.source": "random",
            "methods": (METHOD,),
            "train.steps_per_task": 4,
            "num_devices": 0,
        }
    )
    cfg["stream"] = cfg["stream"][:2]  # two stages
    return cfg


def _write_config_file(path, cfg: dict) -> None:
    path.write_text(
        "import json\n\nimport ml_collections\n\n"
        f"CONFIG = json.loads({json.dumps(json.dumps(cfg))})\n\n\n"
        "def get_config():\n    return ml_collections.ConfigDict(CONFIG)\n"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(config_file, workdir, log, devices: int, *flags: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{XLA_FLAGS}{devices}",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
    }
    command = [
        *(sys.executable, "-m", "mslora_jax.cli.main", "run"),
        *("--config", str(config_file), "--workdir", str(workdir), *flags),
    ]
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait(procs, logs) -> list[str]:
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    texts = [log.read_text() for log in logs]
    for log, proc, text in zip(logs, procs, texts):
        assert proc.returncode == 0, f"{log.name}: exit {proc.returncode}\n{text[-4000:]}"
    return texts


def _stage_adapters(workdir) -> list[dict]:
    """Each stage's adapter as numpy, restored onto one device whatever topology saved it."""
    directory = (workdir / "checkpoints" / METHOD).absolute()
    stages = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    return [read_tree_on_one_device(directory / str(stage) / "adapter") for stage in stages]


def test_two_processes_train_what_one_process_trains(tmp_path):
    cfg = _config()
    config_file = tmp_path / "config.py"
    _write_config_file(config_file, cfg)
    two, one = tmp_path / "two_processes", tmp_path / "one_process"
    logs = [tmp_path / name for name in ("process_0.log", "process_1.log", "reference.log")]
    address = f"--coordinator_address=127.0.0.1:{_free_port()}"
    procs = [
        _start(config_file, two, logs[i], 4, address, "--num_processes=2", f"--process_id={i}")
        for i in range(2)
    ]
    procs.append(_start(config_file, one, logs[2], 8))
    texts = _wait(procs, logs)

    # Process 0 alone wrote (and printed) the run's files; the logs say who speaks.
    assert f"| {METHOD} |" in texts[0] and f"| {METHOD} |" not in texts[1]
    assert "[process 0/2]" in texts[0] and "[process 1/2]" in texts[1]
    assert "[process" not in texts[2]
    written = sorted(p.name for p in two.iterdir() if p.is_file())
    assert written == sorted(p.name for p in one.iterdir() if p.is_file())
    assert "results.json" in written and "config.json" in written
    assert not [name for name in written if name.startswith(".")]  # no stray temporaries
    # The pictures too: every process read the checkpoints (orbax's barriers), process 0 drew.
    plots = [sorted(p.name for p in (d / "plots").iterdir()) for d in (two, one)]
    assert plots[0] == plots[1] == [f"adapter_similarity_{METHOD}.png", f"loss_{METHOD}.png"]
    results, reference = (json.loads((d / "results.json").read_text()) for d in (two, one))
    assert results["backbone"]["num_devices"] == reference["backbone"]["num_devices"] == 8
    # Accuracies agree to within one test example (an argmax may flip on rounding).
    np.testing.assert_allclose(
        np.asarray(results["methods"][METHOD]["acc_matrix"], float),
        np.asarray(reference["methods"][METHOD]["acc_matrix"], float),
        atol=1.5 / cfg["stream"][0]["num_test"],
    )

    # The trained adapters of both stages: equal up to the rounding of the collectives.
    stages_two, stages_one = _stage_adapters(two), _stage_adapters(one)
    assert len(stages_two) == len(stages_one) == 2
    for adapter_two, adapter_one in zip(stages_two, stages_one):
        assert jax.tree.structure(adapter_two) == jax.tree.structure(adapter_one)
        for a, b in zip(jax.tree.leaves(adapter_two), jax.tree.leaves(adapter_one)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- the pieces, in this process (nothing is initialised) -------------------------------------


def test_a_plain_run_initialises_nothing():
    assert distributed.initialize_distributed(environ={}) is False
    assert distributed.initialize_distributed(mode="off", environ={}) is False
    assert distributed.is_primary()
    distributed.sync_processes("alone")  # free with one process


@pytest.mark.parametrize(
    "kwargs, environ, message",
    [
        ({"coordinator_address": "localhost:1234"}, {}, r"missing \['num_processes', 'process_id"),
        ({"num_processes": 2}, {"MSLORA_PROCESS_ID": "0"}, "coordinator_address"),
        ({}, {"MSLORA_NUM_PROCESSES": "two"}, "MSLORA_NUM_PROCESSES='two'"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "process_id"),
        ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, {}, "num_proc"),
        ({"mode": "slurm"}, {}, "one of"),
        ({}, {"MSLORA_DISTRIBUTED": "yes"}, "one of"),
    ],
)
def test_bad_distributed_settings_name_what_is_wrong(kwargs, environ, message):
    with pytest.raises(ConfigError, match=message):
        distributed.initialize_distributed(**kwargs, environ=environ)


def test_log_filter_prefixes_once():
    record = logging.LogRecord("mslora_jax", logging.INFO, __file__, 1, "step %d", (3,), None)
    first, second = distributed.ProcessLogFilter(1, 2), distributed.ProcessLogFilter(1, 2)
    assert first.filter(record) and second.filter(record)  # e.g. two handlers
    assert record.getMessage() == "[process 1/2] step 3"


def test_synthetic_task_written_by_another_process_meanwhile_is_used(tmp_path, monkeypatch):
    config = experiment_config(load_config_file("demo_generative.py"))
    task = TaskConfig(**synthetic_task("p", "pathology", 5, num_train=4, num_test=2))
    folder = tmp_path / "data" / task.name
    real = write_synthetic_vqa_task

    def racing(spec: SyntheticTaskSpec, target, **kwargs):
        real(spec, target, **kwargs)  # the other process renames its copy into place first
        return real(spec, target, **kwargs)  # ours then finds the folder full

    monkeypatch.setattr(llava_setup, "write_synthetic_vqa_task", racing)
    (loaded,) = llava_setup.load_generative_tasks(config, [task], tmp_path)
    assert len(loaded.examples) == 4
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # temp removed
