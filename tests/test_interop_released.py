"""import-released: the released trainer's cl_lora.bin files (written here with torch.save in its
layout) become a run folder's finished stages, evaluated and continued by the library."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mslora_jax.cli import main as cli_main  # noqa: E402
from mslora_jax.cli.commands import COMMANDS  # noqa: E402
from mslora_jax.cli.inspect import inspect_adapters  # noqa: E402
from mslora_jax.cli.parse import parse_command_line  # noqa: E402
from mslora_jax.config import experiment_config, synthetic_task  # noqa: E402
from mslora_jax.errors import CheckpointError, ConfigError  # noqa: E402
from mslora_jax.families.llava.setup import prepare_generative  # noqa: E402
from mslora_jax.interop import released_run  # noqa: E402
from mslora_jax.interop.released_run import import_released  # noqa: E402
from mslora_jax.models.lora_dense import LORA_COLLECTION  # noqa: E402
from mslora_jax.report.results import load_results  # noqa: E402
from mslora_jax.run.experiment import run_experiment  # noqa: E402
from mslora_jax.train import stream  # noqa: E402
from mslora_jax.train.checkpoints import load_stage_adapters  # noqa: E402
from tests.helpers import ROOT, load_config_file  # noqa: E402

METHOD = "mslora_cr_ortho"
RANK, ALPHA = 4, 8.0
WIDTH, DEPTH, MLP, KV = 64, 2, 128, 32  # KV: num_kv_heads * head_dim = 2 * 16
# The released names of one decoder layer's adapted Linears (written from the released code:
# LlavaMistralForCausalLM.model.layers.{l}), with (in, out) and our sub-path under
# decoder/blocks: this test's own table, so it checks the library's mapping.
RELEASED_LINEARS = {
    "self_attn.q_proj": (WIDTH, WIDTH, "attn/q"),
    "self_attn.k_proj": (WIDTH, KV, "attn/k"),
    "self_attn.v_proj": (WIDTH, KV, "attn/v"),
    "self_attn.o_proj": (WIDTH, WIDTH, "attn/o"),
    "mlp.gate_proj": (WIDTH, MLP, "mlp/gate"),
    "mlp.up_proj": (WIDTH, MLP, "mlp/up"),
    "mlp.down_proj": (MLP, WIDTH, "mlp/down"),
}


def _config(num_tasks: int = 3, **overrides):
    """configs/demo_generative.py shrunk: a random backbone, three tiny tasks, one method."""
    cfg = load_config_file("demo_generative.py").to_dict()
    cfg["methods"] = (METHOD,)
    tasks = [("p", "pathology", 11), ("r", "radiology", 12), ("d", "dermatology", 13)]
    cfg["stream"] = [
        {**synthetic_task(n, m, seed, num_train=32, num_test=6), "primary_metric": "f1"}
        for n, m, seed in tasks[:num_tasks]
    ]
    cfg["base_tasks"] = []
    cfg["backbone"] = {"source": "random"}
    cfg["lora"].update(rank=RANK, alpha=ALPHA)
    cfg["train"].update(steps_per_task=3, batch_size=8, eval_batch_size=8)
    cfg["llava"].update(max_new_tokens=2)
    cfg["num_devices"] = 1
    cfg["progress"] = False
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        node[leaf] = value
    return experiment_config(cfg)


def released_name(layer: int, linear: str, task: int, factor: str) -> str:
    return f"model.layers.{layer}.{linear}.cl_lora_pool.task_{task}_lora.lora_{factor}"


def write_stage(folder: Path, task: int, *, dtype=torch.float32, seed: int = 0, **changes):
    """One released stage's output_dir: cl_lora.bin with task ``task``'s factors (all layers and
    Linears) and config.json; ``changes``: "tensors" (dict to update), "drop" (names to
    delete), "config" (keys to update), "mslora_cfg" (keys to update)."""
    gen = torch.Generator().manual_seed(1000 * seed + task)
    tensors = {}
    for layer in range(DEPTH):
        for linear, (fan_in, fan_out, _) in RELEASED_LINEARS.items():
            a = torch.randn(RANK, fan_in, generator=gen) * 0.3
            b = torch.randn(fan_out, RANK, generator=gen) * 0.3
            tensors[released_name(layer, linear, task, "A")] = a.to(dtype)
            tensors[released_name(layer, linear, task, "B")] = b.to(dtype)
    if task == 0:  # the first released stage runs with --alpha -1: learned loss weights saved
        tensors["alpha"] = torch.tensor(-4.6)
        tensors["beta"] = torch.tensor(-4.6)
    tensors.update(changes.get("tensors", {}))
    for name in changes.get("drop", ()):
        del tensors[name]
    mslora_cfg = {"max_task": task + 1, "lora_rank": RANK, "lora_alpha": int(ALPHA)}
    mslora_cfg.update(lora_dropout=0.0, **changes.get("mslora_cfg", {}))
    hf_config = {
        "architectures": ["LlavaMistralForCausalLM"],
        "hidden_size": WIDTH,
        "num_hidden_layers": DEPTH,
        "intermediate_size": MLP,
        "hidden_act": "silu",
        "mm_projector_type": "mlp2x_gelu",
        "max_task": task + 1,
        "alpha": -1 if task == 0 else 0.1,
        "beta": -1 if task == 0 else 0.01,
        "mslora_cfg": mslora_cfg,
        **changes.get("config", {}),
    }
    folder.mkdir(parents=True)
    torch.save(tensors, folder / "cl_lora.bin")
    (folder / "config.json").write_text(json.dumps(hf_config))
    return folder / "cl_lora.bin", {k: v.to(torch.float32).numpy() for k, v in tensors.items()}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Two released stages (fp32 and bf16 files) imported into a three-task run folder."""
    root = tmp_path_factory.mktemp("released")
    bin1, t1 = write_stage(root / "pathvqa", 0)
    bin2, t2 = write_stage(root / "pathvqa_slake", 1, dtype=torch.bfloat16)
    out, built = root / "run", []

    def recording(*args):  # keeps the experiment the import evaluated with, for the tests
        built.append(prepare_generative(*args))
        return built[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(released_run, "prepare_generative", recording)
        stages = import_released(_config(), [bin2, bin1], out)  # any order
    return out, stages, {**t1, **t2}, built[0][0]


def test_imported_adapters_equal_the_saved_tensors(imported):
    out, stages, tensors, _ = imported
    assert [s.task for s in stages] == ["p", "r"]
    loaded = load_stage_adapters(out, METHOD)
    assert [meta["task"] for meta, _ in loaded] == ["p", "r"]
    for task, (meta, params) in enumerate(loaded):
        assert (meta["rank"], meta["alpha"], meta["slot"]) == (RANK, ALPHA, task)
        assert meta["released"]["mslora_cfg"]["max_task"] == task + 1
        for linear, (_, _, sub) in RELEASED_LINEARS.items():
            node = params["decoder"]["blocks"]
            for key in sub.split("/"):
                node = node[key]
            for layer in range(DEPTH):
                # lora_a [r, in] = lora_A, lora_b [out, r] = lora_B: no transpose; bf16 exact.
                for ours, factor in (("lora_a", "A"), ("lora_b", "B")):
                    expected = tensors[released_name(layer, linear, task, factor)]
                    np.testing.assert_array_equal(node[ours][layer], expected)


def _merged_reference(base: dict, tensors: dict, tasks: list[int]) -> dict:
    """The backbone with W' = W + (alpha / r) sum_i (B_i A_i)^T in every adapted kernel (our
    kernels are [in, out]), in float64 from the saved tensors: the released Linear's forward,
    base + sum_i scaling * B_i A_i x, with every task of ``tasks`` in its mask."""
    merged = jax.tree.map(np.asarray, base)
    blocks = merged["decoder"]["blocks"]
    for linear, (_, _, sub) in RELEASED_LINEARS.items():
        node = blocks
        for key in sub.split("/"):
            node = node[key]
        kernel = np.array(node["kernel"], np.float64)
        for layer in range(DEPTH):
            for task in tasks:
                a = tensors[released_name(layer, linear, task, "A")].astype(np.float64)
                b = tensors[released_name(layer, linear, task, "B")].astype(np.float64)
                kernel[layer] += (ALPHA / RANK) * (b @ a).T
        node["kernel"] = kernel.astype(np.float32)
    return merged


def test_imported_stage_forward_is_base_plus_the_sum_of_task_deltas(imported):
    out, _, tensors, exp = imported
    config = exp.config
    spec = exp.method(METHOD)
    slots = {meta["slot"]: exp.rules.place(p) for meta, p in load_stage_adapters(out, METHOD)}
    active = spec.eval_slots(1)  # stage 2's evaluation: tasks 1 and 2 (task_mask[:2])
    assert active == [0, 1]
    reference = _merged_reference(exp.base_params, tensors, [0, 1])
    # What evaluation runs: the adapters merged into the kernels.
    ours = exp.inference_params(slots, active)["decoder"]["blocks"]
    for _, (_, _, sub) in RELEASED_LINEARS.items():
        a, b = ours, reference["decoder"]["blocks"]
        for key in sub.split("/"):
            a, b = a[key], b[key]
        np.testing.assert_allclose(np.asarray(a["kernel"]), b["kernel"], rtol=1e-5, atol=1e-6)
    # The whole model: stacked adapters in the forward vs the reference's merged kernels.
    rng = np.random.default_rng(0)
    size = config.llava.vision.image_size
    images = jnp.asarray(rng.uniform(-1, 1, (2, size, size, 3)), jnp.float32)
    ids = rng.integers(10, 500, (2, 9))
    ids[:, 2] = config.llava.image_token_id
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.ones((2, 9), bool)
    apply = jax.jit(exp.model.apply)
    variables = {"params": exp.base_params, LORA_COLLECTION: exp.stack(slots)}
    logits = apply(variables, images, ids, mask, exp.weights(active))
    expected = apply({"params": reference}, images, ids, mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-4, atol=1e-4)
    # ... and the deltas matter: without them the output differs.
    plain = apply({"params": exp.base_params}, images, ids, mask)
    assert np.abs(np.asarray(plain) - np.asarray(expected)).max() > 1e-2


def test_run_continues_after_the_imported_stages(imported, monkeypatch):
    out, stages, _, _ = imported
    trained = []
    original = stream.train_stage

    def recording(exp, method, stage, *args, **kwargs):
        trained.append(stage)
        return original(exp, method, stage, *args, **kwargs)

    monkeypatch.setattr(stream, "train_stage", recording)
    results = run_experiment(_config(), out)
    assert trained == [2]  # stages 1 and 2 restored, stage 3 trained
    matrix = results["methods"][METHOD]["acc_matrix"]
    assert matrix[:2] == [s.row for s in stages]
    assert all(x is not None for x in matrix[2])
    assert load_results(out / "results.json")["methods"][METHOD]["acc_matrix"] == matrix
    table = inspect_adapters(out, METHOD)
    assert all(f"| {task} |" in table for task in ("p", "r", "d"))


# --- bad input: refused before anything is written ------------------------------------------


def _refused(tmp_path, bins, match, error=CheckpointError, config=None):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        import_released(config or _config(), bins, out)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


class _Payload:
    """Unpickling this would create ``marker``: the kind of file weights_only must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_holding_code_is_refused_and_never_run(tmp_path, writer):
    bin_path, _ = write_stage(tmp_path / "stage", 0)
    marker = tmp_path / "code_ran"
    payload = {released_name(0, "self_attn.q_proj", 0, "A"): _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, bin_path)
    else:
        bin_path.write_bytes(pickle.dumps(payload, protocol=2))
    _refused(tmp_path, [bin_path], r"torch.load\(weights_only=True\).*Unsupported global")
    assert not marker.exists()
    # The payload is live: an unrestricted load (what the importer never does) runs it.
    if writer == "torch.save":
        torch.load(bin_path, weights_only=False)
    else:
        pickle.loads(bin_path.read_bytes())
    assert marker.exists()


def test_wrong_rank_is_refused_by_name(tmp_path):
    bin_path, _ = write_stage(tmp_path / "s", 0, mslora_cfg={"lora_rank": 8})
    _refused(tmp_path, [bin_path], r"mslora_cfg.lora_rank=8 but lora.rank=4")
    bin_path, _ = write_stage(tmp_path / "t", 0, mslora_cfg={"lora_alpha": 16})
    _refused(tmp_path, [bin_path], r"mslora_cfg.lora_alpha=16 but lora.alpha=8.0")


def test_a_factor_of_the_wrong_shape_is_refused(tmp_path):
    name = released_name(1, "mlp.down_proj", 0, "A")
    bin_path, _ = write_stage(tmp_path / "s", 0, tensors={name: torch.zeros(RANK, MLP + 1)})
    _refused(tmp_path, [bin_path], r"model.layers.1.mlp.down_proj.lora_A has shape \[4, 129\]")


def test_unknown_modules_and_tensors_are_refused(tmp_path):
    extra = released_name(0, "mlp.extra_proj", 0, "A")
    bin_path, _ = write_stage(tmp_path / "a", 0, tensors={extra: torch.zeros(RANK, WIDTH)})
    _refused(tmp_path, [bin_path], r"does not adapt: model.layers.0.mlp.extra_proj")
    # A layer the config does not have (the released model is deeper).
    deep = released_name(DEPTH, "self_attn.q_proj", 0, "A")
    bin_path, _ = write_stage(tmp_path / "b", 0, tensors={deep: torch.zeros(RANK, WIDTH)})
    _refused(tmp_path, [bin_path], rf"does not adapt: model.layers.{DEPTH}.self_attn.q_proj")
    bin_path, _ = write_stage(tmp_path / "c", 0, tensors={"lm_head.weight": torch.zeros(3, 3)})
    _refused(tmp_path, [bin_path], r"not released LoRA factors .*lm_head.weight")
    # The config adapts more than the released run (q and v only there).
    drop = [
        released_name(layer, linear, 0, f)
        for layer in range(DEPTH)
        for linear in RELEASED_LINEARS
        if linear not in ("self_attn.q_proj", "self_attn.v_proj")
        for f in "AB"
    ]
    bin_path, _ = write_stage(tmp_path / "d", 0, drop=drop)
    _refused(tmp_path, [bin_path], r"no factors for model.layers.0.mlp.down_proj.*\(10 in all\)")


def test_missing_config_or_mslora_cfg_is_refused(tmp_path):
    bin_path, _ = write_stage(tmp_path / "a", 0)
    (bin_path.parent / "config.json").unlink()
    _refused(tmp_path, [bin_path], r"config.json: missing")
    bin_path, _ = write_stage(tmp_path / "b", 0)
    (bin_path.parent / "config.json").write_text(json.dumps({"hidden_size": WIDTH}))
    _refused(tmp_path, [bin_path], r"no mslora_cfg")


def test_contradicting_model_and_loss_settings_are_refused(tmp_path):
    bin_path, _ = write_stage(tmp_path / "a", 0, config={"num_hidden_layers": 32})
    _refused(tmp_path, [bin_path], r"num_hidden_layers=32 but llava.decoder.depth=2")
    bin_path, _ = write_stage(tmp_path / "b", 0, config={"rope_theta": 123.0})
    _refused(tmp_path, [bin_path], r"rope_theta=123.0")
    first, _ = write_stage(tmp_path / "c1", 0)
    second, _ = write_stage(tmp_path / "c2", 1, config={"alpha": 0.5})
    _refused(tmp_path, [first, second], r"alpha=0.5 but regularizer.alpha_cr=0.1")


def test_more_tasks_than_the_config_or_a_missing_task_is_refused(tmp_path):
    first, _ = write_stage(tmp_path / "a", 0)
    second, _ = write_stage(tmp_path / "b", 1)
    one_task = _config(num_tasks=1)
    _refused(tmp_path, [first, second], r"hold 2 tasks but .* stream has 1", ConfigError, one_task)
    _refused(tmp_path, [second], r"no file holds task_0_lora")
    _refused(tmp_path, [first, first], r"task_0_lora is in both")
    beyond, _ = write_stage(tmp_path / "c", 1, mslora_cfg={"max_task": 1})
    _refused(tmp_path, [beyond], r"holds task_1_lora but .*max_task=1")


def test_a_non_empty_out_or_a_method_the_released_code_cannot_run_is_refused(tmp_path):
    bin_path, _ = write_stage(tmp_path / "a", 0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        import_released(_config(), [bin_path], out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="not what the released trainer runs"):
        import_released(_config(), [bin_path], tmp_path / "o2", method="mslora_cr")
    with pytest.raises(ConfigError, match="not among the config's methods"):
        import_released(_config(), [bin_path], tmp_path / "o3", method="mslora")


def test_a_failure_while_writing_leaves_no_folder(tmp_path, monkeypatch):
    bin_path, _ = write_stage(tmp_path / "a", 0)

    def failing(config, workdir, mesh, inputs):
        (workdir / "half_written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(released_run, "prepare_generative", failing)
    _refused(tmp_path, [bin_path], "disk full", RuntimeError)


def test_the_command_line_takes_repeated_bins_and_reports_bad_input_in_one_line(tmp_path, capsys):
    demo = str(ROOT / "configs" / "demo_generative.py")
    words = ["import-released", "--config", demo, "--method", METHOD, "--bin"]
    args = parse_command_line([*words, "a/x.bin", "--bin=b/x.bin", "--out", "w"], COMMANDS).args
    assert (args.bin, args.out, args.method) == (["a/x.bin", "b/x.bin"], "w", METHOD)
    bin_path, _ = write_stage(tmp_path / "a", 0)
    (bin_path.parent / "config.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["mslora-jax", *words, str(bin_path), "--out", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: ") and "config.json: missing" in err
    assert not (tmp_path / "w").exists()


def test_without_torch_the_error_names_the_extra(tmp_path, monkeypatch):
    bin_path, _ = write_stage(tmp_path / "a", 0)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    _refused(tmp_path, [bin_path], r"pip install 'mslora_jax\[released\]'", ConfigError)
