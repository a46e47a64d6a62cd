"""The pictures a run writes: adapter similarity matrices and per-stage loss curves."""

import json
import shutil

import jax
import numpy as np
import pytest
from matplotlib.figure import Figure

from mslora_jax.lora.compare import cr_similarity_matrix, delta_w_cosine_matrix
from mslora_jax.report.pictures import modality_order, plot_adapter_similarity, plot_loss_curves
from mslora_jax.report.training_log import read_step_records
from mslora_jax.run.experiment import run_experiment
from mslora_jax.run.pictures import final_slot_adapters, write_pictures
from tests.helpers import smoke_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _adapter(rng, lead=()):
    """Two adapted layers, one of them scanned (``lead`` extra matrix axes)."""
    return {
        "enc": {"q": {"lora_a": rng.normal(size=(2, 5)), "lora_b": rng.normal(size=(4, 2))}},
        "dec": {
            "lora_a": rng.normal(size=(*lead, 2, 3)),
            "lora_b": rng.normal(size=(*lead, 6, 2)),
        },
    }


def _flat_delta_w(adapter):
    """Reference: every layer's B A formed explicitly, flattened and concatenated."""
    layers = [adapter["enc"]["q"], adapter["dec"]]
    return np.concatenate([np.einsum("...or,...ri->...oi", x["lora_b"], x["lora_a"]).ravel()
                           for x in layers])  # fmt: skip


@pytest.mark.parametrize("distance", ["released", "normalized", "delta_w"])
def test_cr_similarity_matrix_is_one_for_identical_adapters(distance):
    rng = np.random.default_rng(0)
    a, b = _adapter(rng, (3,)), _adapter(rng, (3,))
    copy = jax.tree.map(np.copy, a)
    s = cr_similarity_matrix([a, copy, b], distance, scaling=0.5)
    assert s.shape == (3, 3)
    # delta_w works in float32 from r x r Grams, whose difference cancels: identical adapters
    # may read a distance of ~3e-4 ||s B A||_F (losses.regularizers._delta_w_distances).
    atol = 1e-3 if distance == "delta_w" else 1e-6
    np.testing.assert_allclose(np.diag(s), 1.0, atol=atol)
    np.testing.assert_allclose(s[0, 1], 1.0, atol=atol)  # identical adapters
    np.testing.assert_allclose(s, s.T, atol=atol)
    assert 0.0 <= s[0, 2] < 1.0


def test_cr_similarity_matrix_released_by_hand():
    """released: mean over the four matrices of exp(-||P_a - P_b||_F)."""
    zero = lambda shape: np.zeros(shape)
    a = {"l": {"lora_a": zero((1, 2)), "lora_b": zero((2, 1))},
         "m": {"lora_a": zero((1, 2)), "lora_b": zero((2, 1))}}  # fmt: skip
    b = jax.tree.map(np.copy, a)
    b["l"]["lora_a"] = np.array([[3.0, 4.0]])  # distance 5
    b["m"]["lora_b"] = np.array([[1.0], [0.0]])  # distance 1
    expected = (np.exp(-5.0) + np.exp(-1.0) + 2.0) / 4.0
    np.testing.assert_allclose(cr_similarity_matrix([a, b])[0, 1], expected, rtol=1e-12)


def test_delta_w_cosine_matches_the_flattened_reference():
    rng = np.random.default_rng(1)
    adapters = [_adapter(rng, (2,)) for _ in range(3)]
    flat = [_flat_delta_w(a) for a in adapters]
    expected = np.array([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in flat]
                         for x in flat])  # fmt: skip
    np.testing.assert_allclose(delta_w_cosine_matrix(adapters), expected, atol=1e-12)


def test_delta_w_cosine_orthogonal_rescaled_reparametrised_zero():
    e = np.eye(4)
    one_layer = lambda a, b: {"l": {"lora_a": a, "lora_b": b}}
    base = one_layer(e[:1], e[:, :1])  # B A = e0 e0^T
    orthogonal = one_layer(e[1:2], e[:, 2:3])  # B A = e2 e1^T: orthogonal as flat vectors
    r = np.array([[2.0]])
    rescaled = one_layer(r @ e[:1] * 3.0, -e[:, :1] @ np.linalg.inv(r))  # -3 e0 e0^T
    untrained = one_layer(e[:1], np.zeros((4, 1)))  # B = 0: no direction
    c = delta_w_cosine_matrix([base, orthogonal, rescaled, untrained])
    np.testing.assert_allclose(c[0, 1], 0.0, atol=1e-12)
    np.testing.assert_allclose(c[0, 2], -1.0, atol=1e-12)
    np.testing.assert_allclose(np.diag(c)[:3], 1.0, atol=1e-12)
    assert np.isnan(c[3]).all() and np.isnan(c[:, 3]).all()


def test_modality_order_groups_by_modality_keeping_stream_order():
    mods = ["rad", "path", "rad", "derm", "path"]
    assert modality_order(mods) == [3, 1, 4, 0, 2]  # derm, path, path, rad, rad
    assert modality_order(mods, ("rad", "path")) == [0, 2, 1, 4, 3]  # declared first
    assert modality_order([]) == []


def test_plots_are_figures_and_check_shapes():
    sim = np.array([[1.0, 0.2], [0.2, 1.0]])
    cos = np.array([[1.0, np.nan], [np.nan, np.nan]])
    fig = plot_adapter_similarity(["a", "b"], ["x", "y"], sim, cos, title="t")
    assert isinstance(fig, Figure)
    with pytest.raises(ValueError, match="cosine: expected a 2 x 2 matrix"):
        plot_adapter_similarity(["a", "b"], ["x", "y"], sim, cos[:1], title="t")
    one_point = [{"stage": 0, "task": "a", "step": 0, "loss": 1.0, "task_loss": 1.0, "cr": 0.0}]
    assert isinstance(plot_loss_curves(one_point, title="seq"), Figure)
    with pytest.raises(ValueError, match="no training log rows"):
        plot_loss_curves([], title="seq")


def test_read_step_records_keeps_the_last_of_a_repeated_step_and_skips_bad_lines(tmp_path):
    rows = [
        {"kind": "step", "method": "m", "stage": 1, "task": "b", "step": 0, "loss": 3.0},
        {"kind": "step", "method": "m", "stage": 0, "task": "a", "step": 2, "loss": 2.0},
        {"kind": "stage", "method": "m", "stage": 0, "task": "a", "row": [0.5], "avg": 0.5},
        {"kind": "step", "method": "m", "stage": 0, "task": "a", "step": 2, "loss": 1.0},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "st'  # a killed write
    (tmp_path / "train.jsonl").write_text(text)
    got = read_step_records(tmp_path)
    assert [(r["stage"], r["step"], r["loss"]) for r in got["m"]] == [(0, 2, 1.0), (1, 0, 3.0)]
    assert read_step_records(tmp_path / "missing") == {}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pictures")
    config = smoke_config(**{
        "methods": ("seq", "mslora_cr"), "num_devices": 1, "backbone.source": "random",
        "train.steps_per_task": 4, "train.log_every_steps": 2,
    })  # fmt: skip
    run_experiment(config, workdir)
    return workdir


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC), path


def test_a_run_writes_its_pictures_and_a_workdir_redraws_them(tiny_run):
    plots = tiny_run / "plots"
    names = {"adapter_similarity_mslora_cr.png", "loss_seq.png", "loss_mslora_cr.png"}
    assert {p.name for p in plots.iterdir()} == names  # seq has one shared adapter: no matrix
    for name in names:
        _assert_png(plots / name)
    slots = final_slot_adapters(tiny_run, "mslora_cr")
    assert [s["tasks"] for s in slots] == [["path_a"], ["rad_a"], ["path_b"]]
    assert [s["modality"] for s in slots] == ["pathology", "radiology", "pathology"]
    shutil.rmtree(plots)
    written = write_pictures(tiny_run)  # from the workdir alone, every method found there
    assert set(written) == names
    for path in written.values():
        _assert_png(path)


def test_inspect_plots_redraws_one_method(tiny_run, capsys):
    from mslora_jax.cli import main as cli_main

    path = tiny_run / "plots" / "loss_mslora_cr.png"
    path.unlink()
    cli_main.main(["mslora-jax", "inspect", "--workdir", str(tiny_run), "--method", "mslora_cr",
                   "--plots"])  # fmt: skip
    out = capsys.readouterr().out
    assert "CR similarity" in out and f"wrote {path}" in out
    _assert_png(path)
