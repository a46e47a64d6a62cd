"""The quickstart notebook is valid and its code cells compile (running it is the smoke run)."""

import json

from tests.helpers import ROOT


def test_notebook_code_cells_compile():
    notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert cells
    for i, cell in enumerate(cells):
        compile("".join(cell["source"]), f"quickstart.ipynb cell {i}", "exec")
