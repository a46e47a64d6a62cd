"""Ahead-of-time compilation for a TPU topology (parallel.aot, run.aot) on a CPU-only machine.

The compile tests need ``libtpu`` (the ``tpu-aot`` extra) and skip, saying so, without it; the
parsing of the compiler's out-of-memory message is tested everywhere.
"""

import pytest

from mslora_jax.config import experiment_config
from mslora_jax.models.llava import LLAVA_LORA_TARGETS
from mslora_jax.parallel import aot
from mslora_jax.run.aot import abstract_experiment, lower_generation, lower_train_step

GIB = 2**30


def _require_libtpu():
    if not aot.libtpu_available():
        pytest.skip("libtpu is not installed (pip install -e '.[tpu-aot]'): no TPU AOT compile")


def _tiny_llava_config():
    """A LLaVA of a few thousand parameters; 2 tasks so the last stage has a frozen adapter."""
    task = lambda name, modality: dict(
        name=name, modality=modality, source="vqa", primary_metric="closed_accuracy"
    )
    return experiment_config(
        dict(
            stream=[task("a", "pathology"), task("b", "radiology")],
            model_kind="llava",
            backbone=dict(source="random"),
            llava=dict(
                vision=dict(image_size=8, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32),
                decoder=dict(
                    vocab_size=128,
                    width=32,
                    depth=1,
                    num_heads=4,
                    num_kv_heads=2,
                    mlp_dim=64,
                    max_len=64,
                ),
                image_token_id=4,
                max_len=16,
                max_new_tokens=2,
            ),
            lora=dict(rank=2, alpha=4.0, targets=LLAVA_LORA_TARGETS),
            train=dict(batch_size=8, eval_batch_size=8),
            progress=False,
        )
    )


def test_train_step_compiles_for_v5e_and_sharding_cuts_argument_bytes():
    _require_libtpu()
    devices = aot.tpu_topology_devices("v5e:2x4")
    assert len(devices) == 8 and devices[0].device_kind == "TPU v5 lite"
    hbm = aot.hbm_bytes_per_device(devices)
    assert hbm == 16 * GIB
    config = _tiny_llava_config()
    reports = {}
    for shape in [(8, 1, 1), (2, 4, 1)]:  # replicated parameters vs FSDP over 4 devices
        exp = abstract_experiment(config, aot.device_mesh(devices, shape))
        program = lower_train_step(exp)
        report, compiled = aot.compile_memory(program.lowered, hbm, program.argument_bytes)
        assert compiled is not None and report.error is None
        # The arguments' shards, counted from their shardings: what the compiler allocates, less
        # the TPU's tile padding (large for these tiny arrays, negligible at full size).
        assert 0 < program.argument_bytes <= report.argument_bytes
        assert report.argument_bytes > 0 and report.output_bytes > 0 and report.temp_bytes > 0
        assert report.alias_bytes > 0  # the donated state is reused for the new one
        assert report.fits and report.as_dict()["fits"] == "yes"
        reports[shape] = report
    # Frozen weights, adapters and Adam moments are split 4 ways over fsdp; the batch is split
    # 8 ways on both meshes.
    assert reports[(2, 4, 1)].argument_bytes < 0.6 * reports[(8, 1, 1)].argument_bytes


def test_generation_compiles_for_v5e():
    _require_libtpu()
    devices = aot.tpu_topology_devices("v5e:2x4")
    exp = abstract_experiment(_tiny_llava_config(), aot.device_mesh(devices, (1, 4, 2)))
    program = lower_generation(exp)
    report, _ = aot.compile_memory(program.lowered, aot.hbm_bytes_per_device(devices))
    assert report.argument_bytes > 0 and report.temp_bytes > 0 and report.fits
    assert 0 < program.argument_bytes <= report.argument_bytes


def test_out_of_memory_messages_give_used_and_available_bytes():
    tpu = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
    tpu += "space hbm. Used 42.31G of 15.75G hbm. Exceeded hbm capacity by 26.56G."
    used, available = aot.oom_figures(tpu)
    assert used == int(42.31 * GIB) and available == int(15.75 * GIB)
    # What libtpu 0.0.52 raises (a real message, for a program of 23.85G temporaries).
    e1000 = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
        "memory required for HLO temporaries (42.31G) exceeds available HBM (15.75G). HLO "
        "module: jit_train_step."
    )
    assert aot.oom_figures(e1000) == (used, available)
    assert aot.oom_figures("RESOURCE_EXHAUSTED: something else") == (None, None)


def test_memory_report_peak_and_fit():
    report = aot.MemoryReport(
        compile_s=1.0,
        argument_bytes=10 * GIB,
        output_bytes=4 * GIB,
        alias_bytes=3 * GIB,
        temp_bytes=6 * GIB,
        hbm_bytes=16 * GIB,
    )
    assert report.peak_bytes == 17 * GIB and report.fits is False
    refused = aot.MemoryReport(
        compile_s=1.0,
        argument_bytes=2 * GIB,
        temp_bytes=20 * GIB,
        hbm_bytes=16 * GIB,
        error="RESOURCE_EXHAUSTED",
    )
    assert refused.peak_bytes == 22 * GIB  # outputs unknown: taken as aliased to the state
    assert refused.fits is False and refused.as_dict()["fits"] == "no"


def test_the_sharded_search_fits_or_is_refused_by_the_tpu_compiler():
    """experiments/aot_search_memory.py: a database sharded over a v5e:2x2 slice compiles when
    its shards fit a chip's 16 GiB and is refused, with the compiler's figures, when not."""
    _require_libtpu()
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT

    script = ROOT / "experiments" / "aot_search_memory.py"
    args = ["--items", "1000000", "--items", "100000000", "--topology", "v5e:2x2"]
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=True
    ).stdout
    small, large = (json.loads(line) for line in out.splitlines() if line.startswith("{"))
    assert small["fits"] == "yes" and small["rows_per_chip"] == 250000
    # bf16 rows: 250,000 x 512 x 2 bytes per chip, the program's only large argument.
    assert small["argument_gib"] == pytest.approx(250000 * 512 * 2 / GIB, abs=2e-3)
    assert large["fits"] == "no" and large["database_gib_per_chip"] > 16
