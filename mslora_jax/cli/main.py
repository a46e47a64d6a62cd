"""``mslora-jax``: the command line. Thin: parse the command's flags, call the library.

mslora-jax run --config configs/demo.py --workdir OUT [--config.lora.rank=4 ...] [--dry-run]
mslora-jax run ... --coordinator_address HOST:PORT --num_processes N --process_id I
    (once per process; or --distributed=auto on TPU pods / SLURM)
mslora-jax sweep --config configs/demo.py --seeds 0,1,2 --workdir OUT [--config.KEY=VALUE ...]
mslora-jax inspect --workdir OUT --method mslora_cr [--task NAME_OR_ID]
mslora-jax convert-llava-med --config configs/paper_8task.py:DATA --hf-dir DIR \\
    [--vision-hf-dir DIR] [--out DIR]

``mslora-jax --help`` lists the commands (``mslora_jax.cli.commands.COMMANDS``) and ``mslora-jax
COMMAND --help`` one command's flags. Bad input (a ``MsloraError``) is one ``error: ...`` line on
stderr and exit code 2, or the error's own ``exit_code``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app

from mslora_jax.cli.commands import COMMANDS
from mslora_jax.cli.console import absl_verbosity, configure_console
from mslora_jax.cli.parse import Invocation, Usage, parse_command_line
from mslora_jax.errors import MsloraError
from mslora_jax.train.preemption import RunPreempted


def _report(error: Usage | MsloraError) -> int:
    """Print help or the error's one line; the exit code."""
    if isinstance(error, Usage):
        print(error.text, file=sys.stdout if error.exit_code == 0 else sys.stderr)
        return error.exit_code
    print(f"error: {error}", file=sys.stderr)
    return getattr(error, "exit_code", 2)


def _parse(argv: list[str]) -> Invocation:
    """absl's ``flags_parser``: ``argv`` with the program name first."""
    try:
        return parse_command_line(argv[1:], COMMANDS)
    except (Usage, MsloraError) as e:
        sys.exit(_report(e))


def _dispatch(invocation: Invocation) -> None:
    configure_console(absl_verbosity())  # cli.console: what --verbosity shows
    try:
        invocation.command.run(invocation.args)
    except MsloraError as e:
        sys.exit(_report(e))
    except RunPreempted as e:  # not an error: saved, and a rerun continues
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def main(argv: Sequence[str]) -> None:
    """The command line without absl's ``app.run`` (tests, notebooks): same parsing, output and
    exit codes (``SystemExit``), but no absl log handler or faulthandler set up."""
    _dispatch(_parse(list(argv)))


def entry_point() -> None:
    app.run(_dispatch, flags_parser=_parse)


if __name__ == "__main__":
    entry_point()
