"""The notebooks are valid and their code cells compile (running them is the smoke run)."""

import json

import pytest

from tests.helpers import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_both_notebooks_are_found():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "generative.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_cells_compile(path):
    notebook = json.loads(path.read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert cells
    for i, cell in enumerate(cells):
        compile("".join(cell["source"]), f"{path.name} cell {i}", "exec")
