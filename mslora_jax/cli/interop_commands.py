"""The commands that read and write formats from outside this library (``mslora_jax.interop``):
Hugging Face weights in, adapters out to PEFT and back, the released MSLoRA-CR checkpoints in.

Like ``commands``, each is a thin call into the library, which is imported inside the function.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from absl import flags

from mslora_jax.cli.command import CONFIG_HELP, Command, define_workdir


def _convert_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "hf-dir", None, "The Hugging Face LLaVA-Med folder (safetensors).", flag_values=fv
    )
    flags.DEFINE_string(
        "vision-hf-dir",
        None,
        "A CLIP folder (openai/clip-vit-large-patch14-336) to take the vision tower from, for a "
        "LLaVA folder without one.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "out",
        None,
        "The backbone folder to write (default: the config's backbone.path).",
        flag_values=fv,
    )


def _convert_llava_med(args: SimpleNamespace) -> None:
    from mslora_jax.config import experiment_config
    from mslora_jax.errors import CommandLineError
    from mslora_jax.interop.llava_med import convert_llava_backbone

    config = experiment_config(args.config)
    # Default: where a run with this config loads its backbone from.
    out = args.out or (config.backbone.path if config.backbone.source == "load" else "")
    if not out:
        raise CommandLineError(
            'convert-llava-med needs --out (or a config with backbone.source="load")'
        )
    count = convert_llava_backbone(config, args.hf_dir, out, args.vision_hf_dir)
    print(f"converted {count:,} parameters into {out}")
    loaded_by_run = Path(out).absolute() == Path(config.backbone.path).absolute()
    if config.backbone.source != "load" or not loaded_by_run:
        print(f'run with --config.backbone.source=load --config.backbone.path="{out}"')


CONVERT_LLAVA_MED = Command(
    name="convert-llava-med",
    summary="Convert Hugging Face LLaVA-Med weights into a backbone folder that runs load.",
    usage="--config FILE[:ARG] --hf-dir DIR [--vision-hf-dir DIR] [--out DIR]",
    run=_convert_llava_med,
    define_flags=_convert_flags,
    config_help=CONFIG_HELP,
    required=("config", "hf-dir"),
)


def _convert_clip_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "hf-dir",
        None,
        "The Hugging Face CLIP folder (openai/clip-vit-* layout: config.json, safetensors, "
        "tokenizer.json).",
        flag_values=fv,
    )
    flags.DEFINE_string("out", None, "The backbone folder to write.", flag_values=fv)
    flags.DEFINE_integer(
        "max-text-len",
        None,
        "Length the class prompts are padded to (default: CLIP's positions, 77; with "
        "--text-hf-dir 77 or the BERT's positions if fewer).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "text-hf-dir",
        None,
        "A Hugging Face BERT or sentence-transformers folder (config.json, safetensors, "
        "tokenizer.json) whose encoder is the text tower instead of CLIP's (model.text_tower="
        "bert; BiomedCLIP-style).",
        flag_values=fv,
    )


def _convert_clip(args: SimpleNamespace) -> None:
    from mslora_jax.interop.clip import convert_clip_backbone

    count, _ = convert_clip_backbone(
        args.hf_dir, args.out, max_text_len=args.max_text_len, text_hf_dir=args.text_hf_dir
    )
    print(f"converted {count:,} parameters into {args.out}")
    print(f"run with --config configs/clip_demo.py:{args.out}")


CONVERT_CLIP = Command(
    name="convert-clip",
    summary="Convert a Hugging Face CLIP into a dual-encoder backbone folder that runs load.",
    usage="--hf-dir DIR --out DIR [--text-hf-dir DIR] [--max-text-len N]",
    run=_convert_clip,
    define_flags=_convert_clip_flags,
    required=("hf-dir", "out"),
)


def _export_peft_flags(fv: flags.FlagValues) -> None:
    define_workdir(fv, "The folder of a run (mslora-jax run --workdir).")
    flags.DEFINE_string(
        "method", None, "Whose adapter: one of the run's methods, e.g. mslora_cr.", flag_values=fv
    )
    flags.DEFINE_string(
        "task", None, "The task whose stage is exported: a task name or id.", flag_values=fv
    )
    flags.DEFINE_string(
        "out", None, "The PEFT folder to write (must not exist or be empty).", flag_values=fv
    )
    flags.DEFINE_bool(
        "merged",
        False,
        "Export the sum of every adapter the method uses for the task after its stage (tasks "
        "1..k for MSLoRA) as one LoRA of the summed rank, exactly.",
        flag_values=fv,
    )


def _export_peft(args: SimpleNamespace) -> None:
    from mslora_jax.interop.peft_run import export_run_adapter

    adapter = export_run_adapter(args.workdir, args.method, args.task, args.out, merged=args.merged)
    what = "merged adapter" if args.merged else "adapter"
    print(f"wrote the {what} of task {adapter.task!r} (rank {adapter.rank}) to {args.out}")


EXPORT_PEFT = Command(
    name="export-peft",
    summary="Write one task's adapter of a run as a Hugging Face PEFT LoRA folder.",
    usage="--workdir DIR --method METHOD --task NAME_OR_ID --out DIR [--merged]",
    run=_export_peft,
    define_flags=_export_peft_flags,
    required=("workdir", "method", "task", "out"),
)


def _import_peft_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("peft-dir", None, "The PEFT LoRA folder to read.", flag_values=fv)
    flags.DEFINE_string(
        "out", None, "The adapter folder to write (must not exist or be empty).", flag_values=fv
    )
    flags.DEFINE_string(
        "task",
        None,
        "The adapter's task name (default: the folder's mslora_jax.json).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "modality",
        None,
        "The adapter's modality (default: the folder's mslora_jax.json).",
        flag_values=fv,
    )


def _import_peft(args: SimpleNamespace) -> None:
    from mslora_jax.config import experiment_config
    from mslora_jax.interop.peft_run import import_peft_adapter
    from mslora_jax.io_utils import atomic_folder
    from mslora_jax.lora.io import save_adapter

    config = experiment_config(args.config)
    adapter = import_peft_adapter(config, args.peft_dir, task=args.task, modality=args.modality)
    with atomic_folder(args.out) as tmp:
        save_adapter(tmp, adapter)
    print(
        f"wrote the adapter of task {adapter.task!r} ({adapter.modality}, rank {adapter.rank}, "
        f"{adapter.num_params():,} parameters) to {args.out}"
    )


IMPORT_PEFT = Command(
    name="import-peft",
    summary="Read a Hugging Face PEFT LoRA folder as an adapter of a config's model.",
    usage="--config FILE[:ARG] --peft-dir DIR --out DIR [--task NAME] [--modality NAME]",
    run=_import_peft,
    define_flags=_import_peft_flags,
    config_help=CONFIG_HELP,
    required=("config", "peft-dir", "out"),
)


def _import_released_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_multi_string(
        "bin",
        None,
        "A released cl_lora.bin (its config.json beside it); repeat for every stage's file.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "out", None, "The run folder to write (must not exist or be empty).", flag_values=fv
    )
    flags.DEFINE_string(
        "method",
        None,
        "The method whose stages they become (default: the config's one of mslora_cr_ortho, "
        "mslora).",
        flag_values=fv,
    )


def _import_released(args: SimpleNamespace) -> None:
    from mslora_jax.config import experiment_config
    from mslora_jax.interop.released_run import import_released

    stages = import_released(experiment_config(args.config), args.bin, args.out, args.method)
    for stage, imported in enumerate(stages):
        print(f"stage {stage + 1} ({imported.task}) <- {imported.source}: {imported.row}")
    print(f"wrote {args.out}; continue with: mslora-jax run --config ... --workdir {args.out}")


IMPORT_RELEASED = Command(
    name="import-released",
    summary="Import the released MSLoRA-CR cl_lora.bin files as the finished stages of a run.",
    usage="--config FILE[:ARG] --bin FILE [--bin FILE ...] --out DIR [--method NAME]",
    run=_import_released,
    define_flags=_import_released_flags,
    config_help=CONFIG_HELP,
    required=("config", "bin", "out"),
)

INTEROP_COMMANDS: tuple[Command, ...] = (
    CONVERT_LLAVA_MED,
    CONVERT_CLIP,
    EXPORT_PEFT,
    IMPORT_PEFT,
    IMPORT_RELEASED,
)
