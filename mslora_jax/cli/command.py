"""One ``mslora-jax`` command as data: its name, one-line summary, usage, flags and function.

A new command (sweep, score, adapter export/import, ...) is one ``Command`` in its own module
plus one entry in ``mslora_jax.cli.commands.COMMANDS``; parsing, help and error reporting are
shared (``mslora_jax.cli.parse``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import SimpleNamespace

from absl import flags


def no_flags(flag_values: flags.FlagValues) -> None:
    """``Command.define_flags`` of a command whose only flag is ``--config`` (or none)."""


@dataclasses.dataclass(frozen=True)
class Command:
    """A command of ``mslora-jax``.

    ``define_flags(flag_values)`` defines the command's own flags with absl's ``DEFINE_*(...,
    flag_values=flag_values)``; ``run(args)`` gets their parsed values as attributes, with dashes
    turned into underscores (``--dry-run`` -> ``args.dry_run``). A command with ``config_help``
    also takes ``--config FILE[:ARG]`` plus ``--config.KEY=VALUE`` overrides, and ``args.config``
    is the loaded, overridden ``ConfigDict``.
    """

    name: str
    summary: str  # one line, for `mslora-jax --help`
    usage: str  # the synopsis after `mslora-jax NAME`
    run: Callable[[SimpleNamespace], None]
    define_flags: Callable[[flags.FlagValues], None] = no_flags
    config_help: str | None = None
    required: tuple[str, ...] = ()  # flags that must be given (names without dashes)


# Shared by the commands' flag definitions.
CONFIG_HELP = "The experiment config: a configs/*.py file, with get_config's argument after ':'."


def define_workdir(flag_values: flags.FlagValues, help_text: str) -> None:
    flags.DEFINE_string("workdir", None, help_text, flag_values=flag_values)
