"""Sharded search across two processes on localhost (CPU backend, 4 devices each): every process
encodes half of the database, and both get the global top-k that one NumPy argsort gives."""

import os
import socket
import subprocess
import sys

import numpy as np

from tests.helpers import ROOT
from tests.multihost_search_worker import K, data

TIMEOUT_S = 240  # a hung collective must fail the test, not hang the CI job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_answer_the_same_global_top_k(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # fmt: skip
    script = ROOT / "tests" / "multihost_search_worker.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), address, str(i), str(tmp_path / f"rows_{i}.npy")],
            cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    db, queries = data()
    scores = queries.astype(np.float64) @ db.astype(np.float64).T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"rows_{i}.npy"), expected)
