"""index, query, evaluate-retrieval and export-faiss on a tiny finished captioned run, and the
image-folder source with its captions file."""

import json

import faiss
import numpy as np
import pytest
from PIL import Image

from mslora_jax.cli import main as cli_main
from mslora_jax.config import experiment_config
from mslora_jax.data.registry import load_task
from mslora_jax.data.sources import read_items
from mslora_jax.errors import DataError
from mslora_jax.retrieval.index import load_index
from mslora_jax.run.experiment import run_experiment
from mslora_jax.train.checkpoints import read_workdir_config
from tests.helpers import smoke_dict


def _cli(capsys, *args):
    """``mslora-jax ARGS`` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["mslora-jax", *args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _ok(capsys, *args):
    try:
        cli_main.main(["mslora-jax", *args])
    except SystemExit as e:  # a failure: show its message
        raise AssertionError(capsys.readouterr().err) from e
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("captioned_run")
    cfg = smoke_dict(
        methods=("seq", "mslora"),
        num_devices=1,
        **{"train.steps_per_task": 6, "pretrain.steps": 10, "model.max_text_len": 12},
    )
    for task in cfg["stream"]:
        task["captions"] = True
    run_experiment(experiment_config(cfg), workdir)
    return workdir


@pytest.fixture(scope="module")
def image_index(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("indexes") / "path_a_test"
    cli_main_args = ["index", "--workdir", str(run_dir), "--method", "mslora", "--data",
                     "path_a", "--split", "test", "--out", str(out)]  # fmt: skip
    cli_main.main(["mslora-jax", *cli_main_args])
    return out


def test_an_index_records_its_rows_and_encoder(image_index, run_dir):
    index = load_index(image_index)
    assert len(index) == 128 and index.rows == "image" and index.task_names == ("path_a",)
    version = index.encoder_versions[0]
    assert (version.method, version.stage, version.slots) == ("mslora", 2, (0, 1, 2))
    assert index.encoder_workdir == str(run_dir) and index.ids[5] == "test/5"


def test_query_prints_the_top_k_as_json(capsys, image_index, tmp_path):
    out = _ok(capsys, "query", "--index", str(image_index), "--text", "pathology tissue", "--k",
              "4", "--json")  # fmt: skip
    results = json.loads(out)["results"]
    assert len(results) == 4 and set(results[0]) == {"id", "task", "score"}
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    # An image of the index finds itself first (cosine 1).
    index = load_index(image_index)
    picture = tmp_path / "q.png"
    config = read_workdir_config(index.encoder_workdir)
    task = load_task(config.stream[0], image_size=config.model.image_size, seed=config.seed)
    Image.fromarray(task.test_images[7]).save(picture)
    out = _ok(capsys, "query", "--index", str(image_index), "--image", str(picture), "--k", "1")
    assert out.split()[-1] == "test/7" and float(out.split()[1]) == pytest.approx(1.0, abs=1e-4)


def test_evaluate_retrieval_prints_every_metric_in_range(capsys, image_index):
    label = json.loads(_ok(capsys, "evaluate-retrieval", "--index", str(image_index),
                           "--queries", "path_a", "--split", "train", "--json"))  # fmt: skip
    keys = ("recall@1", "recall@5", "recall@10", "mrr", "map", "map@r", "precision@10")
    assert all(0.0 <= label[k] <= 1.0 for k in keys) and label["queries"] == 256
    # Captions against their own images (instance level).
    text = json.loads(_ok(capsys, "evaluate-retrieval", "--index", str(image_index),
                          "--queries", "path_a", "--rows", "text", "--json"))  # fmt: skip
    assert text["queries"] == 128 and all(0.0 <= text[k] <= 1.0 for k in keys)


def test_export_faiss_is_read_back_with_the_same_top_k(capsys, image_index, tmp_path):
    _ok(capsys, "export-faiss", "--index", str(image_index), "--out", str(tmp_path / "f"))
    flat = faiss.read_index(str(tmp_path / "f" / "index.faiss"))
    index = load_index(image_index)
    assert flat.ntotal == len(index) and isinstance(flat, faiss.IndexFlatIP)
    queries = index.embeddings[:10].astype(np.float32)
    scores, rows = flat.search(queries, 5)
    expected = np.argsort(-(queries @ index.embeddings.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(rows, expected)
    lines = (tmp_path / "f" / "rows.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == list(index.ids)


def test_a_folder_with_captions_is_indexed_and_queried(capsys, run_dir, tmp_path):
    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for cls in ("cells", "scans"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (16, 16, 3), np.uint8)
            Image.fromarray(pixels).save(folder / cls / f"{i}.png")
    records = [{"image": f"{c}/{i}.png", "caption": f"{c} number {i}"}
               for c in ("cells", "scans") for i in range(3)]  # fmt: skip
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    items = read_items(folder, 8)
    assert items.ids[0] == "cells/0.png" and list(items.labels) == [0, 0, 0, 1, 1, 1]
    assert items.captions[4] == "scans number 1" and items.images.shape == (6, 8, 8, 3)
    out = tmp_path / "folder_index"
    _ok(capsys, "index", "--workdir", str(run_dir), "--method", "seq", "--data", str(folder),
        "--rows", "text", "--out", str(out))  # fmt: skip
    assert load_index(out).rows == "text" and load_index(out).ids == items.ids
    results = json.loads(_ok(capsys, "query", "--index", str(out), "--text", "scans number 1",
                             "--k", "2", "--json"))["results"]  # fmt: skip
    assert results[0]["id"] == "scans/1.png" and results[0]["score"] == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"image": "a.png", "caption": "x"}\nnot json\n', r"captions.jsonl:2: not a JSON object"),
        ('{"image": "b.png", "caption": "x"}\n', r"image 'b.png' is not in"),
        ('{"image": "a.png", "caption": " "}\n', r"captions.jsonl:1: expected a non-empty"),
        ('{"image": "a.png", "caption": "x"}\n' * 2, r"captions.jsonl:2: a second caption"),
    ],
)
def test_bad_captions_files_are_one_line_errors(tmp_path, content, message):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        read_items(tmp_path, 8)


def test_a_csv_captions_file_needs_its_header(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("file,text\na.png,x\n")
    with pytest.raises(DataError, match="expected a header with columns image,caption"):
        read_items(tmp_path, 8)
    (tmp_path / "captions.csv").write_text("image,caption\na.png,a red cell\n")
    assert read_items(tmp_path, 8).captions == ("a red cell",)


def test_bad_retrieval_command_lines_are_one_line_errors(capsys, run_dir, image_index, tmp_path):
    cases = [
        (("index", "--workdir", str(run_dir), "--method", "mslora", "--data", "path_a",
          "--out", str(image_index)), "already exists and is not empty"),
        (("index", "--workdir", str(run_dir), "--method", "mslora", "--stage", "7", "--data",
          "path_a", "--out", str(tmp_path / "x")), "has 3 finished stages; stage 7"),
        (("index", "--workdir", str(tmp_path), "--method", "mslora", "--data", "path_a",
          "--out", str(tmp_path / "y")), "is not a run folder"),
        (("index", "--workdir", str(run_dir), "--method", "mslora", "--data",
          str(tmp_path / "nothing.npz"), "--out", str(tmp_path / "z")), "file not found"),
        (("query", "--index", str(image_index), "--text", "a", "--image", "b.png"),
         "exactly one query"),
        (("query", "--index", str(tmp_path), "--text", "a"), "no index at"),
    ]  # fmt: skip
    for args, message in cases:
        code, _, err = _cli(capsys, *args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
