"""Multi-seed sweeps: t quantiles, intervals and paired differences on hand-computed numbers,
the summary files, --seeds validation, and the command with a stand-in for run_experiment (a
real two-seed smoke sweep takes ~50 s on the 2-core CPU, too slow for a test)."""

import csv
import io
import json
import math

import numpy as np
import pytest
import scipy.stats  # a dependency of jax, so always installed

from mslora_jax.cli import main as cli_main
from mslora_jax.cli.commands import COMMANDS
from mslora_jax.cli.parse import parse_command_line
from mslora_jax.errors import CommandLineError, DataError
from mslora_jax.report.sweep import (
    aggregate,
    aggregate_final_acc,
    interval,
    paired_differences,
    summarize,
    t_quantile_975,
)
from mslora_jax.report.sweep_files import (
    SUMMARY_FILES,
    format_summary_csv,
    format_summary_markdown,
    write_summary,
)
from mslora_jax.run import experiment
from mslora_jax.run.sweep import parse_seeds, run_sweep
from tests.helpers import ROOT

SMOKE = str(ROOT / "configs" / "smoke.py")
TASKS = [{"name": "path_a", "modality": "pathology"}, {"name": "rad_a", "modality": "radiology"}]


def _entry(avg, unified, steps=100.0, bwt=0.0, fwt=0.05, **extra):
    """A method entry with chosen numbers (aggregation reads them as given)."""
    return {
        "acc_matrix": [[0.9, None], [avg + 0.1, avg - 0.1]],
        "avg_acc": avg,
        "bwt": bwt,
        "unified_acc": [unified, unified],
        "unified_avg_acc": unified,
        "train_steps_per_s": steps,
        "forgetting": -bwt,
        "fwt": fwt,
        **extra,
    }


# Three seeds: mslora avg_acc 0.80/0.82/0.84; mslora_cr 0.83/0.84/0.88 (differences
# 0.03/0.02/0.04); unified 0.50/0.52/0.54 against 0.51/0.51/0.57 (differences 0.01/-0.01/0.03).
RUNS = [
    {
        "tasks": TASKS,
        "methods": {
            "mslora": _entry(m_avg, m_uni, steps=100.0 + i),
            "mslora_cr": _entry(c_avg, c_uni, steps=90.0, routed_avg_acc=0.7 + 0.01 * i),
            "joint": _entry(0.9, 0.9, fwt=None),
        },
    }
    for i, (m_avg, m_uni, c_avg, c_uni) in enumerate(
        [(0.80, 0.50, 0.83, 0.51), (0.82, 0.52, 0.84, 0.51), (0.84, 0.54, 0.88, 0.57)]
    )
]


@pytest.mark.parametrize(
    "df, want",
    [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (10, 2.2281), (30, 2.0423)],
)
def test_t_quantile_textbook_values(df, want):
    assert t_quantile_975(df) == pytest.approx(want, abs=1e-4)


def test_t_quantile_matches_scipy_table_and_expansion():
    for df in [*range(1, 201), 500, 10_000]:
        assert t_quantile_975(df) == pytest.approx(scipy.stats.t.ppf(0.975, df), abs=1e-6), df
    assert t_quantile_975(10**9) == pytest.approx(1.959964, abs=1e-6)  # the normal limit
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="degrees of freedom"):
            t_quantile_975(bad)


def test_interval_hand_computed():
    iv = interval([0.80, 0.82, 0.84])
    assert iv.mean == pytest.approx(0.82) and iv.std == pytest.approx(0.02) and iv.n == 3
    half = 4.302653 * 0.02 / math.sqrt(3)  # = 0.049683
    assert iv.half_width == pytest.approx(half, rel=1e-6)
    assert (iv.low, iv.high) == pytest.approx((0.82 - half, 0.82 + half))
    assert iv.excludes_zero
    # The float64 textbook formula, directly.
    x = np.array([0.1, 0.4, 0.35, 0.2, 0.9], dtype=np.float64)
    std = math.sqrt(sum((v - x.mean()) ** 2 for v in x) / (len(x) - 1))
    iv = interval(x.tolist())
    assert iv.std == pytest.approx(std) and iv.half_width == pytest.approx(2.776445 * std / 5**0.5)
    one = interval([0.5])  # no interval from one seed
    assert (one.mean, one.std, one.n, one.half_width, one.low) == (0.5, None, 1, None, None)
    assert not one.excludes_zero
    assert not interval([-0.01, 0.01]).excludes_zero
    with pytest.raises(ValueError, match="non-empty"):
        interval([])


def test_aggregate_every_numeric_scalar_of_every_method():
    stats = aggregate(RUNS)
    assert list(stats) == ["mslora", "mslora_cr", "joint"]
    mslora = stats["mslora"]
    assert set(mslora) == {
        "avg_acc", "bwt", "unified_avg_acc", "train_steps_per_s", "forgetting", "fwt",
    }  # fmt: skip
    assert mslora["avg_acc"].mean == pytest.approx(0.82)
    assert mslora["avg_acc"].std == pytest.approx(0.02)
    assert mslora["avg_acc"].half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3))
    assert mslora["train_steps_per_s"].mean == pytest.approx(101.0)
    assert mslora["bwt"].std == 0.0 and mslora["bwt"].half_width == 0.0
    # A later metric is picked up by being a number; a null one (joint's fwt) is skipped.
    routed = stats["mslora_cr"]["routed_avg_acc"]
    assert (routed.mean, routed.n) == (pytest.approx(0.71), 3)
    assert "fwt" not in stats["joint"] and "routed_avg_acc" not in stats["mslora"]
    # A method missing from a seed counts only the seeds that ran it.
    partial = [RUNS[0], {**RUNS[1], "methods": {"mslora": RUNS[1]["methods"]["mslora"]}}]
    assert aggregate(partial)["joint"]["avg_acc"].n == 1
    # Each task's final accuracy: the last row of the matrix.
    final = aggregate_final_acc(RUNS)["mslora"]
    assert final["path_a"].mean == pytest.approx(0.92)
    assert final["rad_a"].mean == pytest.approx(0.72)


def test_paired_differences_against_mslora():
    diffs = paired_differences(RUNS)
    assert list(diffs) == ["mslora_cr", "joint"]  # every method but the baseline
    avg = diffs["mslora_cr"]["avg_acc"]  # 0.03, 0.02, 0.04
    assert avg.mean == pytest.approx(0.03) and avg.std == pytest.approx(0.01)
    assert avg.half_width == pytest.approx(4.302653 * 0.01 / math.sqrt(3))  # 0.02484
    assert avg.low == pytest.approx(0.03 - 0.0248414, abs=1e-6) and avg.excludes_zero
    # Unpaired, the two methods' intervals overlap; pairing removes the shared seed noise.
    stats = aggregate(RUNS)
    assert stats["mslora_cr"]["avg_acc"].low < stats["mslora"]["avg_acc"].high
    unified = diffs["mslora_cr"]["unified_avg_acc"]  # 0.01, -0.01, 0.03
    assert unified.mean == pytest.approx(0.01) and unified.std == pytest.approx(0.02)
    assert not unified.excludes_zero
    assert "routed_avg_acc" not in diffs["mslora_cr"]  # mslora has none to pair with
    assert "fwt" not in diffs["joint"]
    assert paired_differences(RUNS, baseline="nowhere") == {}


def test_summary_files(tmp_path):
    summary = summarize(RUNS, seeds=[3, 5, 7])
    paths = write_summary(tmp_path, summary)
    assert sorted(paths) == ["summary.csv", "summary.json", "summary.md", "summary.png"]
    loaded = json.loads((tmp_path / "summary.json").read_text())
    assert loaded["seeds"] == [3, 5, 7] and loaded["baseline"] == "mslora"
    avg = loaded["methods"]["mslora"]["avg_acc"]
    assert avg["values"] == [0.80, 0.82, 0.84] and avg["n"] == 3
    assert avg["ci95_high"] == pytest.approx(0.82 + 0.0496828, abs=1e-6)
    assert loaded["vs_baseline"]["mslora_cr"]["avg_acc"]["excludes_zero"] is True
    assert "fwt" not in loaded["methods"]["joint"]  # null in every seed

    md = (tmp_path / "summary.md").read_text()
    assert "over n = 3 seeds (3, 5, 7)" in md and "## Accuracy (%), n = 3 seeds" in md
    accuracy = md.split("## Transfer", 1)[0].splitlines()
    rows = {line.split(" | ")[0][2:]: line for line in accuracy if line.startswith("| ")}
    assert "| mslora | 82.0 ± 5.0 | 52.0 ± 5.0 |" in md  # avg acc, unified avg acc
    assert "| 92.0 ± 5.0 | 72.0 ± 5.0 |" in rows["mslora"]  # the task columns
    assert "| BWT | forgetting | FWT |" in md and "| steps/s |" in md
    assert "| routed avg acc |" in md and "71.0 ± 2.5" in rows["mslora_cr"]
    paired = md.split("## Paired difference against mslora", 1)[1]
    assert "| mslora_cr | 3.0 ± 2.5* | 1.0 ± 5.0 |" in paired
    assert "| joint |" in paired and "FWT" in paired

    table = list(csv.DictReader(io.StringIO((tmp_path / "summary.csv").read_text())))
    assert list(table[0]) == ["method", "metric", "mean", "std", "n", "ci95_low", "ci95_high"]
    row = next(r for r in table if (r["method"], r["metric"]) == ("mslora", "avg_acc"))
    assert float(row["mean"]) == pytest.approx(0.82) and row["n"] == "3"
    assert float(row["ci95_low"]) == pytest.approx(0.82 - 0.0496828, abs=1e-6)
    assert any(r["metric"] == "final_acc[rad_a]" for r in table)
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_of_one_seed_and_without_mslora():
    one = summarize(RUNS[:1])  # no interval: means only, and a CSV with empty cells
    assert "| mslora | 80.0 | 50.0 |" in format_summary_markdown(one)
    assert "mslora,avg_acc,0.8,,1,," in format_summary_csv(one)
    no_baseline = [{**r, "methods": {"seq": r["methods"]["joint"]}} for r in RUNS]
    summary = summarize(no_baseline)
    assert summary["baseline"] is None and summary["vs_baseline"] == {}
    assert "No paired comparison: no seed ran mslora." in format_summary_markdown(summary)


def test_a_method_missing_from_a_seed_shows_its_count():
    runs = [{**RUNS[0], "methods": {"mslora": RUNS[0]["methods"]["mslora"]}}, *RUNS[1:]]
    md = format_summary_markdown(summarize(runs))
    assert "| joint | 90.0 ± 0.0 (n=2) |" in md and "| mslora | 82.0 ± 5.0 |" in md


def test_seeds_must_share_their_tasks():
    other = {**RUNS[1], "tasks": [TASKS[1], TASKS[0]]}
    with pytest.raises(DataError, match="seed 1: its tasks"):
        summarize([RUNS[0], other], seeds=[0, 1])


def test_parse_seeds():
    assert parse_seeds("0,1,2") == (0, 1, 2)
    assert parse_seeds(" 7, 3 ") == (7, 3)
    for bad, want in [
        ("", "expected comma-separated seeds"),
        ("0", "at least two distinct seeds"),
        ("0,0", "seed 0 is given more than once"),
        ("0,-1", "'-1' is not a non-negative integer"),
        ("0,1.5", "'1.5' is not a non-negative integer"),
        ("a,b", "'a' is not a non-negative integer"),
        ("0,,1", "'' is not a non-negative integer"),
    ]:
        with pytest.raises(CommandLineError, match=want):
            parse_seeds(bad)


def _stand_in(calls):
    """A run_experiment that records its calls and returns RUNS[seed % 3]."""

    def run(config, workdir):
        calls.append((config, workdir))
        return RUNS[config.seed % 3]

    return run


def test_run_sweep_runs_each_seed_into_its_folder(tmp_path):
    from mslora_jax.config import experiment_config
    from mslora_jax.run.sweep import seed_workdir

    invocation = parse_command_line(["run", "--config", SMOKE, "--workdir", "x"], COMMANDS)
    config = experiment_config(invocation.args.config)
    calls = []
    summary = run_sweep(config, [4, 0, 2], tmp_path, run=_stand_in(calls))
    assert [(c.seed, w) for c, w in calls] == [(s, tmp_path / f"seed_{s}") for s in (4, 0, 2)]
    assert seed_workdir(tmp_path, 4) == tmp_path / "seed_4"
    assert all(c.lora == config.lora and c.stream == config.stream for c, _ in calls)
    assert summary["seeds"] == [4, 0, 2]
    # seeds 4, 0, 2 -> RUNS[1], RUNS[0], RUNS[2]
    assert summary["methods"]["mslora"]["avg_acc"]["values"] == [0.82, 0.80, 0.84]
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "summary.png").is_file()


def test_sweep_command(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(experiment, "run_experiment", _stand_in(calls))
    workdir = str(tmp_path / "w")
    cli_main.main(
        ["mslora-jax", "sweep", "--config", SMOKE, "--seeds", "0,1,2", "--workdir", workdir]
        + ["--config.lora.rank=3", "--config.seed=9"]
    )
    out = capsys.readouterr().out
    assert [c.seed for c, _ in calls] == [0, 1, 2]  # --seeds wins over config.seed
    assert all(c.lora.rank == 3 for c, _ in calls)  # overrides as run takes them
    assert "## Paired difference against mslora" in out and f"wrote {workdir}/summary.json" in out
    assert {p.name for p in (tmp_path / "w").iterdir()} == set(SUMMARY_FILES)


@pytest.mark.parametrize(
    "seeds, want",
    [
        ("0,x", "--seeds '0,x': 'x' is not a non-negative integer"),
        ("3", "--seeds '3': a sweep needs at least two distinct seeds"),
    ],
)
def test_sweep_command_bad_seeds_is_one_line(tmp_path, capsys, seeds, want):
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(
            ["mslora-jax", "sweep", "--config", SMOKE, "--seeds", seeds, "--workdir", "unused"]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert want in err
    with pytest.raises(SystemExit) as exit_info:  # --seeds is required
        cli_main.main(["mslora-jax", "sweep", "--config", SMOKE, "--workdir", "unused"])
    code = exit_info.value.code
    assert code == 2 and "sweep needs --seeds" in capsys.readouterr().err


def test_the_summary_has_the_routers_accuracy_over_seeds():
    from mslora_jax.report.results import method_summary
    from mslora_jax.report.sweep import summarize
    from mslora_jax.report.sweep_files import format_summary_markdown

    tasks = [{"name": "a", "modality": "m"}, {"name": "b", "modality": "m"}]
    runs = []
    for acc in ([0.8, 0.6], [0.9, 0.5], [1.0, 0.4]):
        entry = method_summary([[0.5, None], [0.5, 0.7]], [0.4, 0.6], 1.0)
        runs.append({"tasks": tasks, "methods": {"mslora": entry}, "backbone": {"router_acc": acc}})
    summary = summarize(runs, [0, 1, 2])
    assert summary["router"]["acc"]["a"]["mean"] == pytest.approx(0.9)
    assert summary["router"]["avg_acc"]["mean"] == pytest.approx(0.7)
    assert summary["router"]["avg_acc"]["ci95_half_width"] == pytest.approx(0.0, abs=1e-12)
    assert "routed to their own task, %): mean 70.0 ± 0.0" in (format_summary_markdown(summary))
    del runs[0]["backbone"]
    assert "router" not in summarize(runs, [0, 1, 2])
