"""The command line: help per command, one-line errors for bad flags and config keys, and every
documented invocation parsing as before. In-process (``main``), except one run of the real entry
point through absl's ``app.run``."""

import os
import re
import subprocess
import sys

import pytest
from absl import flags

from mslora_jax.cli import main as cli_main
from mslora_jax.cli.command import Command
from mslora_jax.cli.commands import COMMANDS, RUN
from mslora_jax.cli.help import overview
from mslora_jax.cli.parse import Usage, parse_command_line
from mslora_jax.errors import ConfigError, MsloraError
from tests.helpers import ROOT

SMOKE = str(ROOT / "configs" / "smoke.py")
PAPER = str(ROOT / "configs" / "paper_8task.py")


def _exit(capsys, *args):
    """Run ``mslora-jax ARGS`` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["mslora-jax", *args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _one_error_line(code, err):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_help_lists_every_command_with_one_line(capsys):
    code, out, _ = _exit(capsys, "--help")
    assert code == 0
    rows = [line.split(None, 1) for line in out.splitlines() if line.startswith("  ")]
    assert rows == [[c.name, c.summary] for c in COMMANDS]
    code, _, err = _exit(capsys)  # no command: the same list, on stderr, and a failure
    assert code == 2 and all(c.summary in err for c in COMMANDS) and "no command given" in err


def test_command_help_shows_only_its_flags(capsys):
    code, out, _ = _exit(capsys, "inspect", "--help")
    assert code == 0 and out.startswith("usage: mslora-jax inspect --workdir DIR --method")
    for name in ("--workdir=DIR (required)", "--method=METHOD (required)", "--task=NAME_OR_ID"):
        assert name in out
    for other in ("--hf-dir", "--config", "--coordinator_address", "--dry-run", "--distributed"):
        assert other not in out
    assert "Only this task's stage" in out  # the help text of --task
    code, out, _ = _exit(capsys, "run", "-h")
    assert code == 0 and "--hf-dir" not in out and "--task" not in out
    for name in ("--config=FILE[:ARG]", "--config.KEY=VALUE", "--[no]dry-run", "--num_processes=N"):
        assert name in out
    assert "--distributed=off|auto\n      Multi-process: 'auto'" in out
    code, out, _ = _exit(capsys, "convert-llava-med", "--help")
    assert code == 0 and "--vision-hf-dir=DIR" in out and "--workdir" not in out


@pytest.mark.parametrize(
    "override, want",
    [
        (
            "--config.lora.rnk=3",
            "--config.lora.rnk: no key lora.rnk in {}; did you mean lora.rank?",
        ),
        ("--config.trian.batch_size=4", "no key trian in {}; did you mean train?"),
        ("--config.stream[0].nme=x", "did you mean stream[0].name?"),
        ("--config.lora.xyzzy=1", "no key lora.xyzzy in {}; lora has: alpha, rank\n"),
        ("--config.stream[5].name=x", "stream has 3 entries, so it has no [5]"),
        # a real key of the typed config inside a list, which the file does not set
        ("--config.stream[0].tfds_name=x", "{} does not set stream[0].tfds_name (a valid key"),
    ],
)
def test_bad_config_key_is_one_line_naming_the_nearest_key(capsys, override, want):
    code, _, err = _exit(capsys, "run", "--config", SMOKE, "--workdir", "unused", override)
    assert want.format(SMOKE) in _one_error_line(code, err)


def test_bad_config_value_is_one_line(capsys):
    args = ("run", "--config", SMOKE, "--workdir", "unused")
    code, _, err = _exit(capsys, *args, "--config.lora.rank=abc")
    want = (
        "error: --config.lora.rank=abc: expected int like the config's 2; invalid literal for int"
    )
    assert _one_error_line(code, err).startswith(want)
    code, _, err = _exit(capsys, *args, "--config.progress=maybe")
    assert "--config.progress=maybe: expected bool like the config's False" in _one_error_line(
        code, err
    )


@pytest.mark.parametrize(
    "args, want",
    [
        (("rn",), "unknown command 'rn'; did you mean run?"),
        (
            ("inspect", "--workdir", "w", "--method", "seq", "--hf-dir", "x"),
            "inspect has no flag --hf-dir",
        ),
        (
            ("inspect", "--wrkdir", "w", "--method", "seq"),
            "no flag --wrkdir; did you mean --workdir?",
        ),
        (("inspect", "--workdir", "w"), "inspect needs --method"),
        (
            ("inspect", "--workdir", "w", "--method", "seq", "extra"),
            "takes no arguments, got ['extra']",
        ),
        (("run", "--workdir", "w"), "run needs --config"),
        (
            ("run", "--config", "configs/nowhere.py", "--workdir", "w"),
            "configs/nowhere.py: file not found",
        ),
        (("run", "--workdir", "w", "--config.lora.rank=3"), "an override needs --config FILE"),
        (("run", "--config", SMOKE, "--workdir", "w", "--distributed=maybe"), "one of <off|auto>"),
        (("run", "--config", SMOKE, "--workdir"), "Missing value for flag --workdir"),
    ],
)
def test_bad_command_lines_are_one_line(capsys, args, want):
    code, _, err = _exit(capsys, *args)
    assert want in _one_error_line(code, err)


def test_overrides_set_keys_the_file_leaves_at_their_defaults():
    from mslora_jax.config import experiment_config

    # configs/smoke.py has no checkpoint section and sets neither lora.dropout nor
    # train.input_workers (whose default is None).
    run = parse_command_line(
        [
            "run",
            "--config",
            SMOKE,
            "--workdir",
            "out",
            "--config.checkpoint.every_steps=50",
            "--config.lora.dropout=0.1",
            "--config.train.input_workers=2",
        ],
        COMMANDS,
    )
    config = experiment_config(run.args.config)
    assert config.checkpoint.every_steps == 50 and config.checkpoint.keep is None
    assert config.lora.dropout == 0.1 and config.train.input_workers == 2
    # Only the overridden keys are added, so the file's own config converts as before.
    file_config = parse_command_line(["run", "--config", SMOKE, "--workdir", "o"], COMMANDS)
    plain = experiment_config(file_config.args.config)
    assert config.lora.rank == plain.lora.rank and config.stream == plain.stream
    assert "checkpoint" not in file_config.args.config


def test_documented_invocations_parse_as_before():
    run = parse_command_line(
        [
            "run",
            "--config",
            SMOKE,
            "--workdir",
            "out",
            "--config.lora.rank=4",
            "--config.methods=('mslora','seq')",
            "--dry-run",
        ],
        COMMANDS,
    )
    assert run.command is RUN and run.args.workdir == "out" and run.args.dry_run
    assert run.args.config.lora.rank == 4 and run.args.config.methods == ("mslora", "seq")
    assert run.args.distributed is None and run.args.num_processes is None
    args = parse_command_line(
        [
            "run",
            "--config",
            SMOKE,
            "--workdir",
            "o",
            "--coordinator_address",
            "localhost:1234",
            "--num_processes=2",
            "--process_id",
            "1",
        ],
        COMMANDS,
    ).args
    assert (args.coordinator_address, args.num_processes, args.process_id) == (
        "localhost:1234",
        2,
        1,
    )
    assert not args.dry_run and args.config.lora.rank == 2  # the file's own value
    args = parse_command_line(
        ["run", "--config", SMOKE, "--workdir", "o", "--distributed=auto"], COMMANDS
    ).args
    assert args.distributed == "auto"
    args = parse_command_line(
        ["inspect", "--workdir", "o", "--method", "mslora_cr", "--task", "2"], COMMANDS
    ).args
    assert (args.workdir, args.method, args.task) == ("o", "mslora_cr", "2")
    args = parse_command_line(
        [
            "convert-llava-med",
            f"--config={PAPER}:/data",
            "--hf-dir=/hf",
            "--vision-hf-dir",
            "/clip",
            "--out=/bb",
        ],
        COMMANDS,
    ).args
    assert (args.hf_dir, args.vision_hf_dir, args.out) == ("/hf", "/clip", "/bb")
    assert args.config.data_dir == "/data"


class _Interrupted(MsloraError):
    exit_code = 75


def test_a_new_command_is_one_entry(capsys, monkeypatch):
    """What a later command (tune, export, ...) needs: a Command in COMMANDS, nothing else."""
    seen = []

    def define(fv):
        flags.DEFINE_integer("trials", 3, "How many trials.", flag_values=fv)
        flags.DEFINE_bool("keep-going", False, "Go on after a failed trial.", flag_values=fv)

    def tune(args):
        seen.append(args)
        if args.trials == 0:
            raise _Interrupted("interrupted after 0 trials")

    new = Command(
        "tune",
        "Try many configs.",
        "--config FILE [--trials N]",
        tune,
        define,
        config_help="The base config.",
        required=("config",),
    )
    monkeypatch.setattr(cli_main, "COMMANDS", (*COMMANDS, new))
    code, out, _ = _exit(capsys, "--help")
    # Padded to the longest command's name, like every other line.
    assert any(re.fullmatch(r"  tune +Try many configs\.", line) for line in out.splitlines())
    code, out, _ = _exit(capsys, "tune", "--help")
    assert "--trials=N\n      How many trials. (default: 3)" in out and "--[no]keep-going" in out
    cli_main.main(["mslora-jax", "tune", "--config", SMOKE, "--keep-going", "--config.seed=5"])
    assert seen[-1].trials == 3 and seen[-1].keep_going and seen[-1].config.seed == 5
    code, _, err = _exit(capsys, "tune", "--config", SMOKE, "--trials=0")
    assert code == 75 and err == "error: interrupted after 0 trials\n"  # the error's own exit code


def test_parse_raises_usage_and_errors_for_callers():
    with pytest.raises(Usage) as usage:
        parse_command_line(["run", "--help"], COMMANDS)
    assert usage.value.exit_code == 0 and "--workdir" in usage.value.text
    with pytest.raises(ConfigError, match="did you mean lora.rank"):
        parse_command_line(
            ["run", "--config", SMOKE, "--workdir", "w", "--config.lora.rnk=1"], COMMANDS
        )


def test_real_entry_point_bad_key_and_help():
    """Through absl's app.run, as `mslora-jax` runs: the same one line and exit codes."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "mslora_jax.cli.main"]
    proc = subprocess.run(
        [
            *command,
            "run",
            "--config",
            "configs/smoke.py",
            "--workdir",
            "unused",
            "--config.lora.rnk=3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "error: --config.lora.rnk: no key lora.rnk in configs/smoke.py; did you mean lora.rank?\n"
    )
    proc = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert proc.returncode == 0 and "convert-llava-med" in proc.stdout and proc.stderr == ""


def test_readme_shows_the_current_help():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("$ mslora-jax --help\n", 1)[1].split("```", 1)[0]
    assert block == overview(COMMANDS) + "\n"
