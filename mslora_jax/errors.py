"""Error types for bad user input.

Every error raised for bad input (a config key, a data file, a checkpoint) is a subclass of
``MsloraError`` so the command line can print it as one clear line and exit non-zero.
"""


class MsloraError(ValueError):
    """Base class: bad input that the user can fix; the message names the problem."""


class ConfigError(MsloraError):
    """A config value is unknown, missing or out of range."""


class DataError(MsloraError):
    """A data file is missing, unreadable or has the wrong layout."""


class CheckpointError(MsloraError):
    """A checkpoint is missing, corrupt or belongs to a different config."""


class TrainingDivergedError(MsloraError):
    """A loss term or the gradient became non-finite; names the stage, step and term."""


class CommandLineError(MsloraError):
    """The command line is malformed: an unknown command or flag, a missing or bad flag value."""
