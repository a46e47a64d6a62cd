"""Every notebook runs top to bottom in a fresh kernel started in its own folder, as Jupyter does.

The kernel is this interpreter (ipykernel's ``python3`` spec resolves to ``sys.executable``) with
one CPU device, as on a laptop; ``MSLORA_NOTEBOOK_QUICK=1`` shrinks what a notebook trains, and
TMPDIR puts its workdir under the test's temporary folder.
"""

import os
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

import mslora_jax
from tests.helpers import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# Run last in each kernel: which interpreter, package and working directory the notebook had.
_WHERE = "import os, sys, mslora_jax\nprint(sys.executable, mslora_jax.__file__, os.getcwd())"

# A line of each notebook's outputs that shows it got to the point, not only that nothing raised.
_SHOWS = {
    "quickstart.ipynb": ["| mslora_cr_ortho |", "CR similarity"],
    "generative.ipynb": ["| mslora_cr_ortho |", "adapters [0, 1, 2]"],
    "colab_tpu.ipynb": ["mesh (data, fsdp, tensor)", "train steps/s", "mlp/up kernel"],
    "retrieval.ipynb": ["text to image, task database, versioned", "image -> [{'id': 'test/3'"],
}


def test_all_notebooks_are_found():
    assert {p.name for p in NOTEBOOKS} >= {
        "quickstart.ipynb",
        "generative.ipynb",
        "colab_tpu.ipynb",
        "retrieval.ipynb",
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i}"


def _kernel_env(tmp_path) -> dict:
    env = dict(os.environ)
    # conftest.py forces 8 CPU devices for this process; a user's kernel has one.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    # Compilation is most of a quick notebook's time; unoptimized CPU code roughly halves it
    # and is fast enough for a few steps (the tests check that cells run, not their speed).
    env["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["MSLORA_NOTEBOOK_QUICK"] = "1"
    env["TMPDIR"] = str(tmp_path)  # the notebooks' workdirs are under tempfile.gettempdir()
    # The kernel imports the tree under test, whatever else is installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_from_its_folder(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(_WHERE))
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env=_kernel_env(tmp_path))  # raises CellExecutionError on a failing cell

    where = _text(notebook.cells[-1]).split()
    assert where == [sys.executable, mslora_jax.__file__, str(path.parent)]
    # Each notebook wrote its results under the test's temporary folder, nowhere else.
    assert any(tmp_path.iterdir())
    outputs = "\n".join(_text(c) for c in notebook.cells if c.cell_type == "code")
    assert "Traceback" not in outputs
    for line in _SHOWS.get(path.name, []):
        assert line in outputs, line


def test_colab_tpu_config_is_valid_and_fsdp_sharded():
    from mslora_jax.config import experiment_config
    from tests.helpers import load_config_file

    config = experiment_config(load_config_file("colab_tpu.py"))
    assert config.mesh.shape == (1, -1, 1) and config.llava.dtype == "bfloat16"
    # Bigger than the CPU demo's decoder, which is what makes it worth a TPU.
    demo = experiment_config(load_config_file("demo_generative.py"))
    assert config.llava.decoder.width * config.llava.decoder.depth > 30 * (
        demo.llava.decoder.width * demo.llava.decoder.depth
    )
