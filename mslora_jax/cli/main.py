"""``mslora-jax``: the command line. Thin: parse flags, call library functions.

mslora-jax run --config configs/demo.py --workdir OUT [--config.lora.rank=4 ...]
mslora-jax run ... --coordinator_address HOST:PORT --num_processes N --process_id I
    (once per process; or --distributed=auto on TPU pods / SLURM)
mslora-jax inspect --workdir OUT --method mslora_cr [--task NAME_OR_ID]
mslora-jax convert-llava-med --config configs/paper_8task.py:DATA --hf-dir DIR \
    [--vision-hf-dir DIR] [--out DIR]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mslora_jax.errors import MsloraError
from mslora_jax.train.preemption import RunPreempted

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (created; a rerun resumes).")
_METHOD = flags.DEFINE_string("method", None, "inspect: which method's adapters.")
_TASK = flags.DEFINE_string("task", None, "inspect: a task name or id (default: all).")
_DRY_RUN = flags.DEFINE_bool(
    "dry-run", False, "run: size the model abstractly and check the data layout; train nothing."
)
_HF_DIR = flags.DEFINE_string(
    "hf-dir", None, "convert-llava-med: the Hugging Face LLaVA-Med folder (safetensors)."
)
_VISION_HF_DIR = flags.DEFINE_string(
    "vision-hf-dir",
    None,
    "convert-llava-med: a CLIP folder (openai/clip-vit-large-patch14-336) to take the vision "
    "tower from, for a LLaVA folder without one.",
)
_OUT = flags.DEFINE_string(
    "out", None, "convert-llava-med: the backbone folder to write (default: backbone.path)."
)

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    None,
    ["off", "auto"],
    "run: 'auto' lets jax detect a multi-process cluster (TPU pod, SLURM); default: "
    "$MSLORA_DISTRIBUTED, else off unless the coordinates below are given.",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    None,
    "run: host:port of process 0 in a multi-process run (default $MSLORA_COORDINATOR_ADDRESS).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "run: how many processes (default $MSLORA_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "run: this process's index, 0..N-1 (default $MSLORA_PROCESS_ID)."
)

COMMANDS = ("run", "inspect", "convert-llava-med")


def _start_processes() -> None:
    """``jax.distributed`` for a multi-process run; before anything else touches jax."""
    from mslora_jax.parallel.distributed import initialize_distributed, label_logs_with_process

    initialize_distributed(
        _COORDINATOR_ADDRESS.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        mode=_DISTRIBUTED.value,
    )
    label_logs_with_process()


def _run() -> None:
    from mslora_jax.config import experiment_config
    from mslora_jax.parallel.distributed import is_primary
    from mslora_jax.report.results import format_markdown_table
    from mslora_jax.train.experiment import run_experiment

    if _CONFIG.value is None:
        raise MsloraError("run needs --config (e.g. --config configs/demo.py)")
    config = experiment_config(_CONFIG.value)
    if _DRY_RUN.value:
        from mslora_jax.train.dry_run import dry_run

        print(dry_run(config))
        return
    results = run_experiment(config, _WORKDIR.value)
    if not is_primary():
        return  # process 0 wrote the files and reports them
    print(format_markdown_table(results))
    print(f"\nwrote {_WORKDIR.value}/results.json, results.md, results.csv, acc_matrices.png")


def _inspect() -> None:
    from mslora_jax.cli.inspect import inspect_adapters

    if not _METHOD.value:
        raise MsloraError("inspect needs --method")
    print(inspect_adapters(_WORKDIR.value, _METHOD.value, _TASK.value))


def _convert_llava_med() -> None:
    from mslora_jax.config import experiment_config
    from mslora_jax.train.hf_backbone import convert_llava_backbone

    if _CONFIG.value is None or not _HF_DIR.value:
        raise MsloraError("convert-llava-med needs --config and --hf-dir")
    config = experiment_config(_CONFIG.value)
    # Default: where a run with this config loads its backbone from.
    out = _OUT.value or (config.backbone.path if config.backbone.source == "load" else "")
    if not out:
        raise MsloraError('convert-llava-med needs --out (or a config with backbone.source="load")')
    count = convert_llava_backbone(config, _HF_DIR.value, out, _VISION_HF_DIR.value)
    print(f"converted {count:,} parameters into {out}")
    loaded_by_run = Path(out).absolute() == Path(config.backbone.path).absolute()
    if config.backbone.source != "load" or not loaded_by_run:
        print(f'run with --config.backbone.source=load --config.backbone.path="{out}"')


def main(argv: list[str]) -> None:
    # Our own progress lines at INFO; orbax's very chatty INFO logs (absl) only from WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("mslora_jax").setLevel(logging.INFO)
    commands = argv[1:]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        raise app.UsageError(f"expected one command of {COMMANDS}, got {commands}")
    if commands[0] in ("run", "inspect") and not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    try:
        if commands[0] == "run":
            _start_processes()  # first: some imports below already run jax code
        {"run": _run, "inspect": _inspect, "convert-llava-med": _convert_llava_med}[commands[0]]()
    except MsloraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except RunPreempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def entry_point() -> None:
    app.run(main)


if __name__ == "__main__":
    entry_point()
