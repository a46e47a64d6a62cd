"""The help texts: every command with one line, and one command's flags."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence

from absl import flags

from mslora_jax.cli.command import Command

PROGRAM = "mslora-jax"
_WIDTH = 100


def overview(commands: Sequence[Command]) -> str:
    """``mslora-jax --help``: what the program does and one line per command."""
    width = max(len(c.name) for c in commands) + 2
    lines = [
        f"usage: {PROGRAM} COMMAND [flags]",
        "",
        "MSLoRA-CR continual LoRA learning for biomedical images.",
        "",
        "commands:",
        *(f"  {c.name:<{width}}{c.summary}" for c in commands),
        "",
        f"`{PROGRAM} COMMAND --help` lists a command's flags.",
    ]
    return "\n".join(lines)


def _metavar(flag: flags.Flag, usage: str) -> str:
    """``=DIR`` as the usage line names the value (``--workdir DIR``), else by the flag's type."""
    if flag.name == "config":  # the config file flag of ml_collections
        return "=FILE[:ARG]"
    if isinstance(flag.parser, flags.EnumParser):
        return "=" + "|".join(flag.parser.enum_values)
    named = re.search(rf"--{re.escape(flag.name)}[ =]([A-Z][A-Z0-9_:]*)", usage)
    if named:
        return "=" + named.group(1)
    return "=N" if isinstance(flag.parser, flags.IntegerParser) else "=VALUE"


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, _WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)


def _flag_lines(name: str, flag: flags.Flag, usage: str) -> list[str]:
    head = f"--[no]{name}" if flag.boolean else f"--{name}{_metavar(flag, usage)}"
    text = flag.help
    if isinstance(flag.parser, flags.EnumParser):  # absl starts its help with "<a|b>: "
        text = text.split(": ", 1)[-1]
    if flag.default not in (None, False, ""):
        text += f" (default: {flag.default!r})"
    return [f"  {head}", *_wrap(text)]


def command_help(command: Command, flag_values: flags.FlagValues) -> str:
    """``mslora-jax COMMAND --help``: usage, summary and the command's own flags only."""
    lines = [f"usage: {PROGRAM} {command.name} {command.usage}", "", command.summary, "", "flags:"]
    for name in flag_values:  # definition order
        flag = flag_values[name]
        required = " (required)" if name in command.required else ""
        head, *body = _flag_lines(name, flag, command.usage)
        lines += [head + required, *body]
        if name == "config":
            lines += [
                "  --config.KEY=VALUE",
                *_wrap(
                    "Override one key of the config file, e.g. --config.lora.rank=4 or "
                    "--config.methods=\"('seq','mslora_cr')\"; repeat for more keys."
                ),
            ]
    return "\n".join(lines)
