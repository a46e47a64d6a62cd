"""The commands of ``mslora-jax``, each a thin call into the library.

A new command is a ``Command`` (``mslora_jax.cli.command``) and one entry in ``COMMANDS`` (or, for
the readers and writers of outside formats, in ``interop_commands.INTEROP_COMMANDS``).
Library imports happen inside each function: ``run`` must start ``jax.distributed`` before
anything touches jax, and ``--help`` stays fast.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

from absl import flags

from mslora_jax.cli.command import CONFIG_HELP, Command, define_workdir
from mslora_jax.cli.console import PACKAGE_LOGGER
from mslora_jax.cli.interop_commands import INTEROP_COMMANDS
from mslora_jax.cli.retrieval_commands import RETRIEVAL_COMMANDS


def _run_flags(fv: flags.FlagValues) -> None:
    define_workdir(fv, "Output folder (created; a rerun resumes after the last finished stage).")
    flags.DEFINE_bool(
        "dry-run",
        False,
        "Size the model abstractly and check the data layout; train nothing, write nothing.",
        flag_values=fv,
    )
    _distributed_flags(fv)


def _distributed_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum(
        "distributed",
        None,
        ["off", "auto"],
        "Multi-process: 'auto' lets jax detect the cluster (TPU pod, SLURM); default: "
        "$MSLORA_DISTRIBUTED, else off unless the three coordinates below are given.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "Multi-process: host:port of process 0 (default $MSLORA_COORDINATOR_ADDRESS).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_processes",
        None,
        "Multi-process: how many processes (default $MSLORA_NUM_PROCESSES).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "process_id",
        None,
        "Multi-process: this process's index, 0..N-1 (default $MSLORA_PROCESS_ID).",
        flag_values=fv,
    )


def _start_processes(args: SimpleNamespace) -> None:
    """Join the multi-process run the flags describe (if any); before anything touches jax."""
    from mslora_jax.parallel.distributed import initialize_distributed, label_logs_with_process

    initialize_distributed(
        args.coordinator_address, args.num_processes, args.process_id, mode=args.distributed
    )
    label_logs_with_process()  # absl's handler (the libraries' logs)
    label_logs_with_process(logging.getLogger(PACKAGE_LOGGER))  # cli.console's


def _run(args: SimpleNamespace) -> None:
    _start_processes(args)  # first: some imports below already run jax code

    from mslora_jax.config import experiment_config
    from mslora_jax.parallel.distributed import is_primary
    from mslora_jax.report.results import format_report
    from mslora_jax.run.experiment import run_experiment

    config = experiment_config(args.config)
    if args.dry_run:
        from mslora_jax.run.dry_run import dry_run

        print(dry_run(config))
        return
    results = run_experiment(config, args.workdir)
    if not is_primary():
        return  # process 0 wrote the files and reports them
    print(format_report(results))
    print(f"\nwrote {args.workdir}/results.json, results.md, results.csv, acc_matrices.png, plots/")


RUN = Command(
    name="run",
    summary="Train and evaluate every method of a config on its task stream (or --dry-run).",
    usage="--config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...] [--dry-run] "
    "[multi-process flags]",
    run=_run,
    define_flags=_run_flags,
    config_help=CONFIG_HELP,
    required=("config", "workdir"),
)


def _sweep_flags(fv: flags.FlagValues) -> None:
    define_workdir(
        fv,
        "Output folder: one run folder per seed (seed_<s>/, resumed as run resumes) "
        "and summary.json/.md/.csv/.png.",
    )
    flags.DEFINE_string(
        "seeds",
        None,
        "Comma-separated non-negative seeds, at least two, e.g. 0,1,2; each run sets config.seed.",
        flag_values=fv,
    )
    _distributed_flags(fv)


def _sweep(args: SimpleNamespace) -> None:
    from mslora_jax.run.sweep import parse_seeds

    seeds = parse_seeds(args.seeds)  # bad seeds fail before anything starts
    _start_processes(args)

    from mslora_jax.config import experiment_config
    from mslora_jax.parallel.distributed import is_primary
    from mslora_jax.report.sweep_files import SUMMARY_FILES, format_summary_markdown
    from mslora_jax.run.sweep import run_sweep

    summary = run_sweep(experiment_config(args.config), seeds, args.workdir)
    if not is_primary():
        return
    print(format_summary_markdown(summary))
    print(f"\nwrote {args.workdir}/{', '.join(SUMMARY_FILES)} (runs in seed_<s>/)")


SWEEP = Command(
    name="sweep",
    summary="Run a config once per seed, then summarize: means, 95% intervals, paired tests.",
    usage="--config FILE[:ARG] --seeds SEEDS --workdir DIR [--config.KEY=VALUE ...] "
    "[multi-process flags]",
    run=_sweep,
    define_flags=_sweep_flags,
    config_help=CONFIG_HELP,
    required=("config", "seeds", "workdir"),
)


def _inspect_flags(fv: flags.FlagValues) -> None:
    define_workdir(fv, "The folder of a run (mslora-jax run --workdir).")
    flags.DEFINE_string(
        "method", None, "Whose adapters: one of the run's methods, e.g. mslora_cr.", flag_values=fv
    )
    flags.DEFINE_string(
        "task", None, "Only this task's stage: a task name or id (default: all).", flag_values=fv
    )
    flags.DEFINE_bool(
        "plots",
        False,
        "Also (re)draw the method's pictures: WORKDIR/plots/adapter_similarity_METHOD.png and "
        "loss_METHOD.png.",
        flag_values=fv,
    )


def _inspect(args: SimpleNamespace) -> None:
    from mslora_jax.cli.inspect import inspect_adapters

    print(inspect_adapters(args.workdir, args.method, args.task))
    if args.plots:
        from mslora_jax.run.pictures import write_pictures

        for path in write_pictures(args.workdir, [args.method]).values():
            print(f"wrote {path}")


INSPECT = Command(
    name="inspect",
    summary="Print a run's saved adapters: size, norms and the CR similarity between them.",
    usage="--workdir DIR --method METHOD [--task NAME_OR_ID] [--plots]",
    run=_inspect,
    define_flags=_inspect_flags,
    required=("workdir", "method"),
)


def _score_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "answers",
        None,
        "An answer file (JSON lines): the released results/<run>/<task>/answer-file.jsonl or a "
        "run's answers/<method>/<task>.jsonl.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "metrics",
        "released",
        ["released", "clean"],
        "Whose definitions: the released MSLoRA-CR evaluator's (as in the paper's table) or "
        "mslora_jax's clean ones (eval.metrics).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "json", False, "Print the scores as JSON (fractions; null: undefined).", flag_values=fv
    )


def _score(args: SimpleNamespace) -> None:
    import json
    import math

    from mslora_jax.eval.scoring import score_answer_file
    from mslora_jax.report.answer_scores import format_answer_scores

    scores = score_answer_file(args.answers, args.metrics)
    if args.json:
        print(json.dumps({k: None if math.isnan(v) else v for k, v in scores.items()}, indent=1))
    else:
        print(format_answer_scores(scores, args.metrics))


SCORE = Command(
    name="score",
    summary="Score an answer file with the released evaluator's metrics (or the clean ones).",
    usage="--answers FILE [--metrics released|clean] [--json]",
    run=_score,
    define_flags=_score_flags,
    required=("answers",),
)

# In the order `mslora-jax --help` lists them: running and reading runs, retrieval with a run's
# encoders (``retrieval_commands``), then the converters and importers of outside formats
# (``interop_commands``).
COMMANDS: tuple[Command, ...] = (
    RUN, SWEEP, INSPECT, SCORE, *RETRIEVAL_COMMANDS, *INTEROP_COMMANDS
)  # fmt: skip
