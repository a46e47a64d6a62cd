"""What the command line prints at each ``--verbosity`` (``mslora_jax.cli.console``)."""

import logging

import pytest

from mslora_jax.cli.console import PACKAGE_LOGGER, configure_console

LOG = logging.getLogger(f"{PACKAGE_LOGGER}.train.stream")


@pytest.fixture(autouse=True)
def _restore_logger():
    ours = logging.getLogger(PACKAGE_LOGGER)
    saved = ours.handlers[:], ours.propagate, ours.level
    yield
    ours.handlers[:], ours.propagate, ours.level = saved


def _printed(capsys, verbosity):
    configure_console(verbosity)
    LOG.debug("every metric of the stage")
    LOG.info("mslora_cr 1/3 path_a: accuracy 90.0 – –  loss 1.0000")
    LOG.warning("the workdir is nearly full")
    return capsys.readouterr().err.splitlines()


def test_default_shows_stage_lines_and_warnings_without_details(capsys):
    assert _printed(capsys, 0) == [
        "mslora_cr 1/3 path_a: accuracy 90.0 – –  loss 1.0000",
        "warning: the workdir is nearly full",
    ]


def test_verbosity_one_brings_the_details_back(capsys):
    assert _printed(capsys, 1)[0] == "every metric of the stage"


def test_negative_verbosity_leaves_warnings_only(capsys):
    assert _printed(capsys, -1) == ["warning: the workdir is nearly full"]
