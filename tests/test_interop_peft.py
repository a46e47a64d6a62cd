"""PEFT adapter folders: an exported adapter, loaded by ``peft.PeftModel`` onto transformers'
``MistralForCausalLM`` with the same weights, gives our decoder's logits (single and merged);
import gives the tree back; bad folders are named; the CLI exports a run's stage and imports it."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mslora_jax.cli import main as cli_main
from mslora_jax.config import experiment_config
from mslora_jax.errors import CheckpointError
from mslora_jax.interop.hf_llava import convert_hf_llava, hf_module_name
from mslora_jax.interop.peft import (
    ADAPTER_FILE,
    CONFIG_FILE,
    SIDECAR_FILE,
    merged_adapter,
    peft_state_dict,
    read_peft_adapter,
    write_peft_adapter,
)
from mslora_jax.interop.peft_run import run_adapter
from mslora_jax.lora.adapter import LoraAdapter, adapter_paths, stack_params
from mslora_jax.lora.io import load_adapter
from mslora_jax.lora.merge import adapter_delta
from mslora_jax.lora.targets import get_by_path, select_targets, set_by_path
from mslora_jax.models.decoder import positions_from_mask
from mslora_jax.models.llava import LLAVA_LORA_TARGETS, Llava
from mslora_jax.models.lora_dense import LORA_A, LORA_B
from mslora_jax.run.experiment import claim_workdir
from mslora_jax.train.checkpoints import StageCheckpoints
from tests.test_interop_llava_med import CONFIG, DictSource, _tiny_run_config, abstract, hf_weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = np.array([[3, 17, 42, 5, 9, 60, 1], [8, 8, 30, 2, 51, 11, 0]], np.int32)
ATTN = r"^decoder/blocks/attn/(q|v)$"  # a second adapter adapts only these


def random_adapter(base, patterns, rank, alpha, seed, task="t", modality="m") -> LoraAdapter:
    """Random A and B (B nonzero, so the delta shows) for the layers ``patterns`` select."""
    rng = np.random.default_rng(seed)
    tree = {}
    for path in select_targets(base, patterns):
        *lead, fan_in, fan_out = get_by_path(base, path)["kernel"].shape
        a = rng.normal(size=(*lead, rank, fan_in)) / np.sqrt(fan_in)
        b = rng.normal(size=(*lead, fan_out, rank)) * 0.5
        tree = set_by_path(tree, path, {LORA_A: a.astype(np.float32), LORA_B: b.astype(np.float32)})
    return LoraAdapter(tree, rank, alpha, modality, task)


@pytest.fixture(scope="module")
def model():
    """(HF weights, our converted params) of the tiny LLaVA; Mistral takes the decoder's part."""
    weights = hf_weights(CONFIG, seed=0)
    return weights, convert_hf_llava(abstract(), DictSource(weights))


def our_logits(params, adapters) -> np.ndarray:
    """Our decoder on ``IDS`` with the adapters' deltas summed (the MSLoRA forward)."""
    variables = {"params": params}
    weights = None
    if adapters:
        # One stack needs one structure: a layer some adapter lacks gets zeros there (no delta).
        paths = sorted({p for a in adapters for p in adapter_paths(a.params)})
        full = next(a.params for a in adapters if len(adapter_paths(a.params)) == len(paths))
        trees = []
        for a in adapters:
            tree = a.params
            for path in set(paths) - set(adapter_paths(a.params)):
                zeros = {k: np.zeros_like(v) for k, v in get_by_path(full, path).items()}
                tree = set_by_path(tree, path, zeros)
            trees.append(tree)
        variables["lora"] = stack_params(trees)
        weights = jnp.asarray([a.scaling for a in adapters], jnp.float32)

    def forward(m, ids):
        mask = jnp.ones(ids.shape, bool)
        return m.decoder(m.decoder.embed(ids), positions_from_mask(mask), mask, weights)[0]

    return np.asarray(Llava(CONFIG).apply(variables, jnp.asarray(IDS), method=forward))


def peft_logits(weights, folder) -> np.ndarray:
    """transformers' Mistral with the decoder weights, wrapped by PEFT with ``folder``."""
    dec = CONFIG.decoder
    config = transformers.MistralConfig(
        vocab_size=dec.vocab_size,
        hidden_size=dec.width,
        intermediate_size=dec.mlp_dim,
        num_hidden_layers=dec.depth,
        num_attention_heads=dec.num_heads,
        num_key_value_heads=dec.num_kv_heads,
        head_dim=dec.head_dim,
        max_position_embeddings=dec.max_len,
        rope_theta=dec.rope_theta,
        rms_norm_eps=dec.rms_eps,
        sliding_window=None,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    mistral = transformers.MistralForCausalLM(config).eval()
    state = {k: torch.from_numpy(v) for k, v in weights.items() if k.startswith(("model.l", "lm_"))}
    state.update(
        {
            k: torch.from_numpy(weights[k])
            for k in ("model.embed_tokens.weight", "model.norm.weight")
        }
    )
    mistral.load_state_dict(state, strict=True)
    wrapped = peft.PeftModel.from_pretrained(mistral, str(folder)) if folder else mistral
    with torch.no_grad():
        return wrapped(input_ids=torch.from_numpy(IDS).long()).logits.numpy()


def assert_close(got, want):
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def test_exported_adapter_under_peft_gives_our_logits_and_imports_back(model, tmp_path):
    weights, params = model
    adapter = random_adapter(params, LLAVA_LORA_TARGETS, rank=4, alpha=8.0, seed=1, task="p")
    out = write_peft_adapter(
        tmp_path / "p", adapter, hf_module_name, task_type="CAUSAL_LM", info={"method": "x"}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary folder left
    config = json.loads((out / CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    assert len(config["target_modules"]) == 7 * CONFIG.decoder.depth
    assert "model.layers.1.mlp.down_proj" in config["target_modules"]
    sidecar = json.loads((out / SIDECAR_FILE).read_text())
    assert sidecar == {**adapter.metadata(), "method": "x"}
    # PEFT's own reader takes the config as written (no unknown or defaulted-away keys).
    assert peft.LoraConfig.from_pretrained(str(out)).r == 4

    base = peft_logits(weights, None)
    assert_close(base, our_logits(params, []))  # the tiny Mistral is ours without adapters
    want = our_logits(params, [adapter])
    assert np.abs(want - base).max() > 0.1  # the adapter changes the logits noticeably
    assert_close(peft_logits(weights, out), want)

    back = read_peft_adapter(out, params, hf_module_name)
    assert back.metadata() == adapter.metadata()
    assert jax.tree.structure(back.params) == jax.tree.structure(adapter.params)
    jax.tree.map(np.testing.assert_array_equal, back.params, adapter.params)


def test_merged_adapter_is_the_sum_of_the_deltas(model):
    _, params = model
    adapters = [  # ranks differ, and b adapts q and v only
        random_adapter(params, LLAVA_LORA_TARGETS, rank=2, alpha=4.0, seed=2, task="a"),
        random_adapter(params, [ATTN], rank=3, alpha=3.0, seed=3, task="b"),
        random_adapter(params, LLAVA_LORA_TARGETS, rank=1, alpha=0.5, seed=4, task="c"),
    ]
    merged = merged_adapter(adapters, task="c", modality="m")
    assert (merged.rank, merged.alpha) == (6, 6.0)
    assert adapter_paths(merged.params) == adapter_paths(adapters[0].params)
    for path in adapter_paths(merged.params):  # float64 reference, module by module
        want = sum(
            np.asarray(adapter_delta(a, path), np.float64)
            for a in adapters
            if path in adapter_paths(a.params)
        )
        np.testing.assert_allclose(adapter_delta(merged, path), want, rtol=1e-5, atol=1e-6)


def test_merged_adapters_under_peft_give_the_summed_forward(model, tmp_path):
    weights, params = model
    adapters = [
        random_adapter(params, LLAVA_LORA_TARGETS, rank=2, alpha=4.0, seed=2, task="a"),
        random_adapter(params, [ATTN], rank=2, alpha=3.0, seed=3, task="b"),  # q, v only
        random_adapter(params, LLAVA_LORA_TARGETS, rank=2, alpha=1.0, seed=4, task="c"),
    ]
    merged = merged_adapter(adapters, task="c", modality="m")
    out = write_peft_adapter(tmp_path / "merged", merged, hf_module_name, task_type="CAUSAL_LM")
    assert_close(peft_logits(weights, out), our_logits(params, adapters))


def test_unrolled_layout_exports_the_same_tensors(model):
    _, params = model
    adapter = random_adapter(params, [ATTN], rank=2, alpha=2.0, seed=5)
    unrolled = {}
    for part in ("q", "v"):
        node = adapter.params["decoder"]["blocks"]["attn"][part]
        for i in range(CONFIG.decoder.depth):
            layer = {k: v[i] for k, v in node.items()}
            unrolled = set_by_path(unrolled, f"decoder/block_{i}/attn/{part}", layer)
    got = peft_state_dict(dataclasses.replace(adapter, params=unrolled), hf_module_name)
    want = peft_state_dict(adapter, hf_module_name)
    assert sorted(got) == sorted(want)
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in got
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def _edit_tensors(edit):
    def change(folder):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(folder / ADAPTER_FILE)
        edit(tensors)
        save_file(tensors, folder / ADAPTER_FILE)

    return change


def _edit_config(**changes):
    def change(folder):
        config = json.loads((folder / CONFIG_FILE).read_text())
        config.update(changes)
        (folder / CONFIG_FILE).write_text(json.dumps(config))

    return change


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: (f / ADAPTER_FILE).unlink(), r"no adapter_model\.safetensors"),
        (lambda f: (f / CONFIG_FILE).unlink(), r"no adapter_config\.json"),
        (lambda f: (f / SIDECAR_FILE).unlink(), r"no task name and modality"),
        (
            _edit_tensors(
                lambda t: t.update({f"{Q0[:-6]}x_proj.lora_A.weight": t[f"{Q0}.lora_A.weight"]})
            ),
            r"module model\.layers\.0\.self_attn\.x_proj is not a LoRA-capable layer",
        ),
        (
            _edit_tensors(
                lambda t: t.update(
                    {"base_model.model.lm_head.lora_A.weight": np.zeros((2, 32), np.float32)}
                )
            ),
            r"module lm_head is not a LoRA-capable layer",
        ),
        (
            _edit_tensors(
                lambda t: t.update({f"{Q0}.lora_A.weight": np.zeros((2, 31), np.float32)})
            ),
            r"q_proj\.lora_A\.weight has shape \[2, 31\]: expected \[2, 32\] for this model's "
            r"decoder/blocks/attn/q",
        ),
        (
            _edit_config(r=3),
            r"q_proj\.lora_A\.weight has shape \[2, 32\]: rank 2, but adapter_config\.json has r=3",
        ),
        (
            _edit_tensors(lambda t: t.pop(f"{Q0}.lora_B.weight")),
            r"module model\.layers\.0\.self_attn\.q_proj has no lora_B\.weight",
        ),
        (
            _edit_tensors(lambda t: [t.pop(f"{Q0}.lora_{x}.weight") for x in "AB"]),
            r"decoder/blocks/attn/q is one scanned module over 2 layers, but layer\(s\) \[0\]",
        ),
        (
            _edit_tensors(lambda t: t.update({"other": np.zeros(2, np.float32)})),
            "tensor other is not a LoRA factor",
        ),
        (_edit_config(use_dora=True), r"use_dora=True is not supported"),
        (_edit_config(peft_type="IA3"), r"peft_type='IA3' is not supported"),
        (_edit_config(r="4"), r"r='4'; expected a positive integer"),
    ],
    ids=[
        "no-tensors",
        "no-config",
        "no-sidecar",
        "unknown",
        "frozen",
        "shape",
        "rank",
        "half",
        "layer",
        "junk",
        "dora",
        "ia3",
        "r-type",
    ],
)
def test_bad_folders_are_named(model, tmp_path, change, message):
    _, params = model
    adapter = random_adapter(params, [ATTN], rank=2, alpha=2.0, seed=6)
    folder = write_peft_adapter(tmp_path / "a", adapter, hf_module_name)
    change(folder)
    with pytest.raises(CheckpointError, match=message):
        read_peft_adapter(folder, params, hf_module_name)


def test_bf16_factors_and_rslora_scaling_are_read(model, tmp_path):
    """PEFT folders saved from a bf16 model hold bf16 factors; rsLoRA scales by alpha/sqrt(r)."""
    import ml_dtypes

    _, params = model
    adapter = random_adapter(params, [ATTN], rank=4, alpha=2.0, seed=8)
    folder = write_peft_adapter(tmp_path / "a", adapter, hf_module_name)
    _edit_tensors(lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))(
        folder
    )
    _edit_config(use_rslora=True)(folder)
    back = read_peft_adapter(folder, params, hf_module_name)
    assert back.scaling == pytest.approx(2.0 / np.sqrt(4))
    rounded = jax.tree.map(
        lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), adapter.params
    )
    jax.tree.map(np.testing.assert_array_equal, back.params, rounded)


def test_export_refuses_a_folder_in_use(model, tmp_path):
    _, params = model
    adapter = random_adapter(params, [ATTN], rank=2, alpha=2.0, seed=7)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep").write_text("x")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        write_peft_adapter(tmp_path / "a", adapter, hf_module_name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep"]


# ---------------------------------------------------------------- a run's workdir and the CLI


def _fake_run(tmp_path):
    """A workdir as ``mslora-jax run`` leaves it for method mslora: config.json and one stage
    checkpoint per task (adapter, trainer, metrics, meta), with random adapters."""
    cfg = _tiny_run_config(tmp_path)
    cfg["stream"] = [
        {**cfg["stream"][0], "name": n, "modality": m}
        for n, m in (("a", "pathology"), ("b", "radiology"), ("c", "pathology"))
    ]
    cfg["methods"] = ("mslora", "each")
    config = experiment_config(cfg)
    workdir = tmp_path / "work"
    workdir.mkdir()
    claim_workdir(config, workdir)
    base = abstract(config.llava.model_config())
    adapters = [
        random_adapter(base, LLAVA_LORA_TARGETS, 2, 4.0, 10 + i, task=t.name, modality=t.modality)
        for i, t in enumerate(config.stream)
    ]
    for method in ("mslora", "each"):
        checkpoints = StageCheckpoints(workdir / "checkpoints" / method)
        for stage, adapter in enumerate(adapters):
            meta = {"method": method, "slot": stage, **adapter.metadata(), "targets": []}
            checkpoints.save(stage, adapter.params, {"step": np.int32(0)}, {"row": []}, meta)
    return cfg, workdir, adapters, base


def test_cli_exports_a_runs_stage_and_imports_it(tmp_path, capsys):
    cfg, workdir, adapters, base = _fake_run(tmp_path)
    out = tmp_path / "peft_b"

    def cli(*args):
        try:
            cli_main.main(["mslora-jax", *args])
        except SystemExit as e:  # a failure; success returns
            pytest.fail(f"exit {e.code}: {capsys.readouterr().err}")
        captured = capsys.readouterr()
        return captured.out

    cli(
        "export-peft",
        "--workdir",
        str(workdir),
        "--method",
        "mslora",
        "--task",
        "b",
        "--out",
        str(out),
    )
    got = read_peft_adapter(out, base, hf_module_name)
    jax.tree.map(np.testing.assert_array_equal, got.params, adapters[1].params)
    assert json.loads((out / SIDECAR_FILE).read_text())["stage"] == 1

    # --merged: MSLoRA's forward for task b sums a and b; "each" uses b's alone.
    cli(
        "export-peft",
        "--workdir",
        str(workdir),
        "--method",
        "mslora",
        "--task",
        "1",
        "--out",
        str(tmp_path / "m"),
        "--merged",
    )
    merged = read_peft_adapter(tmp_path / "m", base, hf_module_name)
    want = merged_adapter(adapters[:2], task="b", modality="radiology")
    jax.tree.map(np.testing.assert_allclose, merged.params, want.params)
    assert (merged.rank, merged.alpha) == (4, 4.0)
    alone, info = run_adapter(workdir, "each", "b", merged=True)
    assert (alone.rank, alone.alpha, info["merged"]) == (2, 2.0, [{"slot": 1, "task": "b"}])
    node, own = alone.params["decoder"]["blocks"]["mlp"]["up"], adapters[1].params
    np.testing.assert_array_equal(node[LORA_A], own["decoder"]["blocks"]["mlp"]["up"][LORA_A])
    np.testing.assert_allclose(node[LORA_B], 2.0 * own["decoder"]["blocks"]["mlp"]["up"][LORA_B])

    config_file = tmp_path / "tiny.py"
    config_file.write_text(
        "import json\nimport ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict(json.loads({json.dumps(cfg)!r}))\n"
    )
    printed = cli(
        "import-peft",
        "--config",
        str(config_file),
        "--peft-dir",
        str(out),
        "--out",
        str(tmp_path / "ours"),
    )
    assert "ours" in printed
    loaded = load_adapter(tmp_path / "ours")
    assert loaded.metadata() == adapters[1].metadata()
    jax.tree.map(np.testing.assert_array_equal, loaded.params, adapters[1].params)

    # Bad input is one line naming it, exit 2: the folder is taken, the task has no stage.
    for args, message in (
        (("--task", "b", "--out", str(out)), "already exists and is not empty"),
        (("--task", "zz", "--out", str(tmp_path / "x")), "unknown task name 'zz'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli_main.main(
                [
                    "mslora-jax",
                    "export-peft",
                    "--workdir",
                    str(workdir),
                    "--method",
                    "mslora",
                    *args,
                ]
            )
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
