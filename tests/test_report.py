"""results.json schema, the reports written from it, and atomic writes."""

import copy
import csv
import json
import os

import pytest
from matplotlib.figure import Figure

from mslora_jax import io_utils
from mslora_jax.errors import DataError
from mslora_jax.report import results as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_results():
    tasks = [
        {"name": "chest", "modality": "X-ray"},
        {"name": "derma", "modality": "dermoscopy"},
        {"name": "oct", "modality": "OCT"},
    ]
    seq = [[0.9, None, None], [0.7, 0.8, None], [0.5, 0.6, 0.7]]
    return {
        "tasks": tasks,
        "methods": {
            "seq_ft": R.method_summary(seq, [0.4, 0.5, 0.6], 12.5),
            "joint": R.method_summary([[0.95, 0.85, 0.75]], [0.95, 0.85, 0.75], 10.0),
        },
    }


def test_method_summary_hand_computed():
    m = make_results()["methods"]["seq_ft"]
    assert m["avg_acc"] == pytest.approx(0.6)  # (0.5 + 0.6 + 0.7) / 3
    assert m["bwt"] == pytest.approx(-0.3)  # ((0.5 - 0.9) + (0.6 - 0.8)) / 2
    assert m["unified_avg_acc"] == pytest.approx(0.5)
    assert m["train_steps_per_s"] == 12.5
    joint = make_results()["methods"]["joint"]
    assert joint["bwt"] == 0.0 and joint["avg_acc"] == pytest.approx(0.85)


def test_markdown_table():
    table = R.format_markdown_table(make_results())
    lines = table.splitlines()
    assert lines[0] == (
        "| method | avg acc (%) | BWT (pp) | forgetting (pp) | MFT (%) | MAA (%) "
        "| unified avg acc (%) | steps/s | chest | derma | oct |"
    )
    assert lines[2] == (
        "| seq_ft | 60.0 | -30.0 | 30.0 | 80.0 | 75.0 | 50.0 | 12.50 | 50.0 | 60.0 | 70.0 |"
    )
    assert lines[3] == (
        "| joint | 85.0 | 0.0 | 0.0 | 85.0 | 85.0 | 85.0 | 10.00 | 95.0 | 85.0 | 75.0 |"
    )
    assert len(lines) == 4


def test_forward_transfer_from_zero_shot_and_older_results():
    results = make_results()
    results["backbone"] = {"zero_shot_acc": [0.1, 0.2, 0.3]}
    seq = [[0.9, 0.3, None], [0.7, 0.8, 0.5], [0.5, 0.6, 0.7]]
    results["methods"]["seq_ft"] = R.method_summary(seq, [0.4, 0.5, 0.6], 12.5, [0.1, 0.2, 0.3])
    results["methods"]["joint"] = R.method_summary(
        [[0.95, 0.85, 0.75]], [0.95, 0.85, 0.75], 10.0, [0.1, 0.2, 0.3]
    )
    assert results["methods"]["seq_ft"]["fwt"] == pytest.approx((0.1 + 0.2) / 2)
    assert results["methods"]["joint"]["fwt"] is None
    R.validate_results(results)
    assert "| FWT (pp) |" in R.format_markdown_table(results)
    assert "| 15.0 |" in R.format_markdown_table(results) and "| – |" in R.format_markdown_table(
        results
    )
    bad = copy.deepcopy(results)
    bad["methods"]["seq_ft"]["fwt"] = 0.5
    with pytest.raises(DataError, match=r"\['seq_ft'\]\['fwt'\]"):
        R.validate_results(bad)
    # results.json of runs before these metrics existed still load
    older = copy.deepcopy(results)
    for entry in older["methods"].values():
        for key in R.OPTIONAL_METHOD_KEYS:
            entry.pop(key, None)
    R.validate_results(older)
    assert "forgetting" not in R.format_markdown_table(older)


def test_write_results_files(tmp_path):
    results = make_results()
    paths = R.write_results(tmp_path / "run", results)  # parent dir is created
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "acc_matrices.png",
        "results.csv",
        "results.json",
        "results.md",
    ]
    assert R.load_results(paths["results.json"]) == results
    assert paths["results.md"].read_text() == R.format_markdown_table(results) + "\n"
    rows = list(csv.DictReader(paths["results.csv"].open()))
    assert [r["method"] for r in rows] == ["seq_ft", "joint"]
    assert float(rows[0]["bwt"]) == pytest.approx(-0.3)
    assert float(rows[1]["oct"]) == pytest.approx(0.75)
    png = paths["acc_matrices.png"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_write_results_rejects_invalid_and_writes_nothing(tmp_path):
    results = make_results()
    results["methods"]["seq_ft"]["avg_acc"] = 0.9  # inconsistent with the matrix
    with pytest.raises(DataError, match=r"\['seq_ft'\]\['avg_acc'\]"):
        R.write_results(tmp_path, results)
    assert list(tmp_path.iterdir()) == []


def _break(path, value):
    """A copy of make_results() with the value at ``path`` (a list of keys) replaced."""
    obj = copy.deepcopy(make_results())
    node = obj
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return obj


@pytest.mark.parametrize(
    "obj, message",
    [
        ([], "expected an object"),
        (_break(["extra"], 1), "expected an object with keys"),
        (_break(["tasks"], []), r"\['tasks'\]"),
        (_break(["tasks", 0, "modality"], KeyError), r"\['tasks'\]\[0\]"),
        (_break(["tasks", 1, "name"], "chest"), "unique"),
        (_break(["methods"], {}), r"\['methods'\]"),
        (_break(["methods", "joint", "bwt"], KeyError), r"missing keys \['bwt'\]"),
        (_break(["methods", "joint", "seed"], 0), r"unknown keys \['seed'\]"),
        (_break(["methods", "seq_ft", "acc_matrix", 2], [0.5, 0.6]), "ragged"),
        (_break(["methods", "joint", "acc_matrix"], [[0.9, 0.8]]), "2 columns"),
        (_break(["methods", "joint", "unified_acc"], [0.9, 0.8]), "2 entries"),
        (_break(["methods", "joint", "unified_acc", 0], 95.0), r"\['unified_acc'\]\[0\]"),
        (_break(["methods", "joint", "bwt"], float("nan")), r"\['bwt'\]"),
        (_break(["methods", "joint", "train_steps_per_s"], -1.0), "train_steps_per_s"),
    ],
)
def test_validate_results_errors(obj, message):
    with pytest.raises(ValueError, match=message):
        R.validate_results(obj)


def test_load_results_names_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"tasks": NaN}')
    with pytest.raises(DataError, match=f"{path}.*NaN"):
        R.load_results(path)
    with pytest.raises(DataError, match="missing.json"):
        R.load_results(tmp_path / "missing.json")


def test_png_renders_with_none_cells_and_one_method(tmp_path):
    results = make_results()
    del results["methods"]["joint"]
    path = tmp_path / "m.png"
    io_utils.atomic_savefig(R.plot_acc_matrices(results), path)
    assert path.read_bytes().startswith(PNG_MAGIC)


# --- atomic writes ---------------------------------------------------------------------------


def test_atomic_write_json_nan_keeps_old_file(tmp_path):
    path = tmp_path / "r.json"
    io_utils.atomic_write_json(path, {"a": 1})
    with pytest.raises(ValueError, match="NaN"):
        io_utils.atomic_write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_failed_replace_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "r.txt"
    io_utils.atomic_write_text(path, "old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(io_utils.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        io_utils.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["r.txt"]  # no temporary file left behind


def test_failed_savefig_keeps_old_file(tmp_path):
    path = tmp_path / "fig.png"
    io_utils.atomic_write_bytes(path, b"old")

    class Broken:
        def savefig(self, f, **kwargs):
            f.write(b"partial")
            raise RuntimeError("render failed")

    with pytest.raises(RuntimeError):
        io_utils.atomic_savefig(Broken(), path)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["fig.png"]


def test_atomic_writes_create_dirs_and_keep_mode(tmp_path):
    path = tmp_path / "a" / "b" / "x.bin"
    io_utils.atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert path.stat().st_mode & 0o777 == 0o644
    os.chmod(path, 0o600)
    io_utils.atomic_write_text(path, "hi")
    assert path.read_text() == "hi" and path.stat().st_mode & 0o777 == 0o600


def test_atomic_savefig_needs_extension(tmp_path):
    with pytest.raises(ValueError, match="no extension"):
        io_utils.atomic_savefig(Figure(), tmp_path / "fig")
