"""What the command line shows, by absl's ``--verbosity`` (``-v``).

- ``0`` (the default): a progress bar per stage while it trains, then one line per finished stage
  (method, stage, task, the row of primary metrics, the loss), the final table, and warnings.
- ``1`` (``--verbosity=1``): also the details (each stage's full metrics and timing, resumed and
  restored stages, backbone info) and the INFO logs of the libraries underneath (orbax, absl).
- ``-1``: warnings and errors only (and the final table).

Lines go through ``tqdm.write`` so they print above a running bar instead of through it.
Nothing here changes what a run records: ``logs/train.jsonl`` holds every scalar at any
verbosity.
"""

from __future__ import annotations

import logging
import sys

from absl import flags
from absl import logging as absl_logging
from tqdm.auto import tqdm

PACKAGE_LOGGER = "mslora_jax"


class TqdmHandler(logging.Handler):
    """A log handler that prints each record above the progress bars (``tqdm.write``)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _LevelPrefix(logging.Formatter):
    """Plain lines for INFO and DEBUG; ``warning:``/``error:`` in front of what asks for action."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def absl_verbosity() -> int:
    """absl's ``--verbosity`` as parsed from the command line (0 before any parsing)."""
    return flags.FLAGS["verbosity"].value if flags.FLAGS.is_parsed() else 0


def configure_console(verbosity: int) -> None:
    """Route the package's logs to the console, at the level ``verbosity`` asks for."""
    handler = TqdmHandler()
    handler.setFormatter(_LevelPrefix("%(message)s"))
    ours = logging.getLogger(PACKAGE_LOGGER)
    # Our own handler only: through absl's, every line would get a timestamp and a source file.
    ours.handlers[:] = [handler]
    ours.propagate = False
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    ours.setLevel(level)
    # orbax and the other libraries log through absl: their INFO lines are details.
    absl_logging.set_verbosity(absl_logging.INFO if verbosity > 0 else absl_logging.WARNING)
