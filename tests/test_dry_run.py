"""``--dry-run`` sizes the paper's full model abstractly and checks the data layout."""

import pytest

from mslora_jax.config import experiment_config
from mslora_jax.errors import DataError
from mslora_jax.run.dry_run import dry_run
from mslora_jax.run.experiment import run_experiment
from tests.helpers import load_config_file
from tests.test_run import _cli


def _paper(data_root):
    return experiment_config(load_config_file("paper_8task.py", str(data_root)))


def test_paper_config_dry_run_counts_and_missing_root(tmp_path):
    report = dry_run(_paper(tmp_path / "nowhere"))
    # LLaVA-Med v1.5's own count: Mistral-7B 7,241,732,096 + CLIP ViT-L/14-336 vision tower
    # 303,507,456 + mlp2x_gelu projector 20,979,712.
    assert "frozen backbone parameters: 7,566,219,264" in report
    # Mistral-7B, rank 64 on q, k, v, o, gate, up, down of 32 layers.
    assert "LoRA parameters per task: 167,772,160" in report
    assert "224 adapted layers" in report
    # Each task with its released learning rate, epochs and batch size.
    assert "pathvqa (pathology): lr 0.0002, epochs 3, batch 24," in report
    assert "HAM (dermatology): lr 2e-05, epochs 1, batch 16," in report
    assert "does not exist; expected:" in report and "iu-x-ray/test.jsonl" in report


def test_dry_run_reports_present_and_missing_folders(tmp_path):
    (tmp_path / "pathvqa" / "images").mkdir(parents=True)
    (tmp_path / "pathvqa" / "train.json").write_text("[]")
    (tmp_path / "pathvqa" / "test.jsonl").write_text("")
    report = dry_run(_paper(tmp_path))
    assert "pathvqa: ok" in report
    assert "HAM: MISSING" in report and "HAM/train.json" in report
    assert "backbone:" in report and "MISSING" in report


def test_dual_encoder_dry_run_and_paper_run_without_data(tmp_path):
    report = dry_run(experiment_config(load_config_file("demo.py")))
    assert "model: dual_encoder" in report and "synthetic tasks only" in report
    with pytest.raises(DataError, match=r"pathvqa.*train\.json"):
        run_experiment(_paper(tmp_path), tmp_path / "w")


def test_cli_dry_run(tmp_path):
    proc = _cli(
        "run",
        "--config",
        f"configs/paper_8task.py:{tmp_path}",
        "--dry-run",
        "--workdir",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "167,772,160" in proc.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
