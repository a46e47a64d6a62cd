"""The notebooks are valid and their code cells compile (running them is the smoke run)."""

import json

import pytest

from tests.helpers import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_both_notebooks_are_found():
    assert {p.name for p in NOTEBOOKS} >= {
        "quickstart.ipynb",
        "generative.ipynb",
        "colab_tpu.ipynb",
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_cells_compile(path):
    notebook = json.loads(path.read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert cells
    for i, cell in enumerate(cells):
        compile("".join(cell["source"]), f"{path.name} cell {i}", "exec")


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
