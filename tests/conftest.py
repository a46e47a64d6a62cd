"""Test setup: 8 simulated CPU devices, so sharded code paths run (never skip) in CI.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    assert jax.device_count() == 8, (
        f"expected 8 simulated CPU devices, got {jax.device_count()}: was jax imported before "
        "tests/conftest.py set XLA_FLAGS?"
    )
