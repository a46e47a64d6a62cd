"""From the words after ``mslora-jax`` to a command and its flag values, or a one-line error.

Each command parses only its own flags (a fresh absl ``FlagValues`` per command), so ``inspect
--help`` lists inspect's flags and ``inspect --hf-dir`` is an error. Values are still parsed by
absl and ml_collections as before (``--x=v`` and ``--x v``, ``--[no]flag``, ``--flagfile``, tuple
overrides), and absl's own flags (``--verbosity``, ``--logtostderr``, ...) are still accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from mslora_jax.cli.command import Command
from mslora_jax.cli.config_keys import (
    ConfigFileWithDefaults,
    bad_value_message,
    override_paths,
    unknown_key_message,
)
from mslora_jax.cli.help import PROGRAM, command_help, overview
from mslora_jax.errors import CommandLineError, ConfigError

HELP_WORDS = frozenset({"-h", "-?", "--help", "-help", "--helpshort", "--helpfull"})


class Usage(Exception):
    """Help to print instead of running: on stdout for ``--help`` (exit 0), on stderr when the
    command is missing (exit 2)."""

    def __init__(self, text: str, exit_code: int = 0):
        super().__init__(text)
        self.text = text
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True)
class Invocation:
    command: Command
    args: SimpleNamespace


def _nearest(word: str, choices: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _find_command(args: Sequence[str], commands: Sequence[Command]) -> tuple[Command, list[str]]:
    """The first word naming a command (flags may precede it, as absl allowed) and the rest."""
    names = [c.name for c in commands]
    for i, word in enumerate(args):
        if word in names:
            return commands[names.index(word)], [*args[:i], *args[i + 1 :]]
    if any(word in HELP_WORDS for word in args):
        raise Usage(overview(commands))
    words = [w for w in args if not w.startswith("-")]
    if not words:
        raise Usage(overview(commands) + "\n\nerror: no command given", exit_code=2)
    raise CommandLineError(
        f"unknown command {words[0]!r}{_nearest(words[0], names)} (commands: {', '.join(names)})"
    )


def _config_argument(args: Sequence[str]) -> str | None:
    """The value of ``--config`` in ``args`` (``--config F``, ``--config=F``, one dash too)."""
    for i, word in enumerate(args):
        for prefix in ("--config=", "-config="):
            if word.startswith(prefix):
                return word[len(prefix) :]
        if word in ("--config", "-config") and i + 1 < len(args):
            return args[i + 1]
    return None


def _schema() -> type:
    from mslora_jax.config import ExperimentConfig

    return ExperimentConfig


def _new_flag_values(command: Command, argv: list[str]) -> flags.FlagValues:
    flag_values = flags.FlagValues()
    if command.config_help is not None:
        # sys_argv: ml_collections reads the overrides from it (default: the real sys.argv).
        config_flags.DEFINE_config_file(
            "config", None, command.config_help, flag_values=flag_values, sys_argv=argv
        )
        # Overrides may set keys the file leaves at their defaults.
        paths = override_paths(argv)
        flag_values["config"].parser = ConfigFileWithDefaults("config", paths, _schema)
    command.define_flags(flag_values)
    return flag_values


def _config_key_error(args: Sequence[str], config_file: str) -> str | None:
    """The first override in ``args`` that names no key of the config file, in words."""
    from mslora_jax.config import ExperimentConfig

    config = ConfigFileFlagParser("config").parse(config_file)
    for path in override_paths(args):
        message = unknown_key_message(config, path, config_file.split(":")[0], ExperimentConfig)
        if message:
            return message
    return None


def _parse_flags(command: Command, flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
    """Parse ``argv`` into ``flag_values``; the words left over. Bad input -> MsloraError."""
    try:
        return flag_values(argv, known_only=True)[1:]
    except flags.IllegalFlagValueError as e:
        config = flag_values["config"].value if "config" in flag_values else None
        raise ConfigError(bad_value_message(config, str(e)) or str(e)) from None
    except flags.Error as e:  # a flag without its value, an override before --config, ...
        raise CommandLineError(str(e)) from None
    except (AttributeError, KeyError, IndexError) as e:  # ml_collections: an unknown config key
        config_file = _config_argument(argv)
        message = _config_key_error(argv, config_file) if config_file else None
        if message is None:
            raise  # not an override's fault: a bug worth its traceback
        raise ConfigError(message) from e


def _check_leftovers(command: Command, flag_values: flags.FlagValues, words: list[str]) -> None:
    unknown = [w for w in words if w.startswith("-")]
    if unknown:
        name = unknown[0].lstrip("-").split("=", 1)[0]
        if name.startswith("config.") and command.config_help is not None:
            raise CommandLineError(f"{unknown[0]}: an override needs --config FILE before it")
        own = [n for n in flag_values if "." not in n]
        raise CommandLineError(
            f"{command.name} has no flag --{name}{_nearest(name, own, '--')} "
            f"(its flags: {PROGRAM} {command.name} --help)"
        )
    if words:
        raise CommandLineError(f"{command.name} takes no arguments, got {words}")
    missing = [n for n in command.required if flag_values[n].value in (None, "")]
    if missing:
        raise CommandLineError(
            f"{command.name} needs --{' and --'.join(missing)} "
            f"(usage: {PROGRAM} {command.name} {command.usage})"
        )


def parse_command_line(args: Sequence[str], commands: Sequence[Command]) -> Invocation:
    """The command that ``args`` (the words after the program name) names, with its flags.

    Raises ``Usage`` for help and ``CommandLineError``/``ConfigError`` for bad input.
    """
    command, rest = _find_command(list(args), commands)
    argv = [f"{PROGRAM} {command.name}", *rest]
    flag_values = _new_flag_values(command, argv)
    if any(word in HELP_WORDS for word in rest):
        raise Usage(command_help(command, flag_values))
    config_file = _config_argument(rest) if command.config_help is not None else None
    if config_file is not None and not Path(config_file.split(":", 1)[0]).is_file():
        raise CommandLineError(f"--config {config_file}: file not found")
    words = _parse_flags(command, flag_values, argv)
    try:  # absl's own flags (--verbosity, --logtostderr, ...); app.run needs FLAGS parsed
        words = flags.FLAGS([argv[0], *words], known_only=True)[1:]
    except flags.Error as e:
        raise CommandLineError(str(e)) from None
    _check_leftovers(command, flag_values, words)
    values = {n.replace("-", "_"): flag_values[n].value for n in flag_values if "." not in n}
    return Invocation(command, SimpleNamespace(**values))
