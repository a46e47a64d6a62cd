"""Test setup: 8 simulated CPU devices, so sharded code paths run (never skip) in CI; one
compilation cache shared by every test of the session.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.

The cache: many tests compile the very same programs (the smoke config's train step, its
evaluation, the tiny LLaVA's forward), in both xdist workers and in the subprocesses that the CLI,
multi-host and notebook tests start. JAX's persistent compilation cache, in a fresh temporary
folder per session (set in the controller before the workers start, so they and every subprocess
inherit it), compiles each once. The key is the program and its compile options, so a hit is the
executable a compile would have made; nothing carries over between sessions, so a run's timing is
what CI sees.
"""

import os
import shutil
import tempfile

_FLAGS = os.environ.get("XLA_FLAGS", "")
# Most of the suite's time is XLA:CPU compiling tiny programs; LLVM's optimisation of the
# generated code is the larger part of that and buys nothing at these sizes (the tests check
# values, not speed). XLA's own passes (fusion, sharding propagation, SPMD partitioning) still
# run. A level set by the caller wins.
if "xla_backend_optimization_level" not in _FLAGS:
    _FLAGS += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_FLAGS + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mslora-jax-test-xla-")
    # Cache every program, however small or quick to compile (the defaults skip those).
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    assert jax.device_count() == 8, (
        f"expected 8 simulated CPU devices, got {jax.device_count()}: was jax imported before "
        "tests/conftest.py set XLA_FLAGS?"
    )


def pytest_unconfigure(config):
    # The controller (not an xdist worker) made the cache folder; it removes it.
    if _OWN_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The slowest test files (``pytest --durations``), started first: with two workers and whole files
# per worker (``--dist loadfile``), a long file picked up last would leave the other worker idle.
SLOW_FIRST = (
    "test_generative.py",
    "test_sharding.py",
    "test_notebook.py",
    "test_decoder.py",
    "test_baselines.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
